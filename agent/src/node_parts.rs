//! The actors and settings every workload's operations use.

use std::sync::Arc;

use actix::Addr;
use kybernate_dataplane::LocalDirTier;

use crate::bandwidth::Bandwidth;
use crate::config::AgentConfig;
use crate::criu::CriuRunner;
use crate::cuda::CudaActor;
use crate::events::EventBus;
use crate::journal::Journal;
use crate::metrics::Metrics;
use crate::tiers::Tiers;

/// Handles to the node-wide actors, cloned into each container actor.
#[derive(Clone, Debug)]
pub struct NodeParts {
    /// The CRIU runner.
    pub criu: Addr<CriuRunner>,
    /// The CUDA session.
    pub cuda: Addr<CudaActor>,
    /// The RAM tier's directory layout: CRIU writes into it and restores from it.
    pub ram: Arc<LocalDirTier>,
    /// Every tier's actor, nearest first.
    pub tiers: Tiers,
    /// The agent's configuration.
    pub config: Arc<AgentConfig>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Progress events.
    pub events: EventBus,
    /// The byte-rate limits in force (replaced on reload).
    pub bandwidth: Arc<Bandwidth>,
    /// The journal of transitions recovery needs.
    pub journal: Arc<Journal>,
    /// The pods of this node (from the node worker), for the service account of a
    /// container checkpoint's origin.
    pub pods: crate::tenancy::PodDirectory,
}
