//! Byte-rate limits for the agent's transfers (`[bandwidth]`, reloaded live), so background
//! drains, demotions and prefetches do not starve the workloads' disk and network.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// The limits; 0 means no limit.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct BandwidthConfig {
    /// Uploads to the S3 tier, bytes per second.
    pub s3_upload_bytes_per_sec: u64,
    /// Downloads from the S3 tier, bytes per second.
    pub s3_download_bytes_per_sec: u64,
    /// Chunk writes to the NVMe tier, bytes per second.
    pub nvme_write_bytes_per_sec: u64,
    /// Whether foreground work (a checkpoint storing up to the tier it asked for, and a
    /// restore) may exceed the limits; background work never does.
    pub foreground_exceeds_limits: bool,
}

impl Default for BandwidthConfig {
    fn default() -> Self {
        Self {
            s3_upload_bytes_per_sec: 0,
            s3_download_bytes_per_sec: 0,
            nvme_write_bytes_per_sec: 0,
            foreground_exceeds_limits: true,
        }
    }
}

impl BandwidthConfig {
    /// Checks each limit fits the data plane's rate limiter (at most 4 GB/s; 0 is none).
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            (
                "bandwidth.s3_upload_bytes_per_sec",
                self.s3_upload_bytes_per_sec,
            ),
            (
                "bandwidth.s3_download_bytes_per_sec",
                self.s3_download_bytes_per_sec,
            ),
            (
                "bandwidth.nvme_write_bytes_per_sec",
                self.nvme_write_bytes_per_sec,
            ),
        ] {
            kybernate_dataplane::ByteRate::new(value)
                .map_err(|problem| ConfigError::Invalid { key, problem })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_default_to_none_and_too_large_ones_name_their_key() {
        assert!(BandwidthConfig::default().validate().is_ok());
        let huge = BandwidthConfig {
            s3_download_bytes_per_sec: 1 << 40,
            ..BandwidthConfig::default()
        };
        let err = huge.validate().unwrap_err().to_string();
        assert!(
            err.starts_with("invalid config: bandwidth.s3_download_bytes_per_sec: "),
            "{err}"
        );
    }
}
