//! Following a running checkpoint through the agent's phase events, so its object shows
//! `Draining` once the dump is done and the images move into the requested slower tier.

use kube::api::Api;
use kube::ResourceExt;
use kybernate_api::apply::{self, AGENT_MANAGER};
use kybernate_api::{CheckpointPhase, Condition, GpuCheckpoint, GpuCheckpointStatus};
use kybernate_proto::agent::v1 as pb;
use tokio::sync::broadcast::error::RecvError;

use super::{NodeWorker, WorkerError};
use crate::error::AgentError;
use crate::node::{Checkpoint, SubscribeEvents};

/// Condition type written with the `Draining` phase.
pub const DRAINING_CONDITION: &str = "Draining";

/// Whether `event` is checkpoint `artifact` starting to store into a tier beyond RAM: the
/// freeze and dump are over, the drain has begun.
pub fn starts_drain(event: &pb::Event, artifact: &str) -> bool {
    event.checkpoint_ref == artifact
        && event.operation == "checkpoint"
        && event.status == "started"
        && event.phase.starts_with("store_")
        && event.phase != "store_ram"
}

impl NodeWorker {
    /// Runs `request` through the node agent; meanwhile moves `cp` to `Draining` when the
    /// agent starts storing it beyond RAM. A failed status write is logged and does not
    /// disturb the checkpoint.
    pub(super) async fn checkpoint_with_progress(
        &self,
        api: &Api<GpuCheckpoint>,
        cp: &GpuCheckpoint,
        request: pb::CheckpointRequest,
    ) -> Result<Result<pb::CheckpointReply, AgentError>, WorkerError> {
        let artifact = request.name.clone();
        let mut events = self.agent.send(SubscribeEvents).await?;
        let reply = self.agent.send(Checkpoint(request));
        tokio::pin!(reply);
        let mut listening = true;
        loop {
            tokio::select! {
                // Events first: the drain's start is reported before the reply it precedes.
                biased;
                event = events.recv(), if listening => match event {
                    Ok(event) if starts_drain(&event, &artifact) => {
                        listening = false;
                        if let Err(error) = self.report_draining(api, cp, &event).await {
                            tracing::warn!(%error, object = %cp.name_any(), "cannot write the Draining phase");
                        }
                    }
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => listening = false,
                },
                reply = &mut reply => return Ok(reply?),
            }
        }
    }

    async fn report_draining(
        &self,
        api: &Api<GpuCheckpoint>,
        cp: &GpuCheckpoint,
        event: &pb::Event,
    ) -> Result<(), WorkerError> {
        let tier = event.phase.trim_start_matches("store_");
        let message = format!(
            "dump done; storing into {tier} on node {} (requested tier: {})",
            self.node_name,
            cp.spec.storage_tier.as_str()
        );
        tracing::info!(object = %cp.name_any(), %message, "draining");
        let status = GpuCheckpointStatus {
            phase: CheckpointPhase::Draining,
            // Ours since the claim: an apply that left it out would remove it.
            artifact_ref: Some(event.checkpoint_ref.clone()),
            conditions: vec![Condition::new(
                DRAINING_CONDITION,
                "Dumped",
                message,
                super::execute::now(),
            )],
            ..GpuCheckpointStatus::default()
        };
        let name = cp.name_any();
        api.patch_status(
            &name,
            &apply::params(AGENT_MANAGER),
            &apply::status::<GpuCheckpoint, _>(&name, status),
        )
        .await
        .map_err(|source| WorkerError::Kube {
            action: "write Draining status of",
            object: format!(
                "GpuCheckpoint {}/{}",
                cp.namespace().unwrap_or_default(),
                cp.name_any()
            ),
            source,
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str, operation: &str, phase: &str, status: &str) -> pb::Event {
        pb::Event {
            checkpoint_ref: name.into(),
            operation: operation.into(),
            phase: phase.into(),
            status: status.into(),
            ..pb::Event::default()
        }
    }

    #[test]
    fn only_the_start_of_storing_beyond_ram_starts_the_drain() {
        assert!(starts_drain(
            &event("ns_cp", "checkpoint", "store_nvme", "started"),
            "ns_cp"
        ));
        assert!(starts_drain(
            &event("ns_cp", "checkpoint", "store_s3", "started"),
            "ns_cp"
        ));
        for other in [
            event("ns_cp", "checkpoint", "criu_dump", "finished"),
            event("ns_cp", "checkpoint", "store_ram", "started"),
            event("ns_cp", "checkpoint", "store_nvme", "finished"),
            event("ns_cp", "drain", "store_s3", "started"),
            event("ns_other", "checkpoint", "store_nvme", "started"),
        ] {
            assert!(!starts_drain(&other, "ns_cp"), "{other:?}");
        }
    }
}
