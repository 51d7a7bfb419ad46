//! The agent's configuration: one TOML file with built-in defaults, so the agent starts
//! with no file at all. Command-line flags override the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kybernate_dataplane::{ChunkConfig, IoMode, S3Config, Secret};
use serde::{Deserialize, Serialize};

mod bandwidth;
mod policy;
pub use bandwidth::BandwidthConfig;
pub use policy::{PolicyConfig, TierPolicy};

/// Default agent socket.
pub use kybernate_client::DEFAULT_AGENT_SOCKET as DEFAULT_SOCKET;
/// Default state directory (checkpoint records, logs, the NVMe tier).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/kybernate";
/// Default RAM tier, on tmpfs, used when the state directory is the default one.
pub const DEFAULT_RAM_TIER: &str = "/dev/shm/kybernate";

/// Everything the agent can be told, with defaults for every value.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Unix socket of the gRPC API.
    pub socket: PathBuf,
    /// Checkpoint records, CRIU logs and (by default) the NVMe tier live here.
    pub state_dir: PathBuf,
    /// Besides root, the uids allowed to use the socket.
    pub allowed_uids: Vec<u32>,
    /// Where Prometheus metrics are served over HTTP.
    pub metrics_addr: SocketAddr,
    /// The CRIU binary (4.2 or newer), looked up on PATH when not absolute.
    pub criu_path: PathBuf,
    /// containerd's API socket: container checkpoints go through containerd to the
    /// container's kybernate shim.
    pub containerd_socket: PathBuf,
    /// Storage tiers.
    pub tiers: TiersConfig,
    /// Per-phase timeouts.
    pub timeouts: TimeoutsConfig,
    /// How images are chunked and compressed on their way to NVMe and S3.
    pub dataplane: DataplaneConfig,
    /// What the agent keeps close (reloaded live).
    pub policy: PolicyConfig,
    /// Byte-rate limits of the agent's transfers (reloaded live).
    pub bandwidth: BandwidthConfig,
    /// The S3 tier; absent means no S3 tier. Credentials never come from this file but from
    /// the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`),
    /// which a Kubernetes Secret fills.
    #[serde(skip_serializing)]
    pub s3: Option<S3Config>,
    /// Encryption at rest; absent means checkpoints are stored unencrypted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encryption: Option<crate::encryption::EncryptionConfig>,
}

/// Chunking and compression of the data plane.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DataplaneConfig {
    /// Chunk size in MiB.
    pub chunk_size_mib: usize,
    /// zstd level, 1..=19.
    pub zstd_level: i32,
    /// Chunks hashed and compressed at once by the node's data plane, over all checkpoints,
    /// restores and drains together; 0 means one per core. Checkpoints and restores may use
    /// them all (the workload is frozen or not running yet).
    pub workers: usize,
    /// How many of `workers` prefetches, drains and demotions may use together, which run
    /// beside the workload and leave its threads the rest; 0 means half of `workers`, at
    /// least one.
    pub background_workers: usize,
    /// How chunks are written: `auto` (io_uring when the kernel offers every operation the
    /// data plane uses, else pread/pwrite, saying why in one log line), `uring` (refuse to
    /// start without it) or `pread`. The environment variable `KYBERNATE_DATAPLANE_IO`
    /// overrides this.
    pub io: IoMode,
    /// Stream CRIU's images straight between CRIU and the NVMe tier (`criu --stream`): a
    /// checkpoint asked for NVMe or S3 never lands in the RAM tier, and a restore whose
    /// nearest copy is on NVMe reads it from there. Off: every checkpoint is written into the
    /// RAM tier first and drained, as before.
    pub stream: bool,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        let chunk = ChunkConfig::default();
        Self {
            chunk_size_mib: chunk.chunk_size >> 20,
            zstd_level: chunk.zstd_level,
            workers: chunk.workers,
            background_workers: chunk.background_workers,
            io: IoMode::Auto,
            stream: false,
        }
    }
}

impl DataplaneConfig {
    /// The data plane's own form of these settings. A chunk size too large for bytes
    /// saturates (and fails validation) rather than wrapping to a small valid one.
    pub fn chunk_config(&self) -> ChunkConfig {
        ChunkConfig {
            chunk_size: self.chunk_size_mib.saturating_mul(1 << 20),
            zstd_level: self.zstd_level,
            workers: self.workers,
            background_workers: self.background_workers,
            ..ChunkConfig::default()
        }
    }
}

/// Where the tiers keep their data.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TiersConfig {
    /// RAM tier directory (tmpfs). Default: `/dev/shm/kybernate` with the default state
    /// directory, else `<state_dir>/ram`, so agents with their own state dirs never share it.
    pub ram_path: Option<PathBuf>,
    /// NVMe tier directory. Default: `<state_dir>/nvme`.
    pub nvme_path: Option<PathBuf>,
    /// Bytes the RAM tier may hold before the least recently used checkpoints are demoted.
    /// Default: 25% of the node's memory.
    pub ram_budget_bytes: Option<u64>,
    /// Bytes the NVMe tier may hold before checkpoints are demoted to S3 (only with an S3
    /// tier: the last copy is never dropped). Default: no limit.
    pub nvme_budget_bytes: Option<u64>,
    /// Watermarks and age limit of the RAM tier (`[tiers.ram]`).
    pub ram: TierPolicy,
    /// Watermarks and age limit of the NVMe tier (`[tiers.nvme]`; applied only with an S3
    /// tier to demote into).
    pub nvme: TierPolicy,
}

/// Timeouts, in milliseconds, for each phase of a checkpoint or restore.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// CUDA lock + checkpoint, and CUDA restore + unlock.
    pub cuda_ms: u64,
    /// CRIU dump (the workload's freeze window).
    pub dump_ms: u64,
    /// Storing the images into the slower tiers.
    pub store_ms: u64,
    /// Loading the images back and running CRIU restore.
    pub restore_ms: u64,
    /// Waiting for a dumped process's PID to be released before restoring it.
    pub pid_release_ms: u64,
    /// How long a container checkpoint the shim began (or a restore it staged) may go
    /// without its End before the agent settles it itself: CUDA given back, the name
    /// released, a completed stop-mode dump adopted ([`TimeoutsConfig::shim_lease`]).
    /// Default: the longer of `dump_ms` and `restore_ms`, plus 60 s. Reloaded live.
    pub shim_lease_ms: Option<u64>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            allowed_uids: Vec::new(),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 9464)),
            criu_path: PathBuf::from("criu"),
            containerd_socket: PathBuf::from(crate::containerd::DEFAULT_CONTAINERD_SOCKET),
            tiers: TiersConfig::default(),
            timeouts: TimeoutsConfig::default(),
            dataplane: DataplaneConfig::default(),
            policy: PolicyConfig::default(),
            bandwidth: BandwidthConfig::default(),
            s3: None,
            encryption: None,
        }
    }
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            cuda_ms: 30_000,
            dump_ms: 300_000,
            store_ms: 900_000,
            restore_ms: 300_000,
            pid_release_ms: 10_000,
            shim_lease_ms: None,
        }
    }
}

/// The configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {} line {line} (`{text}`): {message}", path.display())]
    Parse {
        /// The config file.
        path: PathBuf,
        /// Line of the problem, from 1.
        line: usize,
        /// That line, which names the key.
        text: String,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid config: {key}: {problem}")]
    Invalid {
        /// The offending key.
        key: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

impl AgentConfig {
    /// Reads a config file; keys it does not set keep their defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_text(path, &text)
    }

    /// Parses and validates the text of the config file at `path`.
    pub fn from_text(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut config: Self = toml::from_str(text).map_err(|e| parse_error(path, text, &e))?;
        if let Some(s3) = &mut config.s3 {
            if !s3.secret_access_key.expose().is_empty() || s3.session_token.is_some() {
                return Err(ConfigError::Invalid {
                    key: "s3.secret_access_key",
                    problem: "secrets do not belong in the config file; set AWS_SECRET_ACCESS_KEY \
                              (and AWS_SESSION_TOKEN) from a Secret"
                        .into(),
                });
            }
            credentials_from_env(s3, |key| std::env::var(key).ok());
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks values that TOML types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let t = &self.timeouts;
        for (key, value) in [
            ("timeouts.cuda_ms", t.cuda_ms),
            ("timeouts.dump_ms", t.dump_ms),
            ("timeouts.store_ms", t.store_ms),
            ("timeouts.restore_ms", t.restore_ms),
            ("timeouts.pid_release_ms", t.pid_release_ms),
            ("timeouts.shim_lease_ms", t.shim_lease_ms.unwrap_or(1)),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    key,
                    problem: "must be greater than 0".into(),
                });
            }
        }
        self.dataplane
            .chunk_config()
            .validate()
            .map_err(|e| ConfigError::Invalid {
                key: "dataplane",
                problem: e.to_string(),
            })?;
        if let Some(s3) = &self.s3 {
            s3.validate().map_err(|e| ConfigError::Invalid {
                key: "s3",
                problem: e.to_string(),
            })?;
        }
        if let Some(encryption) = &self.encryption {
            encryption
                .validate()
                .map_err(|problem| ConfigError::Invalid {
                    key: "encryption",
                    problem,
                })?;
        }
        for (key, budget) in [
            ("tiers.ram_budget_bytes", self.tiers.ram_budget_bytes),
            ("tiers.nvme_budget_bytes", self.tiers.nvme_budget_bytes),
        ] {
            if budget == Some(0) {
                return Err(ConfigError::Invalid {
                    key,
                    problem: "must be greater than 0".into(),
                });
            }
        }
        self.tiers.ram.validate("tiers.ram")?;
        self.tiers.nvme.validate("tiers.nvme")?;
        self.policy.validate()?;
        self.bandwidth.validate()?;
        let tier_paths = [
            ("tiers.ram_path", self.tiers.ram_path.as_ref()),
            ("tiers.nvme_path", self.tiers.nvme_path.as_ref()),
        ];
        let paths = [
            ("socket", Some(&self.socket)),
            ("state_dir", Some(&self.state_dir)),
        ];
        for (key, path) in paths.into_iter().chain(tier_paths) {
            if let Some(path) = path.filter(|p| !p.is_absolute()) {
                return Err(ConfigError::Invalid {
                    key,
                    problem: format!("{} is not an absolute path", path.display()),
                });
            }
        }
        Ok(())
    }

    /// The RAM tier directory, resolved as [`TiersConfig::ram_path`] describes.
    pub fn ram_tier_path(&self) -> PathBuf {
        match &self.tiers.ram_path {
            Some(path) => path.clone(),
            None if self.state_dir == Path::new(DEFAULT_STATE_DIR) => DEFAULT_RAM_TIER.into(),
            None => self.state_dir.join("ram"),
        }
    }

    /// The NVMe tier directory.
    pub fn nvme_tier_path(&self) -> PathBuf {
        self.tiers
            .nvme_path
            .clone()
            .unwrap_or_else(|| self.state_dir.join("nvme"))
    }

    /// The RAM tier's budget: the configured one, or a quarter of the node's memory.
    pub fn ram_budget(&self) -> u64 {
        self.tiers
            .ram_budget_bytes
            .unwrap_or_else(|| node_memory_bytes() / 4)
    }

    /// Directory of the per-checkpoint records.
    pub fn records_dir(&self) -> PathBuf {
        self.state_dir.join("checkpoints")
    }

    /// Directory of CRIU's logs.
    pub fn logs_dir(&self) -> PathBuf {
        self.state_dir.join("logs")
    }
}

/// A TOML error as one line naming the line (and so the key) it is about.
fn parse_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let at = e.span().map_or(0, |span| span.start.min(text.len()));
    let line = text
        .get(..at)
        .map_or(0, |before| before.matches('\n').count());
    ConfigError::Parse {
        path: path.to_owned(),
        line: line + 1,
        text: text.lines().nth(line).unwrap_or_default().trim().to_owned(),
        message: e.message().replace('\n', " "),
    }
}

/// Fills S3 credentials from the environment (`get` looks a variable up).
fn credentials_from_env(s3: &mut S3Config, get: impl Fn(&str) -> Option<String>) {
    if s3.access_key_id.is_empty() {
        s3.access_key_id = get("AWS_ACCESS_KEY_ID").unwrap_or_default();
    }
    if let Some(secret) = get("AWS_SECRET_ACCESS_KEY") {
        s3.secret_access_key = Secret::new(secret);
    }
    s3.session_token = get("AWS_SESSION_TOKEN").map(Secret::new);
}

/// Total memory of the node, from /proc/meminfo (0 when unreadable).
fn node_memory_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// What the default shim lease adds to the longer of the dump and restore timeouts: time
/// for the shim's own work around `runc` (rootfs diff, copying images) and its End call.
pub const SHIM_LEASE_MARGIN: Duration = Duration::from_secs(60);

impl TimeoutsConfig {
    /// The timeout of `phase_ms` as a duration.
    pub fn of(phase_ms: u64) -> Duration {
        Duration::from_millis(phase_ms)
    }

    /// The lease of a shim's Begin or Stage: `shim_lease_ms`, else long enough for the
    /// slowest `runc` run the agent's own timeouts allow, plus [`SHIM_LEASE_MARGIN`].
    pub fn shim_lease(&self) -> Duration {
        match self.shim_lease_ms {
            Some(ms) => Duration::from_millis(ms),
            None => Duration::from_millis(self.dump_ms.max(self.restore_ms))
                .saturating_add(SHIM_LEASE_MARGIN),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_means_defaults() {
        let config: AgentConfig = toml::from_str("").unwrap();
        assert_eq!(config, AgentConfig::default());
        assert_eq!(config.ram_tier_path(), Path::new(DEFAULT_RAM_TIER));
        assert_eq!(
            config.nvme_tier_path(),
            Path::new("/var/lib/kybernate/nvme")
        );
    }

    #[test]
    fn shipped_sample_is_the_defaults() {
        let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/agent-config.toml");
        let config = AgentConfig::from_file(Path::new(sample)).unwrap();
        assert_eq!(config, AgentConfig::default());
    }

    #[test]
    fn s3_credentials_come_from_the_environment() {
        let mut s3 = S3Config {
            bucket: "b".into(),
            ..S3Config::default()
        };
        credentials_from_env(&mut s3, |key| match key {
            "AWS_ACCESS_KEY_ID" => Some("id".into()),
            "AWS_SECRET_ACCESS_KEY" => Some("secret".into()),
            _ => None,
        });
        assert_eq!(s3.access_key_id, "id");
        assert_eq!(s3.secret_access_key.expose(), "secret");
        assert!(!format!("{s3:?}").contains("secret\""), "never printed");
        assert!(node_memory_bytes() > 0);
    }

    #[test]
    fn the_shim_lease_defaults_to_the_slowest_runc_run_plus_a_margin() {
        let mut timeouts = TimeoutsConfig::default();
        assert_eq!(timeouts.shim_lease(), Duration::from_secs(360));
        timeouts.restore_ms = 600_000;
        assert_eq!(timeouts.shim_lease(), Duration::from_secs(660));
        timeouts.shim_lease_ms = Some(1_500);
        assert_eq!(timeouts.shim_lease(), Duration::from_millis(1_500));
    }

    #[test]
    fn own_state_dir_gets_own_tiers() {
        let config = AgentConfig {
            state_dir: "/tmp/a".into(),
            ..AgentConfig::default()
        };
        assert_eq!(config.ram_tier_path(), Path::new("/tmp/a/ram"));
        assert_eq!(config.nvme_tier_path(), Path::new("/tmp/a/nvme"));
    }

    #[test]
    fn a_chunk_size_that_overflows_bytes_is_refused_not_wrapped() {
        // 2^44 + 8 MiB is 8 MiB once shifted into bytes with the high bits lost.
        let text = "[dataplane]\nchunk_size_mib = 17592186044424\n";
        let err = AgentConfig::from_text(Path::new("/a.toml"), text)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid config: dataplane: chunk_size"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "sockett = \"/x\"\n").unwrap();
        let err = AgentConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("sockett"), "{err}");

        std::fs::write(&path, "[s3]\nbucket = \"b\"\nsecret_access_key = \"x\"\n").unwrap();
        let err = AgentConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("secrets do not belong in the config file"),
            "{err}"
        );
        assert!(!err.contains("\"x\""), "{err}");

        std::fs::write(&path, "[dataplane]\nzstd_level = 99\n").unwrap();
        let err = AgentConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.starts_with("invalid config: dataplane:"), "{err}");

        std::fs::write(&path, "[timeouts]\nshim_lease_ms = 0\n").unwrap();
        let err = AgentConfig::from_file(&path).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid config: timeouts.shim_lease_ms: must be greater than 0"
        );

        std::fs::write(&path, "[timeouts]\ndump_ms = 0\n").unwrap();
        let err = AgentConfig::from_file(&path).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid config: timeouts.dump_ms: must be greater than 0"
        );

        std::fs::write(
            &path,
            "[timeouts]\ncuda_ms = 1\n[tiers]\nram_budget_bytes = -5\n",
        )
        .unwrap();
        let err = AgentConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("line 4 (`ram_budget_bytes = -5`)") && !err.contains('\n'),
            "{err}"
        );

        std::fs::write(&path, "[tiers.tape]\nmax_age_secs = 1\n").unwrap();
        let err = AgentConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("unknown field `tape`"), "{err}");

        std::fs::write(&path, "[tiers.ram]\nhigh_watermark_percent = 150\n").unwrap();
        let err = AgentConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("tiers.ram.high_watermark_percent: 150% is above the budget"),
            "{err}"
        );

        std::fs::write(&path, "[tiers]\nnvme_budget_bytes = 0\n").unwrap();
        let err = AgentConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("tiers.nvme_budget_bytes"), "{err}");

        std::fs::write(&path, "[tiers]\nram_path = \"shm/ram\"\n").unwrap();
        let err = AgentConfig::from_file(&path).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid config: tiers.ram_path: shm/ram is not an absolute path"
        );

        let err = AgentConfig::from_file(&dir.path().join("none.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("cannot read config file"), "{err}");
    }
}
