//! Garbage collection of packs, leases, unfinished uploads and index objects, safe with any
//! number of nodes storing and collecting at once, with no lock between them.
//!
//! A pack is deleted in two steps, each at least the grace period apart:
//! 1. **Mark** (`<prefix>gc/doomed/<pack>`): the pack is older than the grace period,
//!    referenced by no committed checkpoint, and named by no live lease.
//! 2. **Delete**: the mark is older than the grace period, and the pack is still neither
//!    referenced nor leased. The mark is rewritten just before the pack is deleted and stays
//!    a grace period longer, then goes.
//!
//! Each pass reads the leases *before* the references. A store writes its lease, naming the
//! packs it may reference, before it reads the marks, and it never references a marked pack.
//! So a pack a store references was either unmarked when the store looked, and then the
//! store's lease was already there when the pack was marked, and is seen by every later pass
//! until the store's index object or manifest, written before the lease goes, references it;
//! or the pack was marked (or its mark was still standing after the deletion) and the store
//! left it out. A store that took half the grace period to look starts over, so no mark can
//! come and go unseen in between.
//!
//! Multipart uploads older than the grace period that no live lease names were started by a
//! node that crashed or lost the server; they are aborted, so no parts are left behind.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use super::request::{remote, retrying};
use super::{now_ms, Put, S3Tier};
use crate::TierError;

/// What one collection pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Unreferenced packs marked for deletion.
    pub packs_marked: usize,
    /// Marked packs deleted.
    pub packs_deleted: usize,
    /// Marks removed because the pack is referenced again.
    pub marks_cleared: usize,
    /// Expired (or unreadable, old) lease objects removed.
    pub leases_removed: usize,
    /// Unfinished multipart uploads aborted.
    pub uploads_aborted: usize,
    /// Index objects of removed checkpoints deleted.
    pub indexes_removed: usize,
    /// Whether the pass stopped early because a young lease could not be read, which might
    /// protect any pack.
    pub held_back: bool,
}

/// A multipart upload that was started and neither completed nor aborted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnfinishedUpload {
    /// Object key the upload writes.
    pub key: String,
    /// The server's id of the upload.
    pub upload_id: String,
    /// When it was started, in ms since the Unix epoch.
    pub initiated_unix_ms: i64,
}

impl S3Tier {
    /// Starts a thread that runs [`S3Tier::collect_garbage`] every half grace period (at
    /// least every second) until the tier is dropped, so what a crashed node left behind is
    /// collected even when no checkpoint is removed.
    pub fn spawn_sweeper(tier: &Arc<S3Tier>) -> std::io::Result<std::thread::JoinHandle<()>> {
        let weak = Arc::downgrade(tier);
        let period = (tier.config.gc_grace() / 2).max(Duration::from_secs(1));
        std::thread::Builder::new()
            .name("kyb-s3-gc".into())
            .spawn(move || loop {
                std::thread::sleep(period);
                let Some(tier) = weak.upgrade() else {
                    return;
                };
                match tier.collect_garbage() {
                    Ok(report) => tracing::debug!(?report, "S3 garbage collection sweep"),
                    Err(e) => tracing::warn!(error = %e, "S3 garbage collection sweep failed"),
                }
            })
    }

    fn marks_prefix(&self) -> String {
        format!("{}gc/doomed/", self.prefix)
    }

    /// Key of the mark of the pack with relative key `pack` (`packs/<file>`).
    fn mark_key(&self, pack: &str) -> String {
        format!(
            "{}{}",
            self.marks_prefix(),
            pack.strip_prefix("packs/").unwrap_or(pack)
        )
    }

    /// Relative keys of every pack that garbage collection has marked.
    pub(super) fn doomed_packs(&self) -> Result<BTreeSet<String>, TierError> {
        Ok(self.marks()?.into_keys().collect())
    }

    /// Marks by pack (relative key): (mark key, LastModified in ms).
    fn marks(&self) -> Result<BTreeMap<String, (String, i64)>, TierError> {
        let prefix = self.marks_prefix();
        Ok(self
            .list_keys(&prefix)?
            .into_iter()
            .map(|o| {
                (
                    format!("packs/{}", &o.key[prefix.len()..]),
                    (o.key, o.modified_ms),
                )
            })
            .collect())
    }

    /// Every unfinished multipart upload under the tier's prefix.
    pub fn unfinished_uploads(&self) -> Result<Vec<UnfinishedUpload>, TierError> {
        self.list_uploads()?.ok_or_else(|| TierError::Remote {
            tier: super::TIER,
            op: "list multipart uploads under".into(),
            key: self.prefix.clone(),
            detail: "the server does not implement ListMultipartUploads (HTTP 501)".into(),
        })
    }

    /// [`S3Tier::unfinished_uploads`], or `None` when the server cannot list them (some
    /// S3-compatible servers lack ListMultipartUploads; a bucket lifecycle rule must then
    /// abort stale uploads).
    fn list_uploads(&self) -> Result<Option<Vec<UnfinishedUpload>>, TierError> {
        let mut uploads = Vec::new();
        let (mut key_marker, mut id_marker): (Option<String>, Option<String>) = (None, None);
        loop {
            let out = self
                .rt
                .block_on(retrying(&self.config, "list multipart uploads", || {
                    self.client
                        .list_multipart_uploads()
                        .bucket(&self.config.bucket)
                        .prefix(&self.prefix)
                        .set_key_marker(key_marker.clone())
                        .set_upload_id_marker(id_marker.clone())
                        .send()
                }));
            let out = match out {
                Ok(out) => out,
                Err((e, _)) if super::status(&e) == Some(501) => return Ok(None),
                Err((e, n)) => {
                    return Err(remote("list multipart uploads under", &self.prefix, &e, n))
                }
            };
            for u in out.uploads() {
                if let (Some(key), Some(id)) = (u.key(), u.upload_id()) {
                    let initiated_unix_ms = u.initiated().map_or(0, |t| {
                        t.secs() * 1000 + i64::from(t.subsec_nanos() / 1_000_000)
                    });
                    uploads.push(UnfinishedUpload {
                        key: key.to_owned(),
                        upload_id: id.to_owned(),
                        initiated_unix_ms,
                    });
                }
            }
            if out.is_truncated() != Some(true) {
                return Ok(Some(uploads));
            }
            key_marker = out.next_key_marker().map(str::to_owned);
            id_marker = out.next_upload_id_marker().map(str::to_owned);
            if key_marker.is_none() && id_marker.is_none() {
                return Ok(Some(uploads));
            }
        }
    }

    /// One collection pass over the whole prefix (see the module docs). Any node may run it
    /// at any time, as often as it likes.
    pub fn collect_garbage(&self) -> Result<GcReport, TierError> {
        let mut report = GcReport::default();
        let now = i64::try_from(now_ms()).unwrap_or(i64::MAX);
        let grace = i64::try_from(self.config.gc_grace().as_millis()).unwrap_or(i64::MAX);
        let old = |modified_ms: i64| now.saturating_sub(modified_ms) >= grace;

        // Leases first, references second: see the module docs.
        let mut leased = BTreeSet::new();
        let mut leased_checkpoints = BTreeSet::new();
        for lease in self.read_leases()? {
            match lease.info {
                Ok(info) if info.is_live(u64::try_from(now).unwrap_or(0)) => {
                    leased.insert(info.upload_key);
                    leased.extend(info.packs);
                    leased_checkpoints.insert(info.checkpoint);
                }
                Ok(_) => {
                    self.delete_key("delete expired lease", &lease.key)?;
                    report.leases_removed += 1;
                }
                Err(problem) if old(lease.modified_ms) => {
                    tracing::warn!(key = %lease.key, %problem, "removing an old unreadable lease object");
                    self.delete_key("delete unreadable lease", &lease.key)?;
                    report.leases_removed += 1;
                }
                Err(problem) => {
                    tracing::warn!(key = %lease.key, %problem,
                        "an unreadable lease object is younger than the grace period; collecting nothing this pass");
                    report.held_back = true;
                    return Ok(report);
                }
            }
        }
        let view = self.bucket_view(true)?;
        let referenced = view.referenced_packs();

        let packs_prefix = self.packs_prefix();
        let packs: BTreeMap<String, i64> = self
            .list_keys(&packs_prefix)?
            .into_iter()
            .map(|o| (o.key[self.prefix.len()..].to_owned(), o.modified_ms))
            .collect();
        let marks = self.marks()?;
        for (pack, (mark_key, marked_ms)) in &marks {
            if !packs.contains_key(pack) {
                // Gone for a grace period: no store's view offers it any more.
                if old(*marked_ms) {
                    self.delete_key("delete mark", mark_key)?;
                }
            } else if referenced.contains(pack) {
                self.delete_key("delete mark", mark_key)?;
                report.marks_cleared += 1;
            } else if old(*marked_ms) && !leased.contains(pack) {
                self.put_object(mark_key, bytes::Bytes::from_static(b"deleted"), false)?;
                self.delete_key("delete pack", &format!("{}{pack}", self.prefix))?;
                report.packs_deleted += 1;
            }
        }
        for (pack, modified_ms) in &packs {
            let keep = marks.contains_key(pack)
                || referenced.contains(pack)
                || leased.contains(pack)
                || !old(*modified_ms);
            if !keep {
                let mark = bytes::Bytes::from_static(b"unreferenced");
                if let Put::Created = self.put_object(&self.mark_key(pack), mark, true)? {
                    report.packs_marked += 1;
                }
            }
        }

        for (name, modified_ms) in &view.orphan_indexes {
            if old(*modified_ms) && !leased_checkpoints.contains(name.as_str()) {
                self.delete_index(name)?;
                report.indexes_removed += 1;
            }
        }

        let Some(uploads) = self.list_uploads()? else {
            tracing::debug!("the S3 server cannot list multipart uploads; none are aborted");
            return Ok(report);
        };
        for upload in uploads {
            let rel = upload.key.strip_prefix(&self.prefix).unwrap_or(&upload.key);
            if old(upload.initiated_unix_ms) && !leased.contains(rel) {
                self.abort_upload(&upload.key, &upload.upload_id)?;
                report.uploads_aborted += 1;
            }
        }
        Ok(report)
    }
}
