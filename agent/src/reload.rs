//! Live reload of the config file. In a cluster the file is a mounted ConfigMap, which
//! kubelet updates by writing a new hidden directory and atomically swapping the `..data`
//! symlink; so the agent watches the file's directory (inotify), not the file, and re-reads
//! the file by its path after any change there. A new config is validated completely before
//! anything is applied; an invalid one is logged, counted and otherwise ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;

use crate::config::{AgentConfig, ConfigError};
use crate::metrics::Metrics;
use crate::node::{ApplyConfig, ConfigRejected, NodeAgent};

/// How long a burst of changes in the directory settles before the file is read.
const SETTLE: Duration = Duration::from_millis(100);

/// Where the agent's config comes from: an optional file plus command-line overrides.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// The config file; built-in defaults alone without one.
    pub path: Option<PathBuf>,
    /// `--socket`.
    pub socket: Option<PathBuf>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--metrics-addr`.
    pub metrics_addr: Option<SocketAddr>,
}

/// A validated config and what it was made of.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    /// The effective config (file, then flags, over the defaults).
    pub config: Arc<AgentConfig>,
    /// The file's text ("" without a file).
    pub text: String,
    /// Dotted keys the file sets.
    pub file_keys: BTreeSet<String>,
    /// Dotted keys a command-line flag sets.
    pub flag_keys: BTreeSet<String>,
    /// The file.
    pub path: Option<PathBuf>,
}

impl ConfigSource {
    /// Reads, parses and validates the config.
    pub fn load(&self) -> Result<LoadedConfig, ConfigError> {
        let text = match &self.path {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?,
            None => String::new(),
        };
        self.load_text(text)
    }

    /// Parses and validates `text` as the config file's content.
    pub fn load_text(&self, text: String) -> Result<LoadedConfig, ConfigError> {
        let (mut config, file_keys) = match &self.path {
            Some(path) => {
                let config = AgentConfig::from_text(path, &text)?;
                let table: toml::Table = toml::from_str(&text).unwrap_or_default();
                let mut keys = BTreeMap::new();
                flatten("", &toml::Value::Table(table), &mut keys);
                (config, keys.into_keys().collect())
            }
            None => (AgentConfig::default(), BTreeSet::new()),
        };
        let mut flag_keys = BTreeSet::new();
        if let Some(socket) = &self.socket {
            config.socket = socket.clone();
            flag_keys.insert("socket".to_owned());
        }
        if let Some(dir) = &self.state_dir {
            config.state_dir = dir.clone();
            flag_keys.insert("state_dir".to_owned());
        }
        if let Some(addr) = self.metrics_addr {
            config.metrics_addr = addr;
            flag_keys.insert("metrics_addr".to_owned());
        }
        config.validate()?;
        Ok(LoadedConfig {
            config: Arc::new(config),
            text,
            file_keys,
            flag_keys,
            path: self.path.clone(),
        })
    }
}

/// Every leaf of `value` as a dotted key and its TOML text.
pub fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
    match value {
        toml::Value::Table(table) => {
            for (key, v) in table {
                let full = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&full, v, out);
            }
        }
        leaf => {
            out.insert(prefix.to_owned(), leaf.to_string());
        }
    }
}

/// The keys a reload applies at once; every other key needs a restart of the agent.
pub fn is_live_key(key: &str) -> bool {
    matches!(
        key,
        "tiers.ram_budget_bytes" | "tiers.nvme_budget_bytes" | "timeouts.shim_lease_ms"
    ) || key.starts_with("tiers.ram.")
        || key.starts_with("tiers.nvme.")
        || key.starts_with("policy.")
        || key.starts_with("bandwidth.")
}

/// Keys whose value differs between `running` and `new` but only takes effect at a restart.
pub fn restart_keys(running: &AgentConfig, new: &AgentConfig) -> Vec<String> {
    let as_map = |config: &AgentConfig| {
        let mut out = BTreeMap::new();
        if let Ok(value) = toml::Value::try_from(config) {
            flatten("", &value, &mut out);
        }
        out
    };
    let (old, new_map) = (as_map(running), as_map(new));
    let mut keys: BTreeSet<String> = old.keys().chain(new_map.keys()).cloned().collect();
    keys.retain(|k| !is_live_key(k) && old.get(k) != new_map.get(k));
    let mut keys: Vec<String> = keys.into_iter().collect();
    if running.s3 != new.s3 {
        keys.push("s3".into());
    }
    keys
}

/// The running config with the live keys of `new` applied.
pub fn apply_live(running: &AgentConfig, new: &AgentConfig) -> AgentConfig {
    let mut merged = running.clone();
    merged.tiers.ram_budget_bytes = new.tiers.ram_budget_bytes;
    merged.tiers.nvme_budget_bytes = new.tiers.nvme_budget_bytes;
    merged.tiers.ram = new.tiers.ram.clone();
    merged.tiers.nvme = new.tiers.nvme.clone();
    merged.policy = new.policy.clone();
    merged.bandwidth = new.bandwidth.clone();
    // Leases granted from now on use it; running ones keep the length they were granted.
    merged.timeouts.shim_lease_ms = new.timeouts.shim_lease_ms;
    merged
}

/// Watches the config file's directory and hands every changed, valid config to `node`.
/// Returns once the watch is in place; the watching runs on a thread of its own.
pub fn watch(
    source: ConfigSource,
    initial_text: String,
    node: Addr<NodeAgent>,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    let Some(path) = source.path.clone() else {
        return Ok(());
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut events = inotify_on(&dir)?;
    std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || {
            let mut last = initial_text;
            let mut buf = [0u8; 4096];
            loop {
                match events.read(&mut buf) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::error!(dir = %dir.display(), error = %e, "config watch stopped; changes need a restart");
                        return;
                    }
                }
                std::thread::sleep(SETTLE);
                let text = match std::fs::read_to_string(&path) {
                    Ok(text) => text,
                    Err(_) if last == UNREADABLE => continue,
                    Err(e) => {
                        last = UNREADABLE.to_owned();
                        let e = ConfigError::Read {
                            path: path.clone(),
                            source: e,
                        };
                        reject(&node, &metrics, &path, &e);
                        continue;
                    }
                };
                if text == last {
                    continue;
                }
                match source.load_text(text.clone()) {
                    Ok(loaded) => {
                        last = text;
                        node.do_send(ApplyConfig(loaded));
                    }
                    Err(e) => {
                        last = text;
                        reject(&node, &metrics, &path, &e);
                    }
                }
            }
        })?;
    Ok(())
}

/// Stands for "the file could not be read" (TOML text never holds a NUL).
const UNREADABLE: &str = "\0";

fn reject(node: &Addr<NodeAgent>, metrics: &Metrics, path: &Path, error: &ConfigError) {
    tracing::error!(config = %path.display(), error = %error, "config change rejected; the agent keeps running on the previous config");
    metrics.config_reload("rejected");
    node.do_send(ConfigRejected(error.to_string()));
}

/// An inotify descriptor watching `dir` for entries written, created, moved in or removed.
fn inotify_on(dir: &Path) -> std::io::Result<std::fs::File> {
    let c_dir = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: inotify_init1 takes only flags.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own; OwnedFd closes it once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mask = libc::IN_CLOSE_WRITE
        | libc::IN_MOVED_TO
        | libc::IN_CREATE
        | libc::IN_DELETE
        | libc::IN_MOVED_FROM;
    // SAFETY: fd is a valid inotify descriptor and c_dir a NUL-terminated path.
    let wd = unsafe { libc::inotify_add_watch(fd, c_dir.as_ptr(), mask) };
    if wd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(std::fs::File::from(owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_policy_keys_are_live() {
        let running = AgentConfig::default();
        let mut new = running.clone();
        new.tiers.ram_budget_bytes = Some(1 << 20);
        new.tiers.ram.max_age_secs = 60;
        new.policy.nvme_keep_recent = 3;
        new.timeouts.dump_ms = 1;
        new.timeouts.shim_lease_ms = Some(5_000);
        new.socket = "/elsewhere.sock".into();
        assert_eq!(restart_keys(&running, &new), ["socket", "timeouts.dump_ms"]);
        let merged = apply_live(&running, &new);
        assert_eq!(merged.tiers.ram_budget_bytes, Some(1 << 20));
        assert_eq!(merged.tiers.ram.max_age_secs, 60);
        assert_eq!(merged.policy.nvme_keep_recent, 3);
        assert_eq!(merged.socket, running.socket);
        assert_eq!(merged.timeouts.dump_ms, running.timeouts.dump_ms);
        assert_eq!(merged.timeouts.shim_lease_ms, Some(5_000));
    }

    #[test]
    fn sources_name_file_and_flag_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        let source = ConfigSource {
            path: Some(path.clone()),
            state_dir: Some("/tmp/k".into()),
            ..ConfigSource::default()
        };
        let loaded = source
            .load_text("[tiers]\nram_budget_bytes = 1024\n[tiers.ram]\nmax_age_secs = 5\n".into())
            .unwrap();
        assert!(loaded.file_keys.contains("tiers.ram_budget_bytes"));
        assert!(loaded.file_keys.contains("tiers.ram.max_age_secs"));
        assert!(loaded.flag_keys.contains("state_dir"));
        assert_eq!(loaded.config.state_dir, Path::new("/tmp/k"));
        let err = source
            .load_text("[tiers]\nram_budget_bytes = -1\n".into())
            .unwrap_err();
        assert!(err.to_string().contains("ram_budget_bytes = -1"), "{err}");
    }
}
