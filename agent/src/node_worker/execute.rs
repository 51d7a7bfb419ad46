//! Executing one `GpuCheckpoint` on this node and applying its status.

use std::sync::Arc;

use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{finalizer, Event};
use kube::ResourceExt;
use kybernate_api::apply::{self, AGENT_MANAGER};
use kybernate_api::{
    CheckpointPhase, Condition, GpuCheckpoint, GpuCheckpointStatus, PhaseDuration,
    ARTIFACTS_FINALIZER, FAILED_CONDITION,
};
use kybernate_proto::agent::v1 as pb;

use super::node_labels::fingerprint_status;
use super::{finalizer_err, NodeWorker, WorkerError, IN_FLIGHT_POLL};
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

/// Brings one GpuCheckpoint of this node one step further: the artifacts finalizer first,
/// then the phase's work; on deletion, the stored checkpoint goes before the finalizer.
#[tracing::instrument(skip_all, fields(namespace = %cp.namespace().unwrap_or_default(), name = %cp.name_any()))]
pub(super) async fn reconcile(
    cp: Arc<GpuCheckpoint>,
    worker: Arc<NodeWorker>,
) -> Result<Action, WorkerError> {
    let ns = cp.namespace().unwrap_or_default();
    let name = cp.name_any();
    let artifact = artifact_name(&ns, &name);
    let api: Api<GpuCheckpoint> = Api::namespaced(worker.client.clone(), &ns);
    finalizer(&api, ARTIFACTS_FINALIZER, cp, |event| async {
        match event {
            Event::Apply(cp) => worker.advance(&api, &cp, artifact).await,
            Event::Cleanup(cp) => worker.delete_artifacts(&cp, &artifact).await,
        }
    })
    .await
    .map_err(finalizer_err(format!("GpuCheckpoint {ns}/{name}")))
}

impl NodeWorker {
    /// The phase's step for a live object.
    async fn advance(
        &self,
        api: &Api<GpuCheckpoint>,
        cp: &GpuCheckpoint,
        artifact: String,
    ) -> Result<Action, WorkerError> {
        match cp.phase() {
            CheckpointPhase::Scheduled => {
                self.execute(api, cp.clone(), artifact).await?;
                Ok(Action::await_change())
            }
            CheckpointPhase::Checkpointing | CheckpointPhase::Draining => {
                // Claimed, and we are not running it (one reconcile per object at a time):
                // the agent restarted, or our own last write has not come back yet. Report
                // what the catalog holds, guarded by the version we looked at, so a stale
                // copy writes nothing.
                match self.agent.send(Inspect(artifact.clone())).await? {
                    Ok(info) => {
                        let version = cp.resource_version();
                        self.report_completed(api, cp, &artifact, info, version)
                            .await?;
                        Ok(Action::await_change())
                    }
                    Err(_) => Ok(Action::requeue(IN_FLIGHT_POLL)),
                }
            }
            _ => Ok(Action::await_change()),
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
                        None,
                    )
                    .await
            }
            many => {
                let msg = format!(
                    "the pod has {} containers; set spec.container to checkpoint one of them",
                    many.len()
                );
                return self.fail(api, &cp, "MultipleContainers", msg, None).await;
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
                self.report_completed(api, &cp, &artifact, info, None).await
            }
            Err(AgentError::AlreadyExists(_)) => {
                match self.agent.send(Inspect(artifact.clone())).await? {
                    Ok(info) => self.report_completed(api, &cp, &artifact, info, None).await,
                    Err(e) => self.fail(api, &cp, reason(&e), e.to_string(), None).await,
                }
            }
            Err(e) => self.fail(api, &cp, reason(&e), e.to_string(), None).await,
        }
    }

    /// Moves Scheduled → Checkpointing, guarded by the resourceVersion of the object the
    /// decision was made on: a stale copy gets a conflict and never runs twice.
    async fn claim(
        &self,
        api: &Api<GpuCheckpoint>,
        cp: &GpuCheckpoint,
        artifact: &str,
    ) -> Result<Claim, WorkerError> {
        let name = cp.name_any();
        let status = GpuCheckpointStatus {
            phase: CheckpointPhase::Checkpointing,
            artifact_ref: Some(artifact.to_owned()),
            ..GpuCheckpointStatus::default()
        };
        match api
            .patch_status(
                &name,
                &apply::params(AGENT_MANAGER),
                &apply::status_at::<GpuCheckpoint, _>(&name, cp.resource_version(), status),
            )
            .await
        {
            Ok(cp) => Ok(Claim::Ours(Box::new(cp))),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Claim::Stale),
            Err(source) => Err(self.kube_err("claim", cp, source)),
        }
    }

    /// Applies Completed with what the catalog says; `version` guards the write (see
    /// [`NodeWorker::apply_status`]).
    async fn report_completed(
        &self,
        api: &Api<GpuCheckpoint>,
        cp: &GpuCheckpoint,
        artifact: &str,
        info: pb::CheckpointInfo,
        version: Option<String>,
    ) -> Result<(), WorkerError> {
        let wanted = cp.spec.storage_tier.as_str();
        if !info.tiers.iter().any(|t| t == wanted) {
            let msg = format!(
                "checkpoint {artifact} is stored in [{}] on node {}, but the {wanted} tier was requested and is not configured here",
                info.tiers.join(", "),
                self.node_name
            );
            return self.fail(api, cp, "TierNotReached", msg, version).await;
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
        let message = format!("stored in {wanted} on node {}", self.node_name);
        let status = GpuCheckpointStatus {
            phase: CheckpointPhase::Completed,
            artifact_ref: Some(artifact.to_owned()),
            phases,
            raw_bytes: info.raw_bytes,
            stored_bytes: info.stored_bytes,
            tiers: info.tiers,
            gpu: Some(fingerprint_status(gpu.as_ref())),
            finished_at: Some(now()),
            conditions: vec![Condition::new("Completed", "Stored", message, now())],
            ..GpuCheckpointStatus::default()
        };
        self.apply_status(api, cp, status, version).await
    }

    /// Applies Failed with the agent's `Failed` condition (the controller's conditions stay).
    async fn fail(
        &self,
        api: &Api<GpuCheckpoint>,
        cp: &GpuCheckpoint,
        reason: &str,
        message: String,
        version: Option<String>,
    ) -> Result<(), WorkerError> {
        tracing::warn!(object = %cp.name_any(), reason, %message, "checkpoint failed");
        let status = GpuCheckpointStatus {
            phase: CheckpointPhase::Failed,
            // Ours since the claim: an apply that left it out would remove it.
            artifact_ref: cp.status.as_ref().and_then(|s| s.artifact_ref.clone()),
            finished_at: Some(now()),
            conditions: vec![Condition::new(FAILED_CONDITION, reason, message, now())],
            ..GpuCheckpointStatus::default()
        };
        self.apply_status(api, cp, status, version).await
    }

    /// Applies the agent's status fields as `kybernate-agent`. With `version`, the write
    /// counts only if the object is still at that version; a conflict means the object
    /// moved on since we looked, and its next delivery decides.
    async fn apply_status(
        &self,
        api: &Api<GpuCheckpoint>,
        cp: &GpuCheckpoint,
        status: GpuCheckpointStatus,
        version: Option<String>,
    ) -> Result<(), WorkerError> {
        let name = cp.name_any();
        let guarded = version.is_some();
        let result = api
            .patch_status(
                &name,
                &apply::params(AGENT_MANAGER),
                &apply::status_at::<GpuCheckpoint, _>(&name, version, status),
            )
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if guarded && s.code == 409 => {
                tracing::debug!(object = %name, "changed since we looked; not written");
                Ok(())
            }
            Err(source) => Err(self.kube_err("write status of", cp, source)),
        }
    }

    /// On deletion: remove the stored checkpoint. Only when that worked (or there was
    /// nothing to remove) does the finalizer helper drop our finalizer; otherwise the
    /// error keeps it and the object is retried with backoff.
    async fn delete_artifacts(
        &self,
        cp: &GpuCheckpoint,
        artifact: &str,
    ) -> Result<Action, WorkerError> {
        match self.agent.send(Delete(artifact.to_owned())).await? {
            Ok(tiers) => tracing::info!(artifact, ?tiers, "deleted stored checkpoint"),
            Err(AgentError::NotFound(_)) => {}
            Err(source) => {
                return Err(WorkerError::Agent {
                    action: "delete the stored checkpoint",
                    object: format!(
                        "GpuCheckpoint {}/{}",
                        cp.namespace().unwrap_or_default(),
                        cp.name_any()
                    ),
                    source,
                })
            }
        }
        Ok(Action::await_change())
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
