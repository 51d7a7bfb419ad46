//! What the node worker asks the node agent: a catalog record's GPU fingerprint, the live
//! restore prefetch tier, and the phase events.

use actix::prelude::*;
use kybernate_cuda::GpuFingerprint;
use kybernate_dataplane::{CheckpointName, TierKind};

use super::NodeAgent;
use crate::error::AgentError;

/// The GPUs checkpoint `0` ran on (`None`: a CPU-only workload).
#[derive(Debug, Message)]
#[rtype(result = "Result<Option<GpuFingerprint>, AgentError>")]
pub struct GpuOf(pub String);

impl Handler<GpuOf> for NodeAgent {
    type Result = Result<Option<GpuFingerprint>, AgentError>;

    fn handle(&mut self, msg: GpuOf, _: &mut Self::Context) -> Self::Result {
        let name = CheckpointName::new(&msg.0)?;
        self.catalog
            .get(&name)
            .map(|r| r.gpu.clone())
            .ok_or_else(|| AgentError::NotFound(name.to_string()))
    }
}

/// The tier announced restores are prefetched into, from the config running now (it is
/// reloaded live).
#[derive(Debug, Message)]
#[rtype(result = "TierKind")]
pub struct RestorePrefetchTier;

impl Handler<RestorePrefetchTier> for NodeAgent {
    type Result = MessageResult<RestorePrefetchTier>;

    fn handle(&mut self, _: RestorePrefetchTier, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.parts.config.policy.restore_prefetch_tier())
    }
}

/// A receiver of the agent's phase events (what `WatchEvents` streams), for the node
/// worker to follow a checkpoint's progress from dump to drain.
#[derive(Debug, Message)]
#[rtype(result = "tokio::sync::broadcast::Receiver<kybernate_proto::agent::v1::Event>")]
pub struct SubscribeEvents;

impl Handler<SubscribeEvents> for NodeAgent {
    type Result = MessageResult<SubscribeEvents>;

    fn handle(&mut self, _: SubscribeEvents, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.parts.events.subscribe())
    }
}
