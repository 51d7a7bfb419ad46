//! `[encryption]`: encryption at rest for the NVMe and S3 tiers.
//!
//! The key-encryption keys come from `key_file`, a file or directory a Kubernetes Secret
//! mounts (never the ConfigMap this file comes from). The RAM tier is not encrypted: CRIU
//! reads its images in place, and it is protected by owner-only modes on a tmpfs that is not
//! persisted; asking for it is refused by name rather than silently ignored.

use std::path::PathBuf;
use std::sync::Arc;

use kybernate_dataplane::{KeyError, KeyRing, Sealing, TierKind};
use serde::{Deserialize, Serialize};

/// Tiers that can be encrypted.
const ENCRYPTABLE: [&str; 2] = ["nvme", "s3"];

/// The `[encryption]` table.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    /// Key file (32 bytes or 64 hex digits, named by its key id) or a directory of them:
    /// absolute, owned by root, no access for group or others. The id that sorts last seals
    /// new checkpoints; every key opens the ones it sealed, so rotation is adding a file.
    pub key_file: PathBuf,
    /// Tiers whose new checkpoints are sealed (`"nvme"`, `"s3"`); the others store plain
    /// checkpoints but still open sealed ones.
    #[serde(default = "default_tiers")]
    pub tiers: Vec<String>,
    /// Restore plain checkpoints written before encryption was turned on (until they are
    /// re-encrypted with `kybernatectl reencrypt`). Off: nothing authenticates them.
    #[serde(default)]
    pub accept_unencrypted: bool,
}

fn default_tiers() -> Vec<String> {
    ENCRYPTABLE.iter().map(|t| (*t).to_owned()).collect()
}

impl EncryptionConfig {
    /// Checks what TOML types cannot: an absolute key path and known tier names.
    pub fn validate(&self) -> Result<(), String> {
        if !self.key_file.is_absolute() {
            return Err(format!(
                "key_file {} must be an absolute path (where the Secret is mounted)",
                self.key_file.display()
            ));
        }
        for tier in &self.tiers {
            if !ENCRYPTABLE.contains(&tier.as_str()) {
                return Err(format!(
                    "tiers: {tier:?} cannot be encrypted; use \"nvme\" and/or \"s3\" (the RAM \
                     tier is a private tmpfs CRIU reads in place)"
                ));
            }
        }
        Ok(())
    }

    /// Reads the key ring (checking its path, owner and modes).
    pub fn load_ring(&self) -> Result<Arc<KeyRing>, KeyError> {
        let ring = KeyRing::load(&self.key_file)?;
        tracing::info!(
            key_file = %self.key_file.display(),
            keys = ?ring.ids(),
            sealing_with = %ring.newest().id(),
            tiers = ?self.tiers,
            "encryption at rest on"
        );
        Ok(Arc::new(ring))
    }

    /// The settings of `tier` under this config.
    pub fn sealing_for(&self, ring: &Arc<KeyRing>, tier: TierKind) -> Sealing {
        if self.tiers.iter().any(|t| t == tier.as_str()) {
            Sealing::sealed(Arc::clone(ring)).accepting_plain(self.accept_unencrypted)
        } else {
            Sealing::opening_only(Arc::clone(ring))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_default_to_nvme_and_s3_and_bad_values_are_named() {
        let c: EncryptionConfig = toml::from_str("key_file = \"/etc/kybernate/keys\"").unwrap();
        assert_eq!(c.tiers, ["nvme", "s3"]);
        assert!(!c.accept_unencrypted);
        c.validate().unwrap();
        let bad = EncryptionConfig {
            tiers: vec!["ram".into()],
            ..c.clone()
        };
        assert!(bad.validate().unwrap_err().contains("\"ram\""));
        let bad = EncryptionConfig {
            key_file: "keys".into(),
            ..c
        };
        assert!(bad.validate().unwrap_err().contains("absolute"));
        assert!(toml::from_str::<EncryptionConfig>("key_file = \"/k\"\nkey = \"x\"").is_err());
    }

    #[test]
    fn listed_tiers_seal_and_the_others_only_open() {
        let ring =
            Arc::new(KeyRing::from_keys(std::path::Path::new("/k"), &[("k1", [1; 32])]).unwrap());
        let c = EncryptionConfig {
            key_file: "/k".into(),
            tiers: vec!["nvme".into()],
            accept_unencrypted: false,
        };
        assert!(c.sealing_for(&ring, TierKind::Nvme).writing_key().is_some());
        assert!(c.sealing_for(&ring, TierKind::S3).writing_key().is_none());
        assert!(c.sealing_for(&ring, TierKind::S3).ring().is_some());
    }
}
