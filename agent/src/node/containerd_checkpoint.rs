//! A container checkpoint asked of this agent (`kybernatectl checkpoint --container`, the
//! node worker): the agent asks containerd, containerd asks the container's kybernate shim,
//! and the shim calls back into this agent (ContainerCheckpointBegin/End). The outer call
//! waits in a spawned future, never in the actor's mailbox, so the node agent keeps
//! answering the shim's inner calls meanwhile.

use std::time::Duration;

use actix::prelude::*;
use kybernate_dataplane::{CheckpointName, TierKind};
use kybernate_proto::agent::v1 as pb;

use super::container_checkpoint::container_name;
use super::{completed_reply, held_by, holdings, NodeAgent};
use crate::containerd::{self, DEFAULT_NAMESPACE};
use crate::error::AgentError;

/// A container checkpoint this agent asked containerd for, awaited from its shim.
#[derive(Debug, Clone)]
pub(super) struct AwaitedCheckpoint {
    /// The name promised to the caller.
    pub name: CheckpointName,
    /// The slowest tier the caller waits for.
    pub until: TierKind,
}

impl NodeAgent {
    fn container_job(
        &self,
        req: &pb::CheckpointRequest,
    ) -> Result<(AwaitedCheckpoint, String), AgentError> {
        if req.pid != 0 {
            return Err(AgentError::InvalidRequest(format!(
                "give either a PID ({}) or a container ({}), not both",
                req.pid, req.container_id
            )));
        }
        let until = self.requested_tier(&req.tier)?;
        let name = if req.name.is_empty() {
            container_name(&req.container_id)?
        } else {
            CheckpointName::new(&req.name)?
        };
        if self.catalog.get(&name).is_some() {
            return Err(AgentError::AlreadyExists(name.to_string()));
        }
        if self.busy.contains(&name) {
            return Err(AgentError::Busy(name.to_string()));
        }
        if let Some(other) = self.awaited_containers.get(&req.container_id) {
            return Err(AgentError::Busy(format!(
                "{} (container {} is being checkpointed already)",
                other.name, req.container_id
            )));
        }
        let namespace = if req.containerd_namespace.is_empty() {
            DEFAULT_NAMESPACE.to_owned()
        } else {
            req.containerd_namespace.clone()
        };
        Ok((AwaitedCheckpoint { name, until }, namespace))
    }

    /// Checkpoints container `req.container_id` through containerd and its shim.
    pub(super) fn checkpoint_through_containerd(
        &mut self,
        req: pb::CheckpointRequest,
    ) -> ResponseActFuture<Self, Result<pb::CheckpointReply, AgentError>> {
        let (awaited, namespace) = match self.container_job(&req) {
            Ok(job) => job,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        let name = awaited.name.clone();
        let container = req.container_id;
        self.awaited_containers.insert(container.clone(), awaited);
        let timeouts = &self.parts.config.timeouts;
        let timeout = if req.timeout_ms > 0 {
            Duration::from_millis(req.timeout_ms)
        } else {
            Duration::from_millis(
                timeouts
                    .cuda_ms
                    .saturating_mul(2)
                    .saturating_add(timeouts.dump_ms)
                    .saturating_add(timeouts.store_ms),
            )
        };
        let socket = self.parts.config.containerd_socket.clone();
        let parts = self.parts.clone();
        let asked = container.clone();
        // The shim dumps into the RAM tier; naming that directory keeps containerd from
        // writing a checkpoint image of its own.
        let image_dir = self.parts.ram.partial_dir_of(&name);
        Box::pin(
            async move {
                containerd::checkpoint_task(
                    &socket,
                    &namespace,
                    &asked,
                    &image_dir,
                    req.leave_running,
                    timeout,
                )
                .await?;
                holdings(&parts).await
            }
            .into_actor(self)
            .map(move |result, agent, _| {
                agent.awaited_containers.remove(&container);
                let record = agent.catalog.get(&name).cloned();
                if record.is_none() && !agent.shim_checkpoints.contains_key(&name) {
                    // Nothing of this checkpoint is kept or in progress: drop what a shim
                    // dumped (another runtime's shim dumps without telling this agent).
                    let _ = std::fs::remove_dir_all(agent.parts.ram.partial_dir_of(&name));
                }
                let holdings = result?;
                let record = record.ok_or_else(|| {
                    AgentError::InvalidRequest(format!(
                        "containerd checkpointed container {container}, but its shim never \
                         reported to this agent: the container does not run under the \
                         kybernate runtime (io.containerd.kybernate.v1), or its shim uses \
                         another agent socket"
                    ))
                })?;
                Ok(completed_reply(&record, held_by(&holdings, name.as_str())))
            }),
        )
    }
}
