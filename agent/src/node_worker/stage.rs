//! Preparing one `GpuRestore` on this node: the checkpoint is prefetched into a near tier
//! (the same actors as `kybernatectl prefetch`) while the restored pod is still being
//! scheduled and started, and the result is written to the object's status.
//!
//! Level-triggered and idempotent: an object whose status already records staging (or a
//! failure) is left alone, and a prefetch of a checkpoint the tier already holds copies
//! nothing.

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::ResourceExt;
use kybernate_controller::crd::{
    Condition, GpuRestore, PhaseDuration, RestorePhase, RestoreStaging, STAGED_CONDITION,
};
use kybernate_proto::agent::v1 as pb;
use serde_json::{json, Value};

use super::execute::{artifact_name, now};
use super::{NodeWorker, WorkerError};
use crate::error::AgentError;
use crate::node::{Prefetch, RestorePrefetchTier};

/// How long to wait between tries while the checkpoint is busy (still being written or
/// drained), and how many tries before reporting it.
const BUSY_RETRY: Duration = Duration::from_secs(1);
const BUSY_TRIES: u32 = 120;

impl NodeWorker {
    /// Brings one delivered GpuRestore one step further.
    pub(super) async fn stage(&self, restore: GpuRestore) -> Result<(), WorkerError> {
        let status = restore.status.clone().unwrap_or_default();
        // A Staged condition of either status, or a failure, means this was handled.
        let handled = status
            .conditions
            .iter()
            .any(|c| c.type_ == STAGED_CONDITION || c.type_ == "Failed");
        if restore.metadata.deletion_timestamp.is_some()
            || restore.phase().is_terminal()
            || status.staging.is_some()
            || handled
        {
            return Ok(());
        }
        let ns = restore.namespace().unwrap_or_default();
        let api: Api<GpuRestore> = Api::namespaced(self.client.clone(), &ns);
        let artifact = status
            .artifact_ref
            .clone()
            .unwrap_or_else(|| artifact_name(&ns, &restore.spec.checkpoint_name));
        let tier = self.agent.send(RestorePrefetchTier).await?.as_str();
        tracing::info!(object = %restore.name_any(), %artifact, tier, "staging a restore");
        let request = pb::PrefetchRequest {
            checkpoint_ref: artifact.clone(),
            to_tier: tier.into(),
        };
        let mut tries = 0;
        let result = loop {
            match self.agent.send(Prefetch(request.clone())).await? {
                Err(AgentError::Busy(_)) if tries < BUSY_TRIES => {
                    tries += 1;
                    tokio::time::sleep(BUSY_RETRY).await;
                }
                other => break other,
            }
        };
        let cp = &restore.spec.checkpoint_name;
        let patch = match result {
            Ok(reply) => {
                let from = (!reply.from_tier.is_empty()).then(|| reply.from_tier.clone());
                let staging = RestoreStaging {
                    node_name: self.node_name.clone(),
                    tier: tier.into(),
                    from_tier: from.clone(),
                    phases: reply
                        .phases
                        .iter()
                        .map(|p| PhaseDuration {
                            phase: p.phase.clone(),
                            millis: p.millis,
                        })
                        .collect(),
                };
                let (reason, message) = match &from {
                    Some(from) => (
                        "Prefetched",
                        format!(
                            "checkpoint {artifact} copied from {from} into {tier} on node {}",
                            self.node_name
                        ),
                    ),
                    None => (
                        "AlreadyStaged",
                        format!(
                            "checkpoint {artifact} is already in {tier} on node {}",
                            self.node_name
                        ),
                    ),
                };
                let condition = Condition::new(STAGED_CONDITION, reason, message, now());
                json!({"status": {
                    "staging": staging,
                    "conditions": with_condition(&status.conditions, condition),
                }})
            }
            Err(AgentError::NotFound(_)) => {
                let message = format!(
                    "checkpoint {artifact} (GpuCheckpoint {ns}/{cp}) is not stored on node {}; \
                     there is nothing to restore from",
                    self.node_name
                );
                tracing::warn!(object = %restore.name_any(), %message, "restore cannot be staged");
                let condition = Condition::new("Failed", "CheckpointNotFound", message, now());
                json!({"status": {
                    "phase": RestorePhase::Failed,
                    "conditions": with_condition(&status.conditions, condition),
                }})
            }
            Err(error) => {
                // The restore may still load the checkpoint itself when the pod starts:
                // report the staging failure without failing the restore.
                let message = format!(
                    "cannot stage checkpoint {artifact} into {tier} on node {}: {error}",
                    self.node_name
                );
                tracing::warn!(object = %restore.name_any(), %message, "restore not staged");
                let mut condition =
                    Condition::new(STAGED_CONDITION, "StagingFailed", message, now());
                condition.status = "False".into();
                json!({"status": {"conditions": with_condition(&status.conditions, condition)}})
            }
        };
        self.patch_restore(&api, &restore, patch).await
    }

    async fn patch_restore(
        &self,
        api: &Api<GpuRestore>,
        restore: &GpuRestore,
        status: Value,
    ) -> Result<(), WorkerError> {
        api.patch_status(
            &restore.name_any(),
            &PatchParams::default(),
            &Patch::Merge(status),
        )
        .await
        .map_err(|source| WorkerError::Kube {
            action: "write status of",
            object: format!(
                "GpuRestore {}/{}",
                restore.namespace().unwrap_or_default(),
                restore.name_any()
            ),
            source,
        })?;
        Ok(())
    }
}

/// `existing` with `condition` replacing any of its type (a merge patch replaces lists).
fn with_condition(existing: &[Condition], condition: Condition) -> Vec<Condition> {
    let mut all: Vec<Condition> = existing
        .iter()
        .filter(|c| c.type_ != condition.type_)
        .cloned()
        .collect();
    all.push(condition);
    all
}
