//! The shim's calls to the Kybernate agent over its Unix socket, each under its phase's
//! timeout, each failure naming the phase.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use kybernate_proto::agent::v1 as pb;
use kybernate_proto::agent::v1::agent_client::AgentClient;
use tonic::transport::Channel;

/// A failed agent call: which phase, and why.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct AgentCallError {
    /// The phase that failed (`agent_connect`, `agent_cuda`, `agent_store`, ...).
    pub phase: &'static str,
    /// What went wrong.
    pub message: String,
}

/// A connected agent.
#[derive(Debug, Clone)]
pub struct AgentLink {
    client: AgentClient<Channel>,
    socket: PathBuf,
}

fn fail(phase: &'static str, message: String) -> AgentCallError {
    AgentCallError { phase, message }
}

impl AgentLink {
    /// Connects to the agent at `socket` within `timeout`.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Self, AgentCallError> {
        let unreachable = |why: String| {
            fail(
                "agent_connect",
                format!(
                    "cannot reach the Kybernate agent at {}: {why}",
                    socket.display()
                ),
            )
        };
        if !socket.exists() {
            return Err(unreachable(
                "no such socket (is kybernate-agent running?)".into(),
            ));
        }
        let channel = tokio::time::timeout(timeout, kybernate_client::unix_channel(socket))
            .await
            .map_err(|_| unreachable(format!("no answer within {} ms", timeout.as_millis())))?
            .map_err(|e| unreachable(kybernate_client::error_chain(&e)))?;
        Ok(Self {
            client: AgentClient::new(channel),
            socket: socket.to_owned(),
        })
    }

    async fn call<T, F>(
        &self,
        phase: &'static str,
        timeout: Duration,
        call: impl FnOnce(AgentClient<Channel>) -> F,
    ) -> Result<T, AgentCallError>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match tokio::time::timeout(timeout, call(self.client.clone())).await {
            Err(_) => Err(fail(
                phase,
                format!(
                    "the agent at {} did not answer within {} ms",
                    self.socket.display(),
                    timeout.as_millis()
                ),
            )),
            Ok(Err(status)) => Err(fail(phase, status.message().to_owned())),
            Ok(Ok(reply)) => Ok(reply.into_inner()),
        }
    }

    /// The node's GPUs as the agent sees them.
    pub async fn node_devices(
        &self,
        timeout: Duration,
    ) -> Result<pb::NodeDevicesReply, AgentCallError> {
        self.call("gpu_validate", timeout, |mut c| async move {
            c.node_devices(pb::NodeDevicesRequest {}).await
        })
        .await
    }

    /// CUDA lock + checkpoint of the container's processes; returns the image dir.
    pub async fn checkpoint_begin(
        &self,
        req: pb::ContainerCheckpointBeginRequest,
        timeout: Duration,
    ) -> Result<pb::ContainerCheckpointBeginReply, AgentCallError> {
        self.call("agent_cuda", timeout, |mut c| async move {
            c.container_checkpoint_begin(req).await
        })
        .await
    }

    /// Commit (dumped) or roll back (not dumped) a checkpoint begun with
    /// [`Self::checkpoint_begin`].
    pub async fn checkpoint_end(
        &self,
        req: pb::ContainerCheckpointEndRequest,
        timeout: Duration,
    ) -> Result<pb::CheckpointReply, AgentCallError> {
        let phase = if req.dumped {
            "agent_store"
        } else {
            "agent_rollback"
        };
        self.call(phase, timeout, |mut c| async move {
            c.container_checkpoint_end(req).await
        })
        .await
    }

    /// Stages a stored checkpoint's images for `runc restore`.
    pub async fn restore_stage(
        &self,
        req: pb::ContainerRestoreStageRequest,
        timeout: Duration,
    ) -> Result<pb::ContainerRestoreStageReply, AgentCallError> {
        self.call("agent_stage", timeout, |mut c| async move {
            c.container_restore_stage(req).await
        })
        .await
    }

    /// CUDA restore + unlock after `runc restore` (or cleanup when it failed).
    pub async fn restore_end(
        &self,
        req: pb::ContainerRestoreEndRequest,
        timeout: Duration,
    ) -> Result<pb::ContainerRestoreEndReply, AgentCallError> {
        self.call("agent_cuda_restore", timeout, |mut c| async move {
            c.container_restore_end(req).await
        })
        .await
    }
}

/// The agent's GPU phases as the shim's checkpoint and restore call them: the seam that lets
/// their rollback orderings be tested without an agent, a GPU or root.
#[async_trait]
pub trait GpuAgent: Send + Sync + std::fmt::Debug {
    /// The node's GPUs.
    async fn node_devices(&self, timeout: Duration)
        -> Result<pb::NodeDevicesReply, AgentCallError>;
    /// CUDA lock + checkpoint; the image directory.
    async fn checkpoint_begin(
        &self,
        req: pb::ContainerCheckpointBeginRequest,
        timeout: Duration,
    ) -> Result<pb::ContainerCheckpointBeginReply, AgentCallError>;
    /// Commit (dumped) or roll back a begun checkpoint.
    async fn checkpoint_end(
        &self,
        req: pb::ContainerCheckpointEndRequest,
        timeout: Duration,
    ) -> Result<pb::CheckpointReply, AgentCallError>;
    /// Stage a stored checkpoint's images.
    async fn restore_stage(
        &self,
        req: pb::ContainerRestoreStageRequest,
        timeout: Duration,
    ) -> Result<pb::ContainerRestoreStageReply, AgentCallError>;
    /// CUDA restore + unlock, or clean-up of a failed restore.
    async fn restore_end(
        &self,
        req: pb::ContainerRestoreEndRequest,
        timeout: Duration,
    ) -> Result<pb::ContainerRestoreEndReply, AgentCallError>;
}

#[async_trait]
impl GpuAgent for AgentLink {
    async fn node_devices(
        &self,
        timeout: Duration,
    ) -> Result<pb::NodeDevicesReply, AgentCallError> {
        AgentLink::node_devices(self, timeout).await
    }

    async fn checkpoint_begin(
        &self,
        req: pb::ContainerCheckpointBeginRequest,
        timeout: Duration,
    ) -> Result<pb::ContainerCheckpointBeginReply, AgentCallError> {
        AgentLink::checkpoint_begin(self, req, timeout).await
    }

    async fn checkpoint_end(
        &self,
        req: pb::ContainerCheckpointEndRequest,
        timeout: Duration,
    ) -> Result<pb::CheckpointReply, AgentCallError> {
        AgentLink::checkpoint_end(self, req, timeout).await
    }

    async fn restore_stage(
        &self,
        req: pb::ContainerRestoreStageRequest,
        timeout: Duration,
    ) -> Result<pb::ContainerRestoreStageReply, AgentCallError> {
        AgentLink::restore_stage(self, req, timeout).await
    }

    async fn restore_end(
        &self,
        req: pb::ContainerRestoreEndRequest,
        timeout: Duration,
    ) -> Result<pb::ContainerRestoreEndReply, AgentCallError> {
        AgentLink::restore_end(self, req, timeout).await
    }
}

/// Opens a connection to the agent for one operation.
#[async_trait]
pub trait AgentConnector: Send + Sync + std::fmt::Debug {
    /// Connects within `timeout`.
    async fn connect(&self, timeout: Duration) -> Result<Arc<dyn GpuAgent>, AgentCallError>;
}

/// The agent at its Unix socket.
#[derive(Debug, Clone)]
pub struct AgentSocket(pub PathBuf);

#[async_trait]
impl AgentConnector for AgentSocket {
    async fn connect(&self, timeout: Duration) -> Result<Arc<dyn GpuAgent>, AgentCallError> {
        let link = AgentLink::connect(&self.0, timeout).await?;
        Ok(Arc::new(link))
    }
}
