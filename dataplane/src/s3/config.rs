//! Settings of the S3 tier, filled by the agent from its TOML config.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::{TierError, TierKind};

/// Smallest part S3 accepts (except the last part of an upload).
pub const MIN_PART_SIZE: usize = 5 << 20;
/// Most parts one multipart upload may have.
pub const MAX_PARTS: usize = 10_000;

/// A secret string: deserialises like a string, never prints.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for handing to the credentials provider only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where and how the S3 tier keeps checkpoints (`[tiers.s3]` in the agent's config).
///
/// Keys under the prefix: `manifests/<checkpoint>`, `packs/<checkpoint>-<node>-<nonce>.pack`,
/// `index/<checkpoint>`, `records/<checkpoint>.json`, `leases/<node>-<nonce>.json` and
/// `gc/doomed/<pack>` (see the module docs of the tier for the rules that use them).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint URL, e.g. `http://127.0.0.1:9000`; empty means AWS's regional endpoint.
    pub endpoint: String,
    /// Region used for signing.
    pub region: String,
    /// Bucket holding the checkpoints; it must exist.
    pub bucket: String,
    /// Key prefix, e.g. `cluster-a/`; a missing trailing `/` is added.
    pub prefix: String,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most non-AWS servers.
    pub force_path_style: bool,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: Secret,
    /// Session token for temporary credentials.
    pub session_token: Option<Secret>,
    /// Parts uploaded at the same time.
    pub parts_in_flight: usize,
    /// Smallest part size in bytes (at least 5 MiB); grows so an upload needs ≤ 10,000 parts.
    pub part_size: usize,
    /// Attempts per request (part, ranged GET, manifest) before giving up.
    pub max_attempts: u32,
    /// First retry delay in milliseconds; doubles each attempt.
    pub retry_base_ms: u64,
    /// Ranged GETs in flight during a restore.
    pub fetch_concurrency: usize,
    /// Seconds to wait for a TCP connection.
    pub connect_timeout_secs: u64,
    /// This node's name in lease objects and pack keys, so nodes sharing a bucket never
    /// write the same key and an operator sees who holds a lease. Empty: the host name.
    pub node_id: String,
    /// Seconds an upload lease stays live without renewal. A running store renews its lease
    /// every quarter of this, so only a crashed or cut-off node's lease runs out.
    pub lease_ttl_secs: u64,
    /// Seconds a pack must be unreferenced before garbage collection marks it, and a mark
    /// must stand before the pack is deleted. It must exceed the clock skew between nodes.
    pub gc_grace_secs: u64,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            region: "us-east-1".into(),
            bucket: String::new(),
            prefix: String::new(),
            force_path_style: false,
            access_key_id: String::new(),
            secret_access_key: Secret::default(),
            session_token: None,
            parts_in_flight: 16,
            part_size: 8 << 20,
            max_attempts: 4,
            retry_base_ms: 200,
            fetch_concurrency: 16,
            connect_timeout_secs: 10,
            node_id: String::new(),
            lease_ttl_secs: 600,
            gc_grace_secs: 3600,
        }
    }
}

impl S3Config {
    /// Checks the settings; the error names the bad field.
    pub fn validate(&self) -> Result<(), TierError> {
        let bad = |detail: String| {
            Err(TierError::Config {
                tier: TierKind::S3,
                detail,
            })
        };
        if self.bucket.is_empty() {
            return bad("bucket is empty".into());
        }
        if self.region.is_empty() {
            return bad("region is empty".into());
        }
        if self.access_key_id.is_empty() || self.secret_access_key.expose().is_empty() {
            return bad("access_key_id and secret_access_key must both be set".into());
        }
        let scheme_ok =
            self.endpoint.starts_with("http://") || self.endpoint.starts_with("https://");
        if !self.endpoint.is_empty() && !scheme_ok {
            return bad(format!(
                "endpoint {:?} must start with http:// or https://",
                self.endpoint
            ));
        }
        if self.part_size < MIN_PART_SIZE {
            return bad(format!(
                "part_size {} is below S3's 5 MiB minimum",
                self.part_size
            ));
        }
        if self.parts_in_flight == 0 || self.fetch_concurrency == 0 || self.max_attempts == 0 {
            return bad(
                "parts_in_flight, fetch_concurrency and max_attempts must be at least 1".into(),
            );
        }
        if self.lease_ttl_secs == 0 || self.gc_grace_secs == 0 {
            return bad(format!(
                "lease_ttl_secs ({}) and gc_grace_secs ({}) must be at least 1",
                self.lease_ttl_secs, self.gc_grace_secs
            ));
        }
        let node_ok = self.node_id.len() <= 63
            && self
                .node_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !node_ok {
            return bad(format!(
                "node_id {:?} must be at most 63 characters of A-Z, a-z, 0-9, '-', '_' or '.'",
                self.node_id
            ));
        }
        Ok(())
    }

    /// The prefix with exactly one trailing `/` (or empty).
    pub fn normalized_prefix(&self) -> String {
        let p = self.prefix.trim_matches('/');
        if p.is_empty() {
            String::new()
        } else {
            format!("{p}/")
        }
    }

    /// Part size for an upload of at most `total` bytes: the configured size, grown in whole
    /// MiB until `total` fits in [`MAX_PARTS`] parts.
    pub fn part_size_for(&self, total: u64) -> usize {
        let needed = usize::try_from(total.div_ceil(MAX_PARTS as u64)).unwrap_or(usize::MAX);
        self.part_size
            .max(needed.div_ceil(1 << 20).saturating_mul(1 << 20))
    }

    /// How long an upload lease lives without renewal.
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.lease_ttl_secs)
    }

    /// The garbage-collection grace period.
    pub fn gc_grace(&self) -> Duration {
        Duration::from_secs(self.gc_grace_secs)
    }

    pub(crate) fn retry_delay(&self, attempt: u32) -> Duration {
        let factor = 1u64 << attempt.saturating_sub(1).min(10);
        Duration::from_millis(self.retry_base_ms.saturating_mul(factor).min(30_000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_secret() {
        let c = S3Config {
            secret_access_key: Secret::new("wJalrXUtnFEMI"),
            session_token: Some(Secret::new("tok3n")),
            ..S3Config::default()
        };
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("wJalrXUtnFEMI") && !shown.contains("tok3n"),
            "{shown}"
        );
    }

    #[test]
    fn part_size_grows_to_stay_within_ten_thousand_parts() {
        let c = S3Config::default();
        assert_eq!(c.part_size_for(1 << 30), 8 << 20);
        let huge: u64 = 200 << 30;
        let size = c.part_size_for(huge);
        assert!(huge.div_ceil(size as u64) <= MAX_PARTS as u64, "{size}");
        assert_eq!(size % (1 << 20), 0);
    }

    #[test]
    fn the_agent_can_fill_both_configs_from_toml() {
        let text = r#"
            [chunks]
            chunk_size = 4194304
            zstd_level = 3

            [s3]
            endpoint = "http://127.0.0.1:9000"
            bucket = "ckpt"
            prefix = "node-a"
            force_path_style = true
            access_key_id = "AKIA1"
            secret_access_key = "s3cr3t"
        "#;
        #[derive(serde::Deserialize)]
        struct Agent {
            chunks: crate::ChunkConfig,
            s3: S3Config,
        }
        let agent: Agent = toml::from_str(text).unwrap();
        assert_eq!(agent.chunks.chunk_size, 4 << 20);
        assert_eq!(agent.chunks.zstd_level, 3);
        assert_eq!(agent.chunks.workers, 0, "defaults fill the rest");
        assert_eq!(agent.s3.secret_access_key.expose(), "s3cr3t");
        assert_eq!(agent.s3.parts_in_flight, 16);
        assert_eq!(agent.s3.lease_ttl_secs, 600);
        assert_eq!(agent.s3.gc_grace_secs, 3600);
        assert_eq!(agent.s3.normalized_prefix(), "node-a/");
        agent.s3.validate().unwrap();
        let err = toml::from_str::<Agent>("[chunks]\nchunk_sise = 1\n[s3]\n")
            .err()
            .unwrap();
        assert!(err.to_string().contains("chunk_sise"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let ok = S3Config {
            bucket: "b".into(),
            access_key_id: "a".into(),
            secret_access_key: Secret::new("s"),
            ..S3Config::default()
        };
        ok.validate().unwrap();
        let err = S3Config {
            bucket: String::new(),
            ..ok.clone()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("bucket"), "{err}");
        let err = S3Config {
            part_size: 1 << 20,
            ..ok.clone()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("part_size"), "{err}");
        let err = S3Config {
            gc_grace_secs: 0,
            ..ok.clone()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("gc_grace_secs"), "{err}");
        let err = S3Config {
            node_id: "node a/../b".into(),
            ..ok.clone()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("node_id"), "{err}");
        let err = S3Config {
            endpoint: "localhost:9000".into(),
            ..ok
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("endpoint"), "{err}");
    }
}
