//! One actor per workload. It owns the workload's lifecycle state and runs its checkpoints and
//! restores one at a time: a second request waits until the first has finished.

use std::fmt;
use std::sync::Arc;

use actix::prelude::*;
use kybernate_dataplane::TierKind;

use crate::catalog::CheckpointRecord;
use crate::checkpoint::{self, CheckpointJob};
use crate::error::AgentError;
use crate::node_parts::NodeParts;
use crate::restore::{self, RestoreOutcome};

/// Where a workload is in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadState {
    /// Running normally.
    Running,
    /// CUDA phase and CRIU dump in progress: the workload is (being) frozen.
    Freezing,
    /// Dumped; images are being stored in the tiers.
    Dumped,
    /// The last checkpoint is stored.
    Stored,
    /// A restore is in progress.
    Restoring,
    /// The last operation failed.
    Failed,
}

impl fmt::Display for WorkloadState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            WorkloadState::Running => "Running",
            WorkloadState::Freezing => "Freezing",
            WorkloadState::Dumped => "Dumped",
            WorkloadState::Stored => "Stored",
            WorkloadState::Restoring => "Restoring",
            WorkloadState::Failed => "Failed",
        };
        f.write_str(s)
    }
}

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

/// The workload's current state.
#[derive(Debug, Message)]
#[rtype(result = "WorkloadState")]
pub struct GetState;

/// The actor of one workload (a bare process tree, keyed by its root PID).
#[derive(Debug)]
pub struct ContainerActor {
    parts: NodeParts,
    state: Arc<tokio::sync::watch::Sender<WorkloadState>>,
}

impl ContainerActor {
    /// A workload that is running now.
    pub fn new(parts: NodeParts) -> Self {
        Self {
            parts,
            state: Arc::new(tokio::sync::watch::Sender::new(WorkloadState::Running)),
        }
    }
}

impl Actor for ContainerActor {
    type Context = Context<Self>;
}

impl Handler<RunCheckpoint> for ContainerActor {
    type Result = AtomicResponse<Self, Result<CheckpointRecord, AgentError>>;

    fn handle(&mut self, msg: RunCheckpoint, _: &mut Self::Context) -> Self::Result {
        self.state.send_replace(WorkloadState::Freezing);
        let leave_running = msg.0.leave_running;
        let state = self.state.clone();
        let work = checkpoint::run(self.parts.clone(), msg.0, move || {
            state.send_replace(WorkloadState::Dumped);
        });
        AtomicResponse::new(Box::pin(work.into_actor(self).map(
            move |result, actor, _| {
                let next = match (&result, leave_running) {
                    (Ok(_), true) => WorkloadState::Running,
                    (Ok(_), false) => WorkloadState::Stored,
                    // A failed dump resumed the workload.
                    (Err(AgentError::Criu { resumed: true, .. }), _) => WorkloadState::Running,
                    (Err(AgentError::InvalidTarget(_) | AgentError::Cuda { .. }), _) => {
                        WorkloadState::Running
                    }
                    (Err(AgentError::HeldPartially { .. }), true) => WorkloadState::Running,
                    (Err(AgentError::HeldPartially { .. }), false) => WorkloadState::Stored,
                    (Err(_), _) => WorkloadState::Failed,
                };
                actor.state.send_replace(next);
                result
            },
        )))
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

impl Handler<GetState> for ContainerActor {
    type Result = MessageResult<GetState>;
    fn handle(&mut self, _: GetState, _: &mut Self::Context) -> Self::Result {
        MessageResult(*self.state.borrow())
    }
}
