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
use crate::catalog::CheckpointRecord;
use crate::containerd::{self, ContainerdError, DEFAULT_NAMESPACE};
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
        self.ensure_name_unused(&name)?;
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
                let asked_containerd = containerd::checkpoint_task(
                    &socket,
                    &namespace,
                    &asked,
                    &image_dir,
                    req.leave_running,
                    timeout,
                )
                .await;
                (asked_containerd, holdings(&parts).await)
            }
            .into_actor(self)
            .map(move |(asked_containerd, holdings), agent, _| {
                agent.awaited_containers.remove(&container);
                let record = agent.catalog.get(&name).cloned();
                if record.is_none() && !agent.shim_checkpoints.contains_key(&name) {
                    // Nothing of this checkpoint is kept or in progress: drop what a shim
                    // dumped (another runtime's shim dumps without telling this agent).
                    // File work, off the agent's thread.
                    let partial = agent.parts.ram.partial_dir_of(&name);
                    tokio::task::spawn_blocking(move || std::fs::remove_dir_all(partial));
                }
                let record = judge_containerd_reply(asked_containerd, record, &container)?;
                Ok(completed_reply(&record, held_by(&holdings?, name.as_str())))
            }),
        )
    }
}

/// Whether a checkpoint that this agent asked containerd for succeeded. The agent's own
/// record decides, not containerd's reply: the record exists once the container's shim has
/// dumped and this agent has committed the images (the name was free when the request came,
/// so a record under it is this request's).
///
/// After the shim returns, containerd 1.6 and 1.7 still archive their own checkpoint
/// directory into the content store. A Kybernate checkpoint never uses that copy, and the
/// directory is empty when the agent named `image_path`, so every archive is the same
/// empty tar. Their tasks service refuses a blob that already exists, so from the second
/// checkpoint on the call fails with "content sha256:…: already exists", and the same
/// happens to the container's spec blob when one container is checkpointed twice; only
/// containerd's garbage collector, removing the first blobs in between, ever let it pass.
/// Making the archive unique per checkpoint would not cover the spec blob, so the agent
/// judges by its record instead: once committed, the checkpoint stands (in stop mode it is
/// the workload's only copy, and reporting it failed would invite a retry that finds the
/// name taken), and containerd's failure afterwards is logged as a warning.
fn judge_containerd_reply(
    asked: Result<(), ContainerdError>,
    record: Option<CheckpointRecord>,
    container: &str,
) -> Result<CheckpointRecord, AgentError> {
    match (asked, record) {
        (Ok(()), Some(record)) => Ok(record),
        (Err(e), Some(record)) => {
            tracing::warn!(
                checkpoint = %record.name,
                error = %e,
                "containerd failed after the shim's checkpoint was committed (containerd's own \
                 copy of its checkpoint directory, which Kybernate does not use); the \
                 checkpoint is complete"
            );
            Ok(record)
        }
        (Err(e), None) => Err(e.into()),
        (Ok(()), None) => Err(AgentError::InvalidRequest(format!(
            "containerd checkpointed container {container}, but its shim never reported to \
             this agent: the container does not run under the kybernate runtime \
             (io.containerd.kybernate.v1), or its shim uses another agent socket"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> CheckpointRecord {
        CheckpointRecord {
            name: "c1-ckpt".into(),
            pid: 42,
            container_id: "c1".into(),
            pod_uid: String::new(),
            gpu_group: String::new(),
            gpu_seat: String::new(),
            created_unix: 0,
            leave_running: true,
            shell_job: false,
            phases: Vec::new(),
            raw_bytes: 0,
            stored_bytes: 0,
            files: Vec::new(),
            gpu: None,
            note: String::new(),
            origin: crate::tenancy::Origin::NodeLocal,
        }
    }

    fn already_exists() -> ContainerdError {
        ContainerdError {
            socket: "/run/containerd/containerd.sock".into(),
            container: "c1".into(),
            namespace: "k8s.io".into(),
            code: tonic::Code::AlreadyExists,
            message: "content sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef: already exists".into(),
        }
    }

    #[test]
    fn a_committed_checkpoint_stands_whatever_containerd_archives_afterwards() {
        let judged = judge_containerd_reply(Err(already_exists()), Some(record()), "c1");
        assert_eq!(judged.unwrap(), record());
        assert_eq!(
            judge_containerd_reply(Ok(()), Some(record()), "c1").unwrap(),
            record()
        );
    }

    #[test]
    fn without_a_record_containerd_decides_or_the_shim_is_named() {
        let err = judge_containerd_reply(Err(already_exists()), None, "c1").unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        let err = judge_containerd_reply(Ok(()), None, "c1").unwrap_err();
        assert!(
            err.to_string().contains("never reported to this agent"),
            "{err}"
        );
    }
}
