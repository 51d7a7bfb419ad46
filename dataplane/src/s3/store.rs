//! Storing an image set: a lease, the chunk pipeline into one pack upload, then the manifest
//! created with `If-None-Match: *`, then the checkpoint's index object.

use std::time::Instant;

use super::lease::UploadLease;
use super::*;

/// How often a store takes a fresh view of the bucket when looking took too long.
const PREPARE_ATTEMPTS: u32 = 3;

/// What a store needs before its first part: the chunks it may reference, its pack, and the
/// lease protecting both.
pub(super) struct PreparedStore<'a> {
    pub index: PackIndex,
    pub pack_rel: String,
    pub pack_id: u32,
    pub lease: UploadLease<'a>,
}

impl S3Tier {
    /// Stores an image set and reports the pipeline's figures (zero, dedup and new bytes).
    pub fn store_with_stats(
        &self,
        name: &CheckpointName,
        image_dir: &Path,
    ) -> Result<(StoreReport, DrainStats), TierError> {
        self.store_known(name, image_dir, None, None)
    }

    /// [`S3Tier::store_with_stats`] with the checkpoint's chunk hashes, when known.
    pub(super) fn store_known(
        &self,
        name: &CheckpointName,
        image_dir: &Path,
        known: Option<&crate::ImageDigest>,
        upload_rate: Option<std::sync::Arc<crate::ByteRate>>,
    ) -> Result<(StoreReport, DrainStats), TierError> {
        if let Some(held) = self.begin_store(name, |existing| {
            self.image_matches(existing, image_dir, known)
        })? {
            return Ok(held);
        }
        let PreparedStore {
            index,
            pack_rel,
            pack_id,
            lease,
        } = self.prepare_store(name)?;
        let total = crate::local_dir::dir_bytes(image_dir).map_err(|e| TierError::Io {
            tier: TIER,
            op: "read image directory",
            path: image_dir.to_owned(),
            source: e,
        })?;
        let part_size = self.config.part_size_for(total);
        let part_pool = BufferPool::new(part_size, self.config.parts_in_flight + 1);
        let mut upload = PackUpload::new(
            self,
            format!("{}{pack_rel}", self.prefix),
            pack_id,
            part_pool,
            upload_rate,
        );
        let drained = drain_image_set(
            TIER,
            name,
            image_dir,
            known,
            &self.chunk,
            self.sealing.writing_key().map(|k| &**k),
            &self.pool,
            &index,
            &mut upload,
        );
        let (manifest, stats) = match drained {
            Ok(done) => done,
            Err(e) => return Err(upload.abort(e)),
        };
        upload.finish()?;
        self.commit(manifest, &index, &lease)?;
        Ok((StoreReport::from(&stats), stats))
    }

    /// Takes a view of the bucket, picks this store's pack key, writes the lease, then drops
    /// every pack garbage collection has marked. When that took half the grace period or
    /// more, a marked pack might already be gone with its mark, so it starts over.
    pub(super) fn prepare_store(
        &self,
        name: &CheckpointName,
    ) -> Result<PreparedStore<'_>, TierError> {
        let limit = self.config.gc_grace() / 2;
        for _ in 0..PREPARE_ATTEMPTS {
            let started = Instant::now();
            let mut index = self.bucket_view(false)?.pack_index();
            let (pack_rel, pack_id) = self.new_pack(name, &mut index);
            let lease = self.acquire_lease(name, &pack_rel, index.offered_packs())?;
            let doomed = self.doomed_packs()?;
            if started.elapsed() >= limit {
                tracing::warn!(checkpoint = %name, took = ?started.elapsed(),
                    "preparing an S3 store took half the GC grace period; starting over");
                continue;
            }
            if index.packs.iter().any(|p| doomed.contains(p)) {
                index.forget_packs(&doomed);
                lease.set_packs(index.offered_packs())?;
            }
            return Ok(PreparedStore {
                index,
                pack_rel,
                pack_id,
                lease,
            });
        }
        Err(TierError::Config {
            tier: TIER,
            detail: format!(
                "gc_grace_secs ({}) is too short: listing the bucket and writing a lease for \
                 checkpoint {name} took more than half of it {PREPARE_ATTEMPTS} times",
                self.config.gc_grace_secs
            ),
        })
    }

    /// Renumbers the global pack ids of `manifest` into its own compact pack table and
    /// creates it, the commit point of a store, while `lease` still protects its packs. Then
    /// writes the checkpoint's index object.
    pub(super) fn commit(
        &self,
        mut manifest: CheckpointManifest,
        index: &PackIndex,
        lease: &UploadLease<'_>,
    ) -> Result<(), TierError> {
        let used: BTreeSet<u32> = manifest
            .files
            .iter()
            .flat_map(|f| f.chunks.iter())
            .filter_map(|c| match c.location {
                ChunkLocation::Pack { pack, .. } => Some(pack),
                ChunkLocation::Store => None,
            })
            .collect();
        let renumber: HashMap<u32, u32> = used
            .iter()
            .enumerate()
            .map(|(i, &g)| (g, u32::try_from(i).expect("fits")))
            .collect();
        manifest.packs = used
            .iter()
            .map(|&g| index.packs[usize::try_from(g).expect("fits")].clone())
            .collect();
        for c in manifest.files.iter_mut().flat_map(|f| f.chunks.iter_mut()) {
            if let ChunkLocation::Pack { pack, .. } = &mut c.location {
                *pack = renumber[pack];
            }
        }
        // The manifest must land while the lease holds; a quarter of the TTL is far more
        // than one small PUT with its retries takes.
        if !lease.holds_for(self.config.lease_ttl() / 4) {
            return Err(lease.lapsed(&manifest.name));
        }
        self.create_manifest(&manifest)?;
        if !lease.holds_for(Duration::ZERO) {
            self.check_packs_after_late_commit(&manifest)?;
        }
        if let Err(e) = self.put_index(&manifest) {
            // The manifest is the commit: collection reads a manifest that has no index.
            tracing::warn!(checkpoint = %manifest.name, error = %e,
                "the checkpoint's index object could not be written; its manifest stands in");
        }
        Ok(())
    }

    /// Creates the manifest with `If-None-Match: *`. When the name is taken, a manifest with
    /// the same contents (this store's own earlier attempt, or the same image stored by
    /// another node) counts as stored; anything else is [`TierError::AlreadyExists`].
    fn create_manifest(&self, manifest: &CheckpointManifest) -> Result<(), TierError> {
        let key = self.manifest_key(&manifest.name);
        let body = self.encode(manifest)?;
        for _ in 0..3 {
            if let Put::Created = self.put_object(&key, body.clone(), true)? {
                return Ok(());
            }
            match self.manifest(&manifest.name) {
                Ok(existing) if same_contents(&existing, manifest) => return Ok(()),
                Ok(_) => return Err(already_exists(&manifest.name)),
                // Removed since: try to create it again.
                Err(TierError::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(already_exists(&manifest.name))
    }

    /// After a commit that may have landed once the lease had run out: makes sure every pack
    /// it references is still there, and takes the commit back if not.
    fn check_packs_after_late_commit(
        &self,
        manifest: &CheckpointManifest,
    ) -> Result<(), TierError> {
        for pack in &manifest.packs {
            let key = format!("{}{pack}", self.prefix);
            let found = self.rt.block_on(retrying(&self.config, "head pack", || {
                self.client
                    .head_object()
                    .bucket(&self.config.bucket)
                    .key(&key)
                    .send()
            }));
            match found {
                Ok(_) => {}
                Err((e, _)) if status(&e) == Some(404) => {
                    self.delete_key("delete manifest", &self.manifest_key(&manifest.name))?;
                    return Err(TierError::Remote {
                        tier: TIER,
                        op: format!("commit checkpoint {}", manifest.name),
                        key,
                        detail: "the upload lease ran out before the commit and garbage \
                                 collection removed a pack it references; the commit was undone"
                            .into(),
                    });
                }
                Err((e, n)) => return Err(remote("head", &key, &e, n)),
            }
        }
        Ok(())
    }

    /// Starts a store of `name`: clears pending aborts, and returns `Some(report)` if the
    /// tier already holds `name` with the contents `matches` accepts, an
    /// [`TierError::AlreadyExists`] if it holds another checkpoint under that name, and
    /// `None` if it holds nothing.
    pub(super) fn begin_store(
        &self,
        name: &CheckpointName,
        matches: impl FnOnce(&CheckpointManifest) -> Result<bool, TierError>,
    ) -> Result<Option<(StoreReport, DrainStats)>, TierError> {
        if let Err(e) = self.abort_pending_uploads() {
            tracing::warn!(error = %e, "earlier multipart uploads could not be aborted yet");
        }
        let existing = match self.manifest(name) {
            Ok(m) => m,
            Err(TierError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        if !matches(&existing)? {
            return Err(already_exists(name));
        }
        let raw = existing.raw_bytes();
        let report = StoreReport {
            raw_bytes: raw,
            ..StoreReport::default()
        };
        let stats = DrainStats {
            raw_bytes: raw,
            ..DrainStats::default()
        };
        Ok(Some((report, stats)))
    }

    /// Whether the image set in `dir` (with chunk hashes `known`, if given) is the one
    /// `existing` describes.
    fn image_matches(
        &self,
        existing: &CheckpointManifest,
        dir: &Path,
        known: Option<&crate::ImageDigest>,
    ) -> Result<bool, TierError> {
        let chunk_size = usize::try_from(existing.chunk_size).expect("u32 fits usize");
        // A sealed checkpoint's addresses are keyed: the plain digest cannot be compared.
        let key = self.opening_key(existing)?;
        let digest = match known {
            Some(d) if d.chunk_size == chunk_size && key.is_none() => d.clone(),
            _ => crate::digest::digest_image_set_keyed(
                dir,
                &ChunkConfig {
                    chunk_size,
                    ..self.chunk.clone()
                },
                key.map(|k| &**k),
            )?,
        };
        Ok(digest.files.len() == existing.files.len()
            && digest.files.iter().zip(&existing.files).all(|(d, m)| {
                d.name == m.name
                    && d.size == m.size
                    && d.chunks.iter().eq(m.chunks.iter().map(|c| &c.hash))
            }))
    }

    /// A new pack key for `name`, registered in `index`; returns (relative key, pack id).
    pub(super) fn new_pack(&self, name: &CheckpointName, index: &mut PackIndex) -> (String, u32) {
        let pack_rel = format!("packs/{name}-{}-{}.pack", self.node_id, unique_nonce());
        let pack_id = u32::try_from(index.packs.len()).expect("fewer than 4G packs");
        index.packs.push(pack_rel.clone());
        (pack_rel, pack_id)
    }
}

/// Whether two manifests describe the same image set (wherever their chunks are stored).
pub(super) fn same_contents(a: &CheckpointManifest, b: &CheckpointManifest) -> bool {
    a.name == b.name
        && a.chunk_size == b.chunk_size
        && a.files.len() == b.files.len()
        && a.files.iter().zip(&b.files).all(|(x, y)| {
            x.name == y.name
                && x.size == y.size
                && x.mode == y.mode
                && x.chunks
                    .iter()
                    .map(|c| c.hash)
                    .eq(y.chunks.iter().map(|c| c.hash))
        })
}

/// The error of a store under a name the tier already holds with other contents.
pub(super) fn already_exists(name: &CheckpointName) -> TierError {
    TierError::AlreadyExists {
        tier: TIER,
        name: name.clone(),
        detail: "it was written by another node or by an earlier checkpoint of that name, and \
                 is never overwritten; use another name, or delete the existing checkpoint first"
            .into(),
    }
}
