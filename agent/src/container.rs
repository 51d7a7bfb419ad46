//! One actor per bare-process workload. It runs the workload's checkpoints and restores one
//! at a time (a second request waits until the first has finished) and writes the
//! workload's state into its watch channel ([`crate::workload_state`]), which the node agent
//! reads without a message.

use actix::prelude::*;
use kybernate_dataplane::TierKind;

use crate::catalog::CheckpointRecord;
use crate::checkpoint::{self, CheckpointJob};
use crate::error::AgentError;
use crate::node_parts::NodeParts;
use crate::restore::{self, RestoreOutcome};
use crate::workload_state::StateSender;
pub use crate::workload_state::WorkloadState;

/// Checkpoint this workload.
#[derive(Debug, Message)]
#[rtype(result = "Result<CheckpointRecord, AgentError>")]
pub struct RunCheckpoint(pub CheckpointJob);

/// Restore a checkpoint of this workload.
#[derive(Debug, Message)]
#[rtype(result = "Result<RestoreOutcome, AgentError>")]
pub struct RunRestore {
    /// The checkpoint.
    pub record: CheckpointRecord,
    /// Restore from this tier only.
    pub from: Option<TierKind>,
}

/// The actor of one workload (a bare process tree, keyed by its root PID).
#[derive(Debug)]
pub struct ContainerActor {
    parts: NodeParts,
    state: StateSender,
}

impl ContainerActor {
    /// The actor of a workload whose state goes into `state`.
    pub fn new(parts: NodeParts, state: StateSender) -> Self {
        Self { parts, state }
    }
}

impl Actor for ContainerActor {
    type Context = Context<Self>;
}

impl Handler<RunCheckpoint> for ContainerActor {
    type Result = AtomicResponse<Self, Result<CheckpointRecord, AgentError>>;

    fn handle(&mut self, msg: RunCheckpoint, _: &mut Self::Context) -> Self::Result {
        // The checkpoint's machine moves the workload's state.
        let work = checkpoint::run(self.parts.clone(), msg.0, self.state.clone());
        AtomicResponse::new(Box::pin(work.into_actor(self)))
    }
}

impl Handler<RunRestore> for ContainerActor {
    type Result = AtomicResponse<Self, Result<RestoreOutcome, AgentError>>;

    fn handle(&mut self, msg: RunRestore, _: &mut Self::Context) -> Self::Result {
        let before = self.state.send_replace(WorkloadState::Restoring);
        let work = restore::run(self.parts.clone(), msg.record, msg.from);
        AtomicResponse::new(Box::pin(work.into_actor(self).map(
            move |result, actor, _| {
                actor.state.send_replace(match &result {
                    Ok(_) => WorkloadState::Running,
                    Err(_) => before,
                });
                result
            },
        )))
    }
}
