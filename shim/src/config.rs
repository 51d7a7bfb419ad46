//! The shim's own configuration: where runc, its state and the agent are, and the timeout
//! of each checkpoint/restore phase. Read from a TOML file; every key has a default, so the
//! shim runs with no file at all.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default config file; `KYBERNATE_SHIM_CONFIG` names another.
pub const DEFAULT_CONFIG: &str = "/etc/kybernate/shim.toml";

/// Shim configuration.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ShimConfig {
    /// runc binary (name on PATH or path).
    pub runc: PathBuf,
    /// runc state root; the namespace is appended.
    pub runc_root: PathBuf,
    /// The Kybernate agent's socket.
    pub agent_socket: PathBuf,
    /// Per-phase timeouts.
    pub timeouts: PhaseTimeouts,
}

/// Timeout of each phase, in milliseconds.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PhaseTimeouts {
    /// Asking the agent (connect, node devices, staging, storing).
    pub agent_ms: u64,
    /// The agent's CUDA lock + checkpoint of the container's processes.
    pub cuda_ms: u64,
    /// `runc checkpoint`.
    pub dump_ms: u64,
    /// `runc restore`.
    pub restore_ms: u64,
    /// How long a checkpoint's handoff to the agent waits for containerd to resume the task
    /// (containerd archives its own copy meanwhile) before it copies the images anyway.
    pub handoff_wait_ms: u64,
}

impl Default for PhaseTimeouts {
    fn default() -> Self {
        Self {
            agent_ms: 600_000,
            cuda_ms: 120_000,
            dump_ms: 600_000,
            restore_ms: 600_000,
            handoff_wait_ms: 120_000,
        }
    }
}

impl Default for ShimConfig {
    fn default() -> Self {
        Self {
            runc: PathBuf::from("runc"),
            runc_root: PathBuf::from("/run/kybernate/runc"),
            agent_socket: PathBuf::from("/run/kybernate/agent.sock"),
            timeouts: PhaseTimeouts::default(),
        }
    }
}

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("shim config {}: {message}", path.display())]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub message: String,
}

impl ShimConfig {
    /// Reads `path`; a missing file gives the defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|e| ConfigError {
                path: path.to_owned(),
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(ConfigError {
                path: path.to_owned(),
                message: e.to_string(),
            }),
        }
    }

    /// The config named by `KYBERNATE_SHIM_CONFIG`, else [`DEFAULT_CONFIG`].
    pub fn from_env() -> Result<Self, ConfigError> {
        let path = std::env::var_os("KYBERNATE_SHIM_CONFIG")
            .map_or_else(|| PathBuf::from(DEFAULT_CONFIG), PathBuf::from);
        Self::load(&path)
    }
}

/// A duration of `ms` milliseconds.
pub fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_gives_defaults_and_keys_override() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            ShimConfig::load(&dir.path().join("none.toml")).unwrap(),
            ShimConfig::default()
        );
        let file = dir.path().join("shim.toml");
        std::fs::write(
            &file,
            "agent_socket = \"/tmp/a.sock\"\n[timeouts]\ndump_ms = 5\n",
        )
        .unwrap();
        let config = ShimConfig::load(&file).unwrap();
        assert_eq!(config.agent_socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(config.timeouts.dump_ms, 5);
        assert_eq!(config.timeouts.cuda_ms, PhaseTimeouts::default().cuda_ms);
    }

    #[test]
    fn unknown_keys_are_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("shim.toml");
        std::fs::write(&file, "dump_timeout = 5\n").unwrap();
        let e = ShimConfig::load(&file).unwrap_err().to_string();
        assert!(e.contains("shim.toml") && e.contains("dump_timeout"), "{e}");
    }
}
