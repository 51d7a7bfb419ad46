//! The gRPC API on the agent's Unix socket. Only root and configured uids may call it: the
//! caller's uid comes from the kernel (SO_PEERCRED), not from anything the caller says.

use std::pin::Pin;
use std::sync::Arc;

use actix::Addr;
use kybernate_proto::agent::v1 as pb;
use kybernate_proto::agent::v1::agent_server::Agent;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use crate::error::AgentError;
use crate::events::EventBus;
use crate::node::{self, NodeAgent};

/// The Agent service, answering through the node agent actor.
#[derive(Debug, Clone)]
pub struct AgentService {
    node: Addr<NodeAgent>,
    events: EventBus,
    gpu_uuids: Arc<Vec<String>>,
    /// The NVMe tier, for re-encryption (a tier operation of its own, safe beside the
    /// node's work: it takes the checkpoint's store guard).
    nvme: Option<Arc<kybernate_dataplane::NvmeTier>>,
}

impl AgentService {
    /// A service in front of `node`.
    pub fn new(node: Addr<NodeAgent>, events: EventBus) -> Self {
        Self {
            node,
            events,
            gpu_uuids: Arc::new(Vec::new()),
            nvme: None,
        }
    }

    /// Serves `kybernatectl reencrypt` on `nvme`.
    pub fn with_nvme(mut self, nvme: Arc<kybernate_dataplane::NvmeTier>) -> Self {
        self.nvme = Some(nvme);
        self
    }

    /// The UUIDs of the GPUs the CUDA driver enumerates, reported to the shim with the
    /// device nodes: device plugins name a container's GPUs by UUID in
    /// `NVIDIA_VISIBLE_DEVICES`.
    pub fn with_gpu_uuids(mut self, uuids: Vec<String>) -> Self {
        self.gpu_uuids = Arc::new(uuids);
        self
    }
}

/// Rejects callers that are neither root nor in `allowed_uids`.
pub fn authorise<T>(allowed_uids: &Arc<Vec<u32>>, request: &Request<T>) -> Result<(), Status> {
    let cred = request
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .ok_or_else(|| {
            Status::permission_denied(
                "caller credentials are unknown; only Unix socket peers are served",
            )
        })?;
    let uid = cred.uid();
    if uid == 0 || allowed_uids.contains(&uid) {
        Ok(())
    } else {
        tracing::warn!(uid, pid = ?cred.pid(), "refused a caller that is not authorised");
        Err(Status::permission_denied(format!(
            "uid {uid} is not authorised to use the Kybernate agent (allowed: root{})",
            allowed_uids
                .iter()
                .map(|u| format!(", {u}"))
                .collect::<String>()
        )))
    }
}

async fn ask<M>(node: &Addr<NodeAgent>, msg: M) -> Result<M::Result, Status>
where
    M: actix::Message + Send + 'static,
    M::Result: Send,
    NodeAgent: actix::Handler<M>,
{
    node.send(msg)
        .await
        .map_err(|e| Status::from(AgentError::from(e)))
}

/// Stream of events sent to a WatchEvents caller.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    async fn checkpoint(
        &self,
        request: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::CheckpointReply>, Status> {
        let reply = ask(&self.node, node::Checkpoint(request.into_inner())).await??;
        Ok(Response::new(reply))
    }

    async fn restore(
        &self,
        request: Request<pb::RestoreRequest>,
    ) -> Result<Response<pb::RestoreReply>, Status> {
        let reply = ask(&self.node, node::Restore(request.into_inner())).await??;
        Ok(Response::new(reply))
    }

    async fn list(&self, _: Request<pb::ListRequest>) -> Result<Response<pb::ListReply>, Status> {
        let checkpoints = ask(&self.node, node::List).await??;
        Ok(Response::new(pb::ListReply { checkpoints }))
    }

    async fn inspect(
        &self,
        request: Request<pb::InspectRequest>,
    ) -> Result<Response<pb::CheckpointInfo>, Status> {
        let info = ask(
            &self.node,
            node::Inspect(request.into_inner().checkpoint_ref),
        )
        .await??;
        Ok(Response::new(info))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteReply>, Status> {
        let removed_from = ask(
            &self.node,
            node::Delete(request.into_inner().checkpoint_ref),
        )
        .await??;
        Ok(Response::new(pb::DeleteReply { removed_from }))
    }

    async fn reencrypt(
        &self,
        request: Request<pb::ReencryptRequest>,
    ) -> Result<Response<pb::ReencryptReply>, Status> {
        let name = kybernate_dataplane::CheckpointName::new(&request.into_inner().checkpoint_ref)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let nvme = self
            .nvme
            .clone()
            .ok_or_else(|| Status::failed_precondition("this agent serves no NVMe tier"))?;
        let done = tokio::task::spawn_blocking(move || nvme.reencrypt(&name))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| match e {
                kybernate_dataplane::TierError::NotFound { .. } => Status::not_found(e.to_string()),
                e => Status::failed_precondition(e.to_string()),
            })?;
        tracing::info!(from = ?done.from, to = %done.to, unchanged = done.unchanged, "re-encrypted a checkpoint");
        Ok(Response::new(pb::ReencryptReply {
            from_key: done.from.map(|k| k.to_string()).unwrap_or_default(),
            to_key: done.to.to_string(),
            unchanged: done.unchanged,
        }))
    }

    async fn prefetch(
        &self,
        request: Request<pb::PrefetchRequest>,
    ) -> Result<Response<pb::PrefetchReply>, Status> {
        let reply = ask(&self.node, node::Prefetch(request.into_inner())).await??;
        Ok(Response::new(reply))
    }

    async fn node_devices(
        &self,
        _: Request<pb::NodeDevicesRequest>,
    ) -> Result<Response<pb::NodeDevicesReply>, Status> {
        let mut reply = crate::node_devices::probe(std::path::Path::new("/dev"));
        reply.gpu_uuids = self.gpu_uuids.as_ref().clone();
        Ok(Response::new(reply))
    }

    async fn container_checkpoint_begin(
        &self,
        request: Request<pb::ContainerCheckpointBeginRequest>,
    ) -> Result<Response<pb::ContainerCheckpointBeginReply>, Status> {
        let msg = node::ContainerCheckpointBegin(request.into_inner());
        Ok(Response::new(ask(&self.node, msg).await??))
    }

    async fn container_checkpoint_end(
        &self,
        request: Request<pb::ContainerCheckpointEndRequest>,
    ) -> Result<Response<pb::CheckpointReply>, Status> {
        let msg = node::ContainerCheckpointEnd(request.into_inner());
        Ok(Response::new(ask(&self.node, msg).await??))
    }

    async fn container_restore_stage(
        &self,
        request: Request<pb::ContainerRestoreStageRequest>,
    ) -> Result<Response<pb::ContainerRestoreStageReply>, Status> {
        let msg = node::ContainerRestoreStage(request.into_inner());
        Ok(Response::new(ask(&self.node, msg).await??))
    }

    async fn container_restore_end(
        &self,
        request: Request<pb::ContainerRestoreEndRequest>,
    ) -> Result<Response<pb::ContainerRestoreEndReply>, Status> {
        let msg = node::ContainerRestoreEnd(request.into_inner());
        Ok(Response::new(ask(&self.node, msg).await??))
    }

    async fn pin(
        &self,
        request: Request<pb::PinRequest>,
    ) -> Result<Response<pb::PinReply>, Status> {
        let reply = ask(&self.node, node::Pin(request.into_inner())).await??;
        Ok(Response::new(reply))
    }

    async fn unpin(
        &self,
        request: Request<pb::UnpinRequest>,
    ) -> Result<Response<pb::UnpinReply>, Status> {
        let reply = ask(&self.node, node::Unpin(request.into_inner())).await??;
        Ok(Response::new(reply))
    }

    async fn config_show(
        &self,
        _: Request<pb::ConfigShowRequest>,
    ) -> Result<Response<pb::ConfigShowReply>, Status> {
        Ok(Response::new(ask(&self.node, node::ConfigShow).await?))
    }

    async fn tier_status(
        &self,
        _: Request<pb::TierStatusRequest>,
    ) -> Result<Response<pb::TierStatusReply>, Status> {
        Ok(Response::new(ask(&self.node, node::TierStatus).await??))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let only = request.into_inner().checkpoint_ref;
        let stream =
            BroadcastStream::new(self.events.subscribe()).filter_map(move |event| match event {
                Ok(event) if only.is_empty() || event.checkpoint_ref == only => Some(Ok(event)),
                Ok(_) => None,
                Err(lagged) => Some(Err(Status::data_loss(format!(
                    "event stream fell behind: {lagged}"
                )))),
            });
        Ok(Response::new(Box::pin(stream)))
    }
}
