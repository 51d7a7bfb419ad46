//! The tier policy part of the agent config: watermarks and ages per tier, and what the agent
//! keeps close. These are the settings a live reload applies without a restart.

use kybernate_dataplane::TierKind;
use serde::{Deserialize, Serialize};

use super::ConfigError;

/// When a tier's copies move to the next slower tier.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TierPolicy {
    /// Demotion starts when the tier holds more than this share of its budget (percent).
    pub high_watermark_percent: u8,
    /// Once started, demotion goes on until the tier holds at most this share (percent).
    pub low_watermark_percent: u8,
    /// Copies not used for longer than this move on regardless of the budget; 0 = no limit.
    pub max_age_secs: u64,
}

impl Default for TierPolicy {
    fn default() -> Self {
        Self {
            high_watermark_percent: 100,
            low_watermark_percent: 90,
            max_age_secs: 0,
        }
    }
}

impl TierPolicy {
    /// Checks the watermarks; `tier` names the table in errors (`tiers.ram`).
    pub fn validate(&self, table: &'static str) -> Result<(), ConfigError> {
        let (high_key, low_key) = match table {
            "tiers.ram" => (
                "tiers.ram.high_watermark_percent",
                "tiers.ram.low_watermark_percent",
            ),
            _ => (
                "tiers.nvme.high_watermark_percent",
                "tiers.nvme.low_watermark_percent",
            ),
        };
        if self.high_watermark_percent > 100 {
            return Err(ConfigError::Invalid {
                key: high_key,
                problem: format!(
                    "{}% is above the budget (at most 100)",
                    self.high_watermark_percent
                ),
            });
        }
        if self.high_watermark_percent == 0 {
            return Err(ConfigError::Invalid {
                key: high_key,
                problem: "must be greater than 0".into(),
            });
        }
        if self.low_watermark_percent > self.high_watermark_percent {
            return Err(ConfigError::Invalid {
                key: low_key,
                problem: format!(
                    "{}% is above the high watermark ({}%)",
                    self.low_watermark_percent, self.high_watermark_percent
                ),
            });
        }
        Ok(())
    }

    /// The high and low watermarks of `budget`, in bytes.
    pub fn watermarks(&self, budget: u64) -> (u64, u64) {
        let share = |percent: u8| {
            u64::try_from(u128::from(budget) * u128::from(percent) / 100).unwrap_or(u64::MAX)
        };
        (
            share(self.high_watermark_percent),
            share(self.low_watermark_percent),
        )
    }
}

/// What the agent keeps close besides pins.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// The most recent checkpoints of each workload that stay on NVMe whatever its budget or
    /// age limit says.
    pub nvme_keep_recent: u32,
    /// Tier ("ram" or "nvme") that restores announced by the controller (a GpuRestore
    /// scheduled to this node) are prefetched into before the pod starts.
    pub restore_prefetch_tier: String,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            nvme_keep_recent: 1,
            restore_prefetch_tier: TierKind::Ram.as_str().into(),
        }
    }
}

impl PolicyConfig {
    /// Checks the values TOML types cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match TierKind::parse(&self.restore_prefetch_tier) {
            Some(TierKind::Ram | TierKind::Nvme) => Ok(()),
            _ => Err(ConfigError::Invalid {
                key: "policy.restore_prefetch_tier",
                problem: format!(
                    "unknown tier {:?}: use ram or nvme",
                    self.restore_prefetch_tier
                ),
            }),
        }
    }

    /// The tier announced restores are prefetched into (validated: RAM or NVMe).
    pub fn restore_prefetch_tier(&self) -> TierKind {
        TierKind::parse(&self.restore_prefetch_tier).unwrap_or(TierKind::Ram)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermarks_are_shares_of_the_budget() {
        let policy = TierPolicy::default();
        assert_eq!(policy.watermarks(1000), (1000, 900));
        assert_eq!(policy.watermarks(u64::MAX).0, u64::MAX);
        let bad = TierPolicy {
            high_watermark_percent: 120,
            ..TierPolicy::default()
        };
        assert_eq!(
            bad.validate("tiers.ram").unwrap_err().to_string(),
            "invalid config: tiers.ram.high_watermark_percent: 120% is above the budget (at most 100)"
        );
        let inverted = TierPolicy {
            high_watermark_percent: 50,
            low_watermark_percent: 60,
            max_age_secs: 0,
        };
        assert!(inverted
            .validate("tiers.nvme")
            .unwrap_err()
            .to_string()
            .contains("tiers.nvme.low_watermark_percent"));
    }

    #[test]
    fn prefetch_tier_is_ram_or_nvme() {
        assert_eq!(
            PolicyConfig::default().restore_prefetch_tier(),
            TierKind::Ram
        );
        let s3 = PolicyConfig {
            restore_prefetch_tier: "s3".into(),
            ..PolicyConfig::default()
        };
        assert!(s3
            .validate()
            .unwrap_err()
            .to_string()
            .contains("policy.restore_prefetch_tier"));
    }
}
