//! The shim's errors, each naming the container and the step that failed, and their
//! mapping to ttrpc status codes in one place.

use containerd_shim::protos::ttrpc::{self, Code};

/// Why a task request failed.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// No such container or exec process in this shim.
    #[error("container {id}: {what} not found")]
    NotFound {
        /// Container id.
        id: String,
        /// What was looked up (process, exec id).
        what: String,
    },
    /// The request does not fit the process's state (e.g. start twice, kill after exit).
    #[error("container {id}: {message}")]
    State {
        /// Container id.
        id: String,
        /// What is wrong.
        message: String,
    },
    /// The request itself is malformed.
    #[error("container {id}: invalid request: {message}")]
    Invalid {
        /// Container id.
        id: String,
        /// What is wrong.
        message: String,
    },
    /// A runc command failed; `output` carries runc's own error text.
    #[error("container {id}: runc {command} failed: {output}")]
    Runc {
        /// Container id.
        id: String,
        /// The runc sub-command.
        command: String,
        /// runc's stderr or log.
        output: String,
    },
    /// A runc command ran past its deadline; it was killed with its process group.
    #[error("container {id}: runc {command} took longer than {millis} ms and was killed")]
    Timeout {
        /// Container id.
        id: String,
        /// The runc sub-command.
        command: String,
        /// The deadline.
        millis: u64,
    },
    /// A checkpoint or restore phase failed; the container was left as it was.
    #[error("container {id}: {operation} failed in phase {phase}: {message}")]
    Phase {
        /// Container id.
        id: String,
        /// "checkpoint" or "restore".
        operation: &'static str,
        /// The phase that failed, e.g. `gpu_validate`, `agent_cuda`, `criu_dump`.
        phase: &'static str,
        /// What went wrong.
        message: String,
    },
    /// Local I/O (bundle files, FIFOs, mounts).
    #[error("container {id}: {context}: {source}")]
    Io {
        /// Container id.
        id: String,
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl ShimError {
    /// An I/O error while doing `context` for container `id`.
    pub fn io(id: &str, context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            id: id.to_owned(),
            context: context.into(),
            source,
        }
    }

    fn code(&self) -> Code {
        match self {
            Self::NotFound { .. } => Code::NOT_FOUND,
            Self::State { .. } => Code::FAILED_PRECONDITION,
            Self::Invalid { .. } => Code::INVALID_ARGUMENT,
            Self::Timeout { .. } => Code::DEADLINE_EXCEEDED,
            Self::Runc { .. } | Self::Phase { .. } | Self::Io { .. } => Code::UNKNOWN,
        }
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

/// Result of a shim operation.
pub type Result<T> = std::result::Result<T, ShimError>;
