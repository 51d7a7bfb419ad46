//! The agent's error type: every failure names the checkpoint, the phase and the cause, maps
//! to one gRPC status and one metric label.

use kybernate_dataplane::{InvalidName, TierError, TierKind};

use crate::catalog::{CatalogError, CheckpointRecord};
use crate::criu::CriuError;
use crate::cuda::CudaPhaseError;
use crate::process::{ProcStat, TargetError};

/// A checkpoint, restore or query failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request is malformed.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The checkpoint name is not acceptable.
    #[error(transparent)]
    InvalidName(#[from] InvalidName),
    /// The process cannot be checkpointed.
    #[error(transparent)]
    InvalidTarget(#[from] TargetError),
    /// A checkpoint with that name exists or is being taken.
    #[error("checkpoint {0} already exists")]
    AlreadyExists(String),
    /// Something on the node already holds data under the name.
    #[error("checkpoint name {name} is taken: {by}; delete it (kybernatectl delete {name}) or choose another name")]
    NameInUse {
        /// The name.
        name: String,
        /// What holds it.
        by: String,
    },
    /// No checkpoint with that name.
    #[error("no checkpoint named {0}")]
    NotFound(String),
    /// The checkpoint is busy with another operation.
    #[error("checkpoint {0} is busy with another operation; try again when it finishes")]
    Busy(String),
    /// The CUDA phase failed (everything touched was rolled back).
    #[error("checkpoint {name}: CUDA phase failed: {source}")]
    Cuda {
        /// Checkpoint.
        name: String,
        /// Cause.
        #[source]
        source: CudaPhaseError,
    },
    /// CRIU failed; the workload was resumed.
    #[error("checkpoint {name}: {source}{}", if *.resumed { "; the workload was resumed and keeps running" } else { "" })]
    Criu {
        /// Checkpoint.
        name: String,
        /// Cause.
        #[source]
        source: CriuError,
        /// Whether the workload was resumed (dumps only).
        resumed: bool,
    },
    /// A tier failed.
    #[error("checkpoint {name}: {phase}: {source}")]
    Tier {
        /// Checkpoint.
        name: String,
        /// Phase, e.g. `store_nvme`.
        phase: String,
        /// Cause.
        #[source]
        source: Box<TierError>,
    },
    /// The image set is damaged in every tier that holds it.
    #[error("checkpoint {name}: {detail}")]
    Images {
        /// Checkpoint.
        name: String,
        /// Which tiers were tried and what each held.
        detail: String,
    },
    /// The checkpoint is held by no tier.
    #[error("checkpoint {name} is in no tier any more (tiers: {tiers})")]
    NoCopy {
        /// Checkpoint.
        name: String,
        /// The tiers that were asked.
        tiers: String,
    },
    /// The PID to restore into is still taken.
    #[error("cannot restore checkpoint {name}: PID {pid} is still in use{}", stat.map(|s| format!(" (state {})", s.state)).unwrap_or_default())]
    PidInUse {
        /// Checkpoint.
        name: String,
        /// The PID.
        pid: i32,
        /// The process holding it.
        stat: Option<ProcStat>,
    },
    /// The checkpoint was taken but could not be stored in every tier; it is kept in the
    /// tiers that hold it.
    #[error("checkpoint {} was taken and is kept in {tiers} only: {source}", record.name)]
    HeldPartially {
        /// The checkpoint, to be recorded all the same.
        record: Box<CheckpointRecord>,
        /// The tiers that hold it.
        tiers: String,
        /// Why the next tier failed.
        #[source]
        source: Box<AgentError>,
    },
    /// The checkpoint record could not be saved or read.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// A phase ran past its deadline.
    #[error("checkpoint {name}: {phase} timed out after {millis} ms")]
    Timeout {
        /// Checkpoint.
        name: String,
        /// Phase.
        phase: String,
        /// The deadline.
        millis: u64,
    },
    /// containerd (or the container's shim behind it) refused or failed a container
    /// checkpoint; the shim rolled back, so the container keeps running.
    #[error(transparent)]
    Containerd(#[from] crate::containerd::ContainerdError),
    /// The checkpoint belongs to another tenant than the pod that asked for it.
    #[error(transparent)]
    RestoreRefused(#[from] crate::tenancy::Refused),
    /// The agent is shutting down or an internal channel broke.
    #[error("agent internal error: {0}")]
    Internal(String),
}

impl AgentError {
    /// Short, stable label for the `reason` of failure metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            AgentError::InvalidRequest(_) | AgentError::InvalidName(_) => "invalid_request",
            AgentError::InvalidTarget(_) => "invalid_target",
            AgentError::AlreadyExists(_) | AgentError::NameInUse { .. } => "already_exists",
            AgentError::NotFound(_) => "not_found",
            AgentError::Busy(_) => "busy",
            AgentError::Cuda { source, .. } => source.metric_label(),
            AgentError::Criu { source, .. } => source.metric_label(),
            AgentError::Tier { source, .. } => source.metric_label(),
            AgentError::HeldPartially { source, .. } => source.metric_label(),
            AgentError::Images { .. } => "corrupt",
            AgentError::NoCopy { .. } => "no_copy",
            AgentError::PidInUse { .. } => "pid_in_use",
            AgentError::Catalog(_) => "catalog",
            AgentError::Timeout { .. } => "timeout",
            AgentError::Containerd(e) => match e.code {
                tonic::Code::NotFound => "not_found",
                tonic::Code::Unavailable => "containerd_unavailable",
                tonic::Code::FailedPrecondition => "invalid_target",
                _ => "containerd",
            },
            AgentError::RestoreRefused(_) => "refused_tenant",
            AgentError::Internal(_) => "internal",
        }
    }
}

impl From<actix::MailboxError> for AgentError {
    fn from(e: actix::MailboxError) -> Self {
        AgentError::Internal(format!("actor mailbox: {e}"))
    }
}

impl From<AgentError> for tonic::Status {
    fn from(e: AgentError) -> Self {
        let message = e.to_string();
        match e {
            AgentError::InvalidRequest(_)
            | AgentError::InvalidName(_)
            | AgentError::InvalidTarget(_) => tonic::Status::invalid_argument(message),
            AgentError::AlreadyExists(_) | AgentError::NameInUse { .. } => {
                tonic::Status::already_exists(message)
            }
            AgentError::NotFound(_) => tonic::Status::not_found(message),
            AgentError::Busy(_) | AgentError::PidInUse { .. } => {
                tonic::Status::failed_precondition(message)
            }
            AgentError::Images { .. } | AgentError::NoCopy { .. } => {
                tonic::Status::data_loss(message)
            }
            AgentError::Timeout { .. } => tonic::Status::deadline_exceeded(message),
            AgentError::Cuda { .. }
            | AgentError::HeldPartially { .. }
            | AgentError::Criu { .. }
            | AgentError::Tier { .. }
            | AgentError::Catalog(_) => tonic::Status::aborted(message),
            AgentError::Containerd(e) => match e.code {
                tonic::Code::NotFound
                | tonic::Code::FailedPrecondition
                | tonic::Code::InvalidArgument
                | tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded => tonic::Status::new(e.code, message),
                _ => tonic::Status::aborted(message),
            },
            AgentError::RestoreRefused(_) => tonic::Status::permission_denied(message),
            AgentError::Internal(_) => tonic::Status::internal(message),
        }
    }
}

/// Names of tiers, joined for messages.
pub fn tier_list(tiers: &[TierKind]) -> String {
    tiers
        .iter()
        .map(|t| t.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
