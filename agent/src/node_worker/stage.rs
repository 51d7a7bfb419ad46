//! Preparing one `GpuRestore` on this node: the checkpoint is prefetched into a near tier
//! (the same actors as `kybernatectl prefetch`) while the restored pod is still being
//! scheduled and started, and the result is written to the object's status.
//!
//! Level-triggered and idempotent: an object whose status already records staging (or a
//! failure) is left alone, and a prefetch of a checkpoint the tier already holds copies
//! nothing. The agent applies only `staging` and its own conditions (`Staged`, or `Failed`
//! with the phase when the checkpoint is not here or belongs to another tenant that granted
//! the restore's namespace nothing); the controller's fields stay.

use std::sync::Arc;
use std::time::Duration;

use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use kybernate_api::apply::{self, AGENT_MANAGER};
use kybernate_api::{
    Condition, GpuRestore, GpuRestoreStatus, PhaseDuration, RestorePhase, RestoreStaging,
    FAILED_CONDITION, STAGED_CONDITION,
};
use kybernate_proto::agent::v1 as pb;

use super::execute::{artifact_name, now};
use super::grants::RESTORE_REFUSED;
use super::{NodeWorker, WorkerError};
use crate::error::AgentError;
use crate::node::{CheckRestoreInto, Prefetch, RestorePrefetchTier};

/// How long to wait between tries while the checkpoint is busy (still being written or
/// drained), and how many tries before reporting it.
const BUSY_RETRY: Duration = Duration::from_secs(1);
const BUSY_TRIES: u32 = 120;

/// Brings one GpuRestore of this node one step further.
#[tracing::instrument(skip_all, fields(namespace = %restore.namespace().unwrap_or_default(), name = %restore.name_any()))]
pub(super) async fn reconcile(
    restore: Arc<GpuRestore>,
    worker: Arc<NodeWorker>,
) -> Result<Action, WorkerError> {
    worker.stage(&restore).await?;
    Ok(Action::await_change())
}

impl NodeWorker {
    /// Stages the checkpoint of `restore` unless that was done (or failed) already.
    async fn stage(&self, restore: &GpuRestore) -> Result<(), WorkerError> {
        let status = restore.status.clone().unwrap_or_default();
        // A Staged condition of either status, or a failure, means this was handled.
        let handled = status
            .conditions
            .iter()
            .any(|c| c.type_ == STAGED_CONDITION || c.type_ == FAILED_CONDITION);
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
        // Refused before anything is copied when the checkpoint is here; a checkpoint the
        // prefetch has to adopt from a shared tier is checked once its record is known.
        if let Some(refused) = self.refusal(restore, &artifact, &ns).await? {
            return self.apply_restore_status(&api, restore, refused).await;
        }
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
        if result.is_ok() {
            if let Some(refused) = self.refusal(restore, &artifact, &ns).await? {
                return self.apply_restore_status(&api, restore, refused).await;
            }
        }
        let applied = match result {
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
                GpuRestoreStatus {
                    staging: Some(staging),
                    conditions: vec![Condition::new(STAGED_CONDITION, reason, message, now())],
                    ..GpuRestoreStatus::default()
                }
            }
            Err(AgentError::NotFound(_)) => {
                let message = format!(
                    "checkpoint {artifact} (GpuCheckpoint {ns}/{cp}) is not stored on node {}; \
                     there is nothing to restore from",
                    self.node_name
                );
                tracing::warn!(object = %restore.name_any(), %message, "restore cannot be staged");
                GpuRestoreStatus {
                    phase: RestorePhase::Failed,
                    conditions: vec![Condition::new(
                        FAILED_CONDITION,
                        "CheckpointNotFound",
                        message,
                        now(),
                    )],
                    ..GpuRestoreStatus::default()
                }
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
                GpuRestoreStatus {
                    conditions: vec![condition],
                    ..GpuRestoreStatus::default()
                }
            }
        };
        self.apply_restore_status(&api, restore, applied).await
    }

    /// The Failed status of `restore` when the agent refuses `artifact` to pods of
    /// `namespace` (its origin is another tenant and no grant allows it), also posted as a
    /// Warning Event on the GpuRestore; `None` when allowed or not (yet) on this node.
    async fn refusal(
        &self,
        restore: &GpuRestore,
        artifact: &str,
        namespace: &str,
    ) -> Result<Option<GpuRestoreStatus>, WorkerError> {
        let check = CheckRestoreInto {
            checkpoint_ref: artifact.to_owned(),
            namespace: namespace.to_owned(),
        };
        let refused = match self.agent.send(check).await? {
            Err(AgentError::RestoreRefused(refused)) => refused,
            Ok(_) | Err(_) => return Ok(None),
        };
        let message = refused.to_string();
        tracing::warn!(object = %restore.name_any(), %message, "GpuRestore refused");
        let event = Event {
            type_: EventType::Warning,
            reason: RESTORE_REFUSED.into(),
            note: Some(message.clone()),
            action: "Restore".into(),
            secondary: None,
        };
        if let Err(error) = self
            .recorder()
            .publish(&event, &restore.object_ref(&()))
            .await
        {
            tracing::warn!(%error, "cannot publish the CheckpointRestoreRefused event");
        }
        Ok(Some(GpuRestoreStatus {
            phase: RestorePhase::Failed,
            conditions: vec![Condition::new(
                FAILED_CONDITION,
                RESTORE_REFUSED,
                message,
                now(),
            )],
            ..GpuRestoreStatus::default()
        }))
    }

    /// Applies the agent's fields of the restore's status as `kybernate-agent`.
    async fn apply_restore_status(
        &self,
        api: &Api<GpuRestore>,
        restore: &GpuRestore,
        status: GpuRestoreStatus,
    ) -> Result<(), WorkerError> {
        let name = restore.name_any();
        api.patch_status(
            &name,
            &apply::params(AGENT_MANAGER),
            &apply::status::<GpuRestore, _>(&name, status),
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
