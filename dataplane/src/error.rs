//! Errors of tier operations, each naming the tier, checkpoint and path involved.

use std::path::PathBuf;

use crate::{CheckpointName, TierKind};

/// A tier operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    /// The tier does not hold the checkpoint.
    #[error("{tier} tier holds no checkpoint named {name}")]
    NotFound {
        /// Tier that was asked.
        tier: TierKind,
        /// Checkpoint that was asked for.
        name: CheckpointName,
    },
    /// A file system operation failed.
    #[error("{tier} tier: {op} {}: {source}", path.display())]
    Io {
        /// Tier the operation ran on.
        tier: TierKind,
        /// What was being done, e.g. "copy", "create directory".
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The stored data is not what was written.
    #[error("{tier} tier: checkpoint {name} is corrupt: {detail}")]
    Corrupt {
        /// Tier holding the bad copy.
        tier: TierKind,
        /// Affected checkpoint.
        name: CheckpointName,
        /// Which file or chunk and what is wrong.
        detail: String,
    },
    /// The object store refused or failed a request (after retries where they apply).
    #[error("{tier} tier: {op} {key}: {detail}")]
    Remote {
        /// Tier the request went to.
        tier: TierKind,
        /// What was being done, e.g. "upload part 3 of", "get".
        op: String,
        /// Object key (or bucket) involved.
        key: String,
        /// The server's or client's message, never containing credentials.
        detail: String,
    },
    /// CRIU's image stream (`criu dump --stream` / `criu restore --stream`) failed or was
    /// stopped: the store or load it fed keeps nothing.
    #[error("{tier} tier: image stream of checkpoint {name}: {detail}")]
    Stream {
        /// Tier the stream went to or came from.
        tier: TierKind,
        /// Checkpoint being streamed.
        name: CheckpointName,
        /// What went wrong.
        detail: String,
    },
    /// The operation was cancelled (its timeout passed or its caller went away); it stopped
    /// and removed what it had written.
    #[error("{tier} tier: cancelled: {detail}")]
    Cancelled {
        /// Tier the operation ran on.
        tier: TierKind,
        /// Which operation.
        detail: String,
    },
    /// The tier already holds a different checkpoint under this name: another node (or an
    /// earlier checkpoint of the same name) wrote it, and it is never overwritten.
    #[error("{tier} tier: checkpoint {name} already exists with other contents: {detail}")]
    AlreadyExists {
        /// Tier holding the other checkpoint.
        tier: TierKind,
        /// The name both use.
        name: CheckpointName,
        /// What differs and what to do.
        detail: String,
    },
    /// The checkpoint cannot be opened with the node's keys, or its format is not accepted
    /// by the encryption settings.
    #[error("{tier} tier: checkpoint {name} cannot be opened: {detail}")]
    Sealing {
        /// Tier holding the checkpoint.
        tier: TierKind,
        /// The checkpoint.
        name: CheckpointName,
        /// Which key is missing or which format is refused.
        detail: String,
    },
    /// The tier's configuration cannot work.
    #[error("{tier} tier: invalid configuration: {detail}")]
    Config {
        /// Tier being configured.
        tier: TierKind,
        /// What is wrong.
        detail: String,
    },
}

impl TierError {
    /// Short, stable label for metrics (`reason` label of failure counters).
    pub fn metric_label(&self) -> &'static str {
        match self {
            TierError::NotFound { .. } => "not_found",
            TierError::Io { .. } => "io",
            TierError::Corrupt { .. } => "corrupt",
            TierError::Remote { .. } => "remote",
            TierError::Config { .. } => "config",
            TierError::Stream { .. } => "stream",
            TierError::Cancelled { .. } => "cancelled",
            TierError::AlreadyExists { .. } => "already_exists",
            TierError::Sealing { .. } => "sealing",
        }
    }
}
