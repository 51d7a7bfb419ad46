//! Executing one `GpuCheckpoint` on this node and writing its status.

use kube::api::{Api, Patch, PatchParams};
use kube::ResourceExt;
use kybernate_controller::crd::{
    CheckpointPhase, Condition, GpuCheckpoint, PhaseDuration, ARTIFACTS_FINALIZER,
};
use kybernate_proto::agent::v1 as pb;
use serde_json::{json, Value};

use super::node_labels::fingerprint_status;
use super::{NodeWorker, WorkerError};
use crate::error::AgentError;
use crate::node::{Delete, GpuOf, Inspect};

/// containerd namespace of the CRI plugin, where the kubelet's pods run.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// The agent's checkpoint name for object `namespace/name` (`_` never occurs in either).
pub fn artifact_name(namespace: &str, name: &str) -> String {
    format!("{namespace}_{name}")
}

pub(super) fn now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now())
}

/// A stable CamelCase reason for each agent error, for conditions and metrics.
fn reason(error: &AgentError) -> &'static str {
    match error {
        AgentError::InvalidRequest(_) | AgentError::InvalidName(_) => "InvalidRequest",
        AgentError::InvalidTarget(_) => "ProcessNotFound",
        AgentError::Busy(_) => "Busy",
        AgentError::Cuda { .. } => "CudaCheckpointFailed",
        AgentError::Criu { .. } => "CriuDumpFailed",
        AgentError::Tier { .. } | AgentError::NoCopy { .. } => "StorageFailed",
        AgentError::Timeout { .. } => "PhaseTimeout",
        _ => "CheckpointFailed",
    }
}

enum Claim {
    Ours(Box<GpuCheckpoint>),
    Stale,
}

impl NodeWorker {
    /// Brings one delivered object one step further.
    pub(super) async fn reconcile(&self, cp: GpuCheckpoint) -> Result<(), WorkerError> {
        let ns = cp.namespace().unwrap_or_default();
        let name = cp.name_any();
        let artifact = artifact_name(&ns, &name);
        let api: Api<GpuCheckpoint> = Api::namespaced(self.client.clone(), &ns);
        if cp.metadata.deletion_timestamp.is_some() {
            return self.delete_artifacts(&api, &cp, &artifact).await;
        }
        match cp.phase() {
            CheckpointPhase::Scheduled => self.execute(&api, cp, artifact).await,
            CheckpointPhase::Checkpointing | CheckpointPhase::Draining => {
                // Claimed earlier, then the agent restarted: report what the catalog has.
                match self.agent.send(Inspect(artifact.clone())).await? {
                    Ok(info) => self.report_completed(&api, &cp, &artifact, info).await,
                    Err(_) => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    async fn execute(
        &self,
        api: &Api<GpuCheckpoint>,
        cp: GpuCheckpoint,
        artifact: String,
    ) -> Result<(), WorkerError> {
        let status = cp.status.clone().unwrap_or_default();
        let container = match status.containers.as_slice() {
            [one] => one.clone(),
            [] => {
                return self
                    .fail(
                        api,
                        &cp,
                        "NoContainer",
                        "the controller recorded no container".into(),
                    )
                    .await
            }
            many => {
                let msg = format!(
                    "the pod has {} containers; set spec.container to checkpoint one of them",
                    many.len()
                );
                return self.fail(api, &cp, "MultipleContainers", msg).await;
            }
        };
        let cp = match self.claim(api, &cp, &artifact).await? {
            Claim::Ours(cp) => *cp,
            Claim::Stale => return Ok(()),
        };
        tracing::info!(object = %cp.name_any(), container = %container.name,
            id = %container.container_id, "checkpointing");
        // The same path as `kybernatectl checkpoint --container`: containerd's task API, the
        // kybernate shim, and back to this agent for the CUDA phases and the images.
        let request = pb::CheckpointRequest {
            name: artifact.clone(),
            container_id: container.container_id.clone(),
            containerd_namespace: CRI_NAMESPACE.into(),
            pod_uid: status.pod_uid.clone().unwrap_or_default(),
            timeout_ms: u64::from(cp.spec.timeouts.dump_seconds) * 1000,
            leave_running: cp.spec.leave_running,
            ..pb::CheckpointRequest::default()
        };
        match self.checkpoint_with_progress(api, &cp, request).await? {
            Ok(reply) => {
                let info = pb::CheckpointInfo {
                    checkpoint_ref: reply.checkpoint_ref,
                    phases: reply.phases,
                    raw_bytes: reply.raw_bytes,
                    stored_bytes: reply.stored_bytes,
                    tiers: reply.tiers,
                    ..pb::CheckpointInfo::default()
                };
                self.report_completed(api, &cp, &artifact, info).await
            }
            Err(AgentError::AlreadyExists(_)) => {
                match self.agent.send(Inspect(artifact.clone())).await? {
                    Ok(info) => self.report_completed(api, &cp, &artifact, info).await,
                    Err(e) => self.fail(api, &cp, reason(&e), e.to_string()).await,
                }
            }
            Err(e) => self.fail(api, &cp, reason(&e), e.to_string()).await,
        }
    }

    /// Adds our finalizer and moves Scheduled → Checkpointing, both guarded by the
    /// resourceVersion the object came with.
    async fn claim(
        &self,
        api: &Api<GpuCheckpoint>,
        cp: &GpuCheckpoint,
        artifact: &str,
    ) -> Result<Claim, WorkerError> {
        let name = cp.name_any();
        let mut finalizers = cp.finalizers().to_vec();
        if !finalizers.iter().any(|f| f == ARTIFACTS_FINALIZER) {
            finalizers.push(ARTIFACTS_FINALIZER.into());
        }
        let meta = json!({"metadata": {"finalizers": finalizers, "resourceVersion": cp.resource_version()}});
        let cp = match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(meta))
            .await
        {
            Ok(cp) => cp,
            Err(kube::Error::Api(s)) if s.code == 409 => return Ok(Claim::Stale),
            Err(source) => return Err(self.kube_err("claim", cp, source)),
        };
        let status = json!({
            "metadata": {"resourceVersion": cp.resource_version()},
            "status": {"phase": CheckpointPhase::Checkpointing, "artifactRef": artifact},
        });
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
            .await
        {
            Ok(cp) => Ok(Claim::Ours(Box::new(cp))),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Claim::Stale),
            Err(source) => Err(self.kube_err("claim", &cp, source)),
        }
    }

    async fn report_completed(
        &self,
        api: &Api<GpuCheckpoint>,
        cp: &GpuCheckpoint,
        artifact: &str,
        info: pb::CheckpointInfo,
    ) -> Result<(), WorkerError> {
        let wanted = cp.spec.storage_tier.as_str();
        if !info.tiers.iter().any(|t| t == wanted) {
            let msg = format!(
                "checkpoint {artifact} is stored in [{}] on node {}, but the {wanted} tier was requested and is not configured here",
                info.tiers.join(", "),
                self.node_name
            );
            return self.fail(api, cp, "TierNotReached", msg).await;
        }
        let gpu = self
            .agent
            .send(GpuOf(artifact.to_owned()))
            .await?
            .ok()
            .flatten();
        let phases: Vec<PhaseDuration> = info
            .phases
            .iter()
            .map(|p| PhaseDuration {
                phase: p.phase.clone(),
                millis: p.millis,
            })
            .collect();
        let status = json!({"status": {
            "phase": CheckpointPhase::Completed,
            "artifactRef": artifact,
            "phases": phases,
            "rawBytes": info.raw_bytes,
            "storedBytes": info.stored_bytes,
            "tiers": info.tiers,
            "gpu": fingerprint_status(gpu.as_ref()),
            "finishedAt": now(),
            "conditions": [Condition::new("Completed", "Stored", format!("stored in {wanted} on node {}", self.node_name), now())],
        }});
        self.patch_status(api, cp, status).await
    }

    async fn fail(
        &self,
        api: &Api<GpuCheckpoint>,
        cp: &GpuCheckpoint,
        reason: &str,
        message: String,
    ) -> Result<(), WorkerError> {
        tracing::warn!(object = %cp.name_any(), reason, %message, "checkpoint failed");
        let status = json!({"status": {
            "phase": CheckpointPhase::Failed,
            "finishedAt": now(),
            "conditions": [Condition::new("Failed", reason, message, now())],
        }});
        self.patch_status(api, cp, status).await
    }

    async fn patch_status(
        &self,
        api: &Api<GpuCheckpoint>,
        cp: &GpuCheckpoint,
        status: Value,
    ) -> Result<(), WorkerError> {
        api.patch_status(
            &cp.name_any(),
            &PatchParams::default(),
            &Patch::Merge(status),
        )
        .await
        .map_err(|source| self.kube_err("write status of", cp, source))?;
        Ok(())
    }

    /// On deletion: remove the stored checkpoint, then our finalizer.
    async fn delete_artifacts(
        &self,
        api: &Api<GpuCheckpoint>,
        cp: &GpuCheckpoint,
        artifact: &str,
    ) -> Result<(), WorkerError> {
        if !cp.finalizers().iter().any(|f| f == ARTIFACTS_FINALIZER) {
            return Ok(());
        }
        match self.agent.send(Delete(artifact.to_owned())).await? {
            Ok(tiers) => tracing::info!(artifact, ?tiers, "deleted stored checkpoint"),
            Err(AgentError::NotFound(_)) => {}
            Err(error) => {
                tracing::warn!(artifact, %error, "cannot delete stored checkpoint; keeping the finalizer");
                return Ok(());
            }
        }
        let keep: Vec<String> = cp
            .finalizers()
            .iter()
            .filter(|f| *f != ARTIFACTS_FINALIZER)
            .cloned()
            .collect();
        let patch =
            json!({"metadata": {"finalizers": keep, "resourceVersion": cp.resource_version()}});
        match api
            .patch(
                &cp.name_any(),
                &PatchParams::default(),
                &Patch::Merge(patch),
            )
            .await
        {
            Ok(_) => Ok(()),
            // Changed meanwhile: the next delivery retries.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(source) => Err(self.kube_err("release", cp, source)),
        }
    }

    fn kube_err(
        &self,
        action: &'static str,
        cp: &GpuCheckpoint,
        source: kube::Error,
    ) -> WorkerError {
        WorkerError::Kube {
            action,
            object: format!(
                "GpuCheckpoint {}/{}",
                cp.namespace().unwrap_or_default(),
                cp.name_any()
            ),
            source,
        }
    }
}
