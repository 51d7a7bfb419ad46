//! Storing an image set: the chunk pipeline into one pack upload, then the manifest.

use super::*;

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
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = self.begin_store(name)? {
            return Ok(held);
        }
        let mut index = self.build_index()?;
        let (pack_rel, pack_id) = self.new_pack(name, &mut index);
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
            &self.pool,
            &index,
            &mut upload,
        );
        let (manifest, stats) = match drained {
            Ok(done) => done,
            Err(e) => return Err(upload.abort(e)),
        };
        upload.finish()?;
        self.commit(manifest, &index)?;
        Ok((StoreReport::from(&stats), stats))
    }

    /// Renumbers the global pack ids of `manifest` into its own compact pack table and writes
    /// it: the commit point of a store.
    pub(super) fn commit(
        &self,
        mut manifest: CheckpointManifest,
        index: &PackIndex,
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
        self.put_manifest(&manifest)
    }

    /// Starts a store of `name`: clears pending aborts, and returns `Some(report)` if the
    /// checkpoint is already held.
    pub(super) fn begin_store(
        &self,
        name: &CheckpointName,
    ) -> Result<Option<(StoreReport, DrainStats)>, TierError> {
        if let Err(e) = self.abort_pending_uploads() {
            tracing::warn!(error = %e, "earlier multipart uploads could not be aborted yet");
        }
        if !self.contains(name)? {
            return Ok(None);
        }
        let raw = self.manifest(name)?.raw_bytes();
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

    /// A new pack key for `name`, registered in `index`; returns (relative key, pack id).
    pub(super) fn new_pack(&self, name: &CheckpointName, index: &mut PackIndex) -> (String, u32) {
        let nonce = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let pack_rel = format!("packs/{name}-{nonce:x}.pack");
        let pack_id = u32::try_from(index.packs.len()).expect("fewer than 4G packs");
        index.packs.push(pack_rel.clone());
        (pack_rel, pack_id)
    }

    fn put_manifest(&self, manifest: &CheckpointManifest) -> Result<(), TierError> {
        let key = self.manifest_key(&manifest.name);
        let mut buf = Vec::new();
        manifest
            .write_to(&mut buf)
            .map_err(|e| TierError::Corrupt {
                tier: TIER,
                name: manifest.name.clone(),
                detail: format!("manifest cannot be encoded: {e}"),
            })?;
        let body = bytes::Bytes::from(buf);
        self.rt
            .block_on(retrying(&self.config, "put manifest", || {
                self.client
                    .put_object()
                    .bucket(&self.config.bucket)
                    .key(&key)
                    .body(ByteStream::from(body.clone()))
                    .send()
            }))
            .map(|_| ())
            .map_err(|(e, n)| remote("put manifest", &key, &e, n))
    }
}
