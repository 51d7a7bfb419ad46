//! Upload leases (`<prefix>leases/<node>-<nonce>.json`): a store announces, before its first
//! part, which pack it is writing and which existing packs it may reference, and renews the
//! announcement while it runs. Garbage collection on any node leaves every pack a live lease
//! names alone, so a pack cannot vanish between a store's chunk lookups and its manifest
//! commit. A node that crashes stops renewing; its lease runs out after `lease_ttl_secs` and
//! what it left behind is collected like any unreferenced pack.
//!
//! Leases compare wall-clock times of different nodes, so the TTL and the grace period must
//! be far longer than the clock skew between nodes (NTP keeps it to milliseconds).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use serde::{Deserialize, Serialize};

use super::request::{remote, retrying};
use super::{now_ms, unique_nonce, S3Config, S3Tier, TIER};
use crate::{CheckpointName, TierError};

/// Version of the lease object format.
const LEASE_VERSION: u32 = 1;
/// Largest lease object read back.
pub(super) const MAX_LEASE_BYTES: u64 = 4 << 20;

/// What a lease object says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseInfo {
    /// Format version, 1.
    pub version: u32,
    /// Node holding the lease.
    pub node: String,
    /// Checkpoint being stored.
    pub checkpoint: String,
    /// Key (relative to the prefix) of the pack this store uploads.
    pub upload_key: String,
    /// Keys (relative to the prefix) of existing packs this store may reference.
    pub packs: Vec<String>,
    /// Wall-clock time (ms since the Unix epoch) after which the lease is dead.
    pub expires_unix_ms: u64,
}

impl LeaseInfo {
    /// Whether the lease still holds at `now_ms`.
    pub fn is_live(&self, now_ms: u64) -> bool {
        self.expires_unix_ms > now_ms
    }

    /// Whether the lease protects the pack with relative key `pack`.
    pub fn covers(&self, pack: &str) -> bool {
        self.upload_key == pack || self.packs.iter().any(|p| p == pack)
    }

    /// Parses a lease object; the error says what is wrong.
    pub(super) fn parse(body: &[u8]) -> Result<Self, String> {
        let info: Self = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        if info.version != LEASE_VERSION {
            return Err(format!("unsupported lease version {}", info.version));
        }
        Ok(info)
    }
}

/// A lease held by a running store: renewed in the background until it is dropped, which
/// deletes it.
pub(crate) struct UploadLease<'a> {
    tier: &'a S3Tier,
    key: String,
    info: Arc<Mutex<LeaseInfo>>,
    /// Expiry (ms) written by the last renewal known to have succeeded.
    valid_until_ms: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    renewer: Option<tokio::task::JoinHandle<()>>,
}

impl S3Tier {
    /// Writes a lease for a store of `checkpoint` uploading `upload_key` and possibly
    /// referencing `packs` (keys relative to the prefix), and starts renewing it.
    pub(super) fn acquire_lease(
        &self,
        checkpoint: &CheckpointName,
        upload_key: &str,
        packs: Vec<String>,
    ) -> Result<UploadLease<'_>, TierError> {
        let key = format!(
            "{}leases/{}-{}.json",
            self.prefix,
            self.node_id,
            unique_nonce()
        );
        let info = Arc::new(Mutex::new(LeaseInfo {
            version: LEASE_VERSION,
            node: self.node_id.clone(),
            checkpoint: checkpoint.to_string(),
            upload_key: upload_key.to_owned(),
            packs,
            expires_unix_ms: 0,
        }));
        let valid_until_ms = Arc::new(AtomicU64::new(0));
        self.rt.block_on(put_lease(
            &self.client,
            &self.config,
            &key,
            &info,
            &valid_until_ms,
        ))?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let period = (self.config.lease_ttl() / 4).max(Duration::from_millis(100));
        let (client, config) = (self.client.clone(), self.config.clone());
        let (task_key, task_info, task_valid) =
            (key.clone(), Arc::clone(&info), Arc::clone(&valid_until_ms));
        let renewer = self.rt.spawn(async move {
            // Ends when told to, or when the lease is dropped without being told.
            while tokio::time::timeout(period, &mut stopped).await.is_err() {
                if let Err(e) =
                    put_lease(&client, &config, &task_key, &task_info, &task_valid).await
                {
                    tracing::warn!(key = %task_key, error = %e, "renewing an upload lease failed");
                }
            }
        });
        Ok(UploadLease {
            tier: self,
            key,
            info,
            valid_until_ms,
            stop: Some(stop),
            renewer: Some(renewer),
        })
    }

    /// Every lease object under the prefix with what it says, or why it cannot be read.
    pub(super) fn read_leases(&self) -> Result<Vec<LeaseRead>, TierError> {
        let prefix = format!("{}leases/", self.prefix);
        let mut leases = Vec::new();
        for object in self.list_keys(&prefix)? {
            let corrupt = |detail: String| TierError::Remote {
                tier: TIER,
                op: "read lease".into(),
                key: object.key.clone(),
                detail,
            };
            let body = match self.get_small("get lease", &object.key, MAX_LEASE_BYTES, corrupt) {
                Ok(Some(body)) => body,
                // Released since the listing.
                Ok(None) => continue,
                // Too big or cut short: not a lease this code wrote.
                Err(TierError::Remote { op, detail, .. }) if op == "read lease" => {
                    leases.push(LeaseRead {
                        key: object.key,
                        modified_ms: object.modified_ms,
                        info: Err(detail),
                    });
                    continue;
                }
                Err(e) => return Err(e),
            };
            leases.push(LeaseRead {
                info: LeaseInfo::parse(&body),
                key: object.key,
                modified_ms: object.modified_ms,
            });
        }
        Ok(leases)
    }

    /// Every lease object under the prefix that can be read, with its key: the stores in
    /// progress on all nodes (and, until garbage collection removes them, the expired leases
    /// of stores that were cut off).
    pub fn leases(&self) -> Result<Vec<(String, LeaseInfo)>, TierError> {
        Ok(self
            .read_leases()?
            .into_iter()
            .filter_map(|l| l.info.ok().map(|i| (l.key, i)))
            .collect())
    }
}

/// One lease object as garbage collection reads it.
pub(super) struct LeaseRead {
    pub key: String,
    pub modified_ms: i64,
    pub info: Result<LeaseInfo, String>,
}

impl UploadLease<'_> {
    /// Replaces the packs the lease protects (beside its own upload) and renews it now.
    pub fn set_packs(&self, packs: Vec<String>) -> Result<(), TierError> {
        self.info.lock().unwrap_or_else(|e| e.into_inner()).packs = packs;
        let t = self.tier;
        t.rt.block_on(put_lease(
            &t.client,
            &t.config,
            &self.key,
            &self.info,
            &self.valid_until_ms,
        ))
    }

    /// Whether the lease is known to hold for at least `margin` more.
    pub fn holds_for(&self, margin: Duration) -> bool {
        let margin = u64::try_from(margin.as_millis()).unwrap_or(u64::MAX);
        now_ms().saturating_add(margin) < self.valid_until_ms.load(Ordering::SeqCst)
    }

    /// The error of a store whose lease may have run out before its commit.
    pub fn lapsed(&self, name: &CheckpointName) -> TierError {
        TierError::Remote {
            tier: TIER,
            op: format!("commit checkpoint {name}: upload lease"),
            key: self.key.clone(),
            detail: "the upload lease could not be renewed in time, so other nodes may \
                     already collect the packs this store references; the store was not committed"
                .into(),
        }
    }
}

impl Drop for UploadLease<'_> {
    /// Stops the renewals, then deletes the lease. A failed delete only delays garbage
    /// collection until the lease runs out.
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(renewer) = self.renewer.take() {
            let _ = self.tier.rt.block_on(renewer);
        }
        if let Err(e) = self.tier.delete_key("delete lease", &self.key) {
            tracing::warn!(key = %self.key, error = %e, "an upload lease could not be deleted; it runs out on its own");
        }
    }
}

/// Writes the lease with a fresh expiry; on success records that expiry as known to hold.
async fn put_lease(
    client: &Client,
    config: &S3Config,
    key: &str,
    info: &Mutex<LeaseInfo>,
    valid_until_ms: &AtomicU64,
) -> Result<(), TierError> {
    let ttl = u64::try_from(config.lease_ttl().as_millis()).unwrap_or(u64::MAX);
    // The expiry counts from before the request, so the holder never believes in more time
    // than other nodes see.
    let expires = now_ms().saturating_add(ttl);
    let body = {
        let mut info = info.lock().unwrap_or_else(|e| e.into_inner());
        info.expires_unix_ms = expires;
        serde_json::to_vec(&*info).expect("a lease always serialises")
    };
    let body = bytes::Bytes::from(body);
    retrying(config, "put lease", || {
        client
            .put_object()
            .bucket(&config.bucket)
            .key(key)
            .content_type("application/json")
            .body(ByteStream::from(body.clone()))
            .send()
    })
    .await
    .map_err(|(e, n)| remote("put lease", key, &e, n))?;
    valid_until_ms.fetch_max(expires, Ordering::SeqCst);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_covers_its_upload_and_its_packs_until_it_expires() {
        let lease = LeaseInfo {
            version: 1,
            node: "node-a".into(),
            checkpoint: "cp".into(),
            upload_key: "packs/cp-node-a-1.pack".into(),
            packs: vec!["packs/old.pack".into()],
            expires_unix_ms: 1_000,
        };
        assert!(lease.covers("packs/cp-node-a-1.pack") && lease.covers("packs/old.pack"));
        assert!(!lease.covers("packs/other.pack"));
        assert!(lease.is_live(999) && !lease.is_live(1_000));
        let body = serde_json::to_vec(&lease).unwrap();
        assert_eq!(LeaseInfo::parse(&body).unwrap(), lease);
        let err = LeaseInfo::parse(br#"{"version":2}"#).unwrap_err();
        assert!(
            err.contains("missing field") || err.contains("version"),
            "{err}"
        );
        let newer = serde_json::to_vec(&LeaseInfo {
            version: 2,
            ..lease
        })
        .unwrap();
        assert!(LeaseInfo::parse(&newer).unwrap_err().contains("version 2"));
    }
}
