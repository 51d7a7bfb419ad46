//! The bodies of Kybernate's fuzz targets. Each takes the raw bytes a fuzzer made up and feeds
//! them to one parser or validator that reads data from outside the agent's trust: manifests
//! and records that other nodes wrote into a shared bucket, rootfs diffs that travel with a
//! checkpoint, the config file and gRPC requests. A body returns whether the input was
//! accepted; it panics only when the code under test misbehaves (a panic of its own, or an
//! accepted value that breaks a property the body asserts, such as a round trip).
//!
//! The coverage-guided fuzzer (`fuzz/`, run by `scripts/fuzz.sh`) and the corpus replay test
//! (`tests/corpus_replay.rs`) both call these functions, so every crash the fuzzer found stays
//! a regression test in CI.

mod config;
mod manifest;
mod record;
mod request;
mod rootfs_diff;

pub use config::config;
pub use manifest::manifest;
pub use record::record;
pub use request::request;
pub use rootfs_diff::rootfs_diff;

/// What the code under test made of an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The input parsed and passed validation.
    Accepted,
    /// The input was refused with this error.
    Rejected(String),
}

impl<E: std::fmt::Display> From<Result<(), E>> for Verdict {
    fn from(result: Result<(), E>) -> Self {
        match result {
            Ok(()) => Verdict::Accepted,
            Err(e) => Verdict::Rejected(e.to_string()),
        }
    }
}

/// A target body.
pub type TargetBody = fn(&[u8]) -> Verdict;

/// Every target by the name `scripts/fuzz.sh` and the corpus directories use.
pub const TARGETS: [(&str, TargetBody); 5] = [
    ("manifest", manifest),
    ("record", record),
    ("rootfs_diff", rootfs_diff),
    ("config", config),
    ("request", request),
];
