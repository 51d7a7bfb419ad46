//! Reading chunks back with ranged GETs, and the [`Tier`] operations on manifests and packs.

use super::*;

impl ChunkFetch for S3Tier {
    fn fetch(
        &self,
        manifest: &CheckpointManifest,
        file: &str,
        index: usize,
        chunk: &ChunkRef,
        buf: &mut AlignedBuf,
    ) -> Result<(), TierError> {
        let corrupt = |what: String| TierError::Corrupt {
            tier: TIER,
            name: manifest.name.clone(),
            detail: format!("file {file} chunk {index} ({}): {what}", chunk.hash),
        };
        let ChunkLocation::Pack { pack, offset } = chunk.location else {
            return Err(corrupt("the manifest gives no pack for it".into()));
        };
        let key = format!(
            "{}{}",
            self.prefix,
            manifest.packs[usize::try_from(pack).expect("validated")]
        );
        let len = usize::try_from(chunk.stored_len).expect("fits");
        if len > buf.capacity() {
            return Err(corrupt(format!(
                "stored length {len} exceeds the chunk size"
            )));
        }
        let range = format!(
            "bytes={offset}-{}",
            offset + u64::from(chunk.stored_len) - 1
        );
        let result = self.rt.block_on(async {
            let out = retrying(&self.config, "get chunk", || {
                self.client
                    .get_object()
                    .bucket(&self.config.bucket)
                    .key(&key)
                    .range(&range)
                    .send()
            })
            .await
            .map_err(|(e, n)| {
                if status(&e) == Some(416) {
                    corrupt(format!("pack {key} is shorter than the manifest says (HTTP 416 for {range})"))
                } else {
                    let op = format!(
                        "checkpoint {} file {file} chunk {index}: ranged get {range} of",
                        manifest.name
                    );
                    remote(op, &key, &e, n)
                }
            })?;
            let mut body = out.body;
            let mut filled = 0usize;
            let dest = buf.spare_mut();
            while let Some(piece) = body
                .try_next()
                .await
                .map_err(|e| corrupt(format!("reading {key} {range} failed: {e}")))?
            {
                if filled + piece.len() > len {
                    return Err(corrupt(format!("{key} returned more than {len} bytes")));
                }
                dest[filled..filled + piece.len()].copy_from_slice(&piece);
                filled += piece.len();
            }
            if filled != len {
                return Err(corrupt(format!(
                    "pack {key} is shorter than the manifest says: {range} returned {filled} of {len} bytes"
                )));
            }
            Ok(())
        });
        result?;
        buf.set_len(len);
        Ok(())
    }
}

/// The tier's ranged GETs, each waiting for the download limit first when one applies.
struct PacedFetch<'a> {
    tier: &'a S3Tier,
    rate: Option<&'a crate::ByteRate>,
}

impl ChunkFetch for PacedFetch<'_> {
    fn fetch(
        &self,
        manifest: &CheckpointManifest,
        file: &str,
        index: usize,
        chunk: &ChunkRef,
        buf: &mut AlignedBuf,
    ) -> Result<(), TierError> {
        if let Some(rate) = self.rate {
            rate.pace_blocking(u64::from(chunk.stored_len));
        }
        self.tier.fetch(manifest, file, index, chunk, buf)
    }
}

impl Tier for S3Tier {
    fn kind(&self) -> TierKind {
        TIER
    }

    fn store(&self, name: &CheckpointName, image_dir: &Path) -> Result<StoreReport, TierError> {
        self.store_with_stats(name, image_dir).map(|(r, _)| r)
    }

    fn store_paced(
        &self,
        name: &CheckpointName,
        image_dir: &Path,
        digest: Option<&crate::ImageDigest>,
        pacing: &crate::Pacing,
    ) -> Result<StoreReport, TierError> {
        self.store_known(name, image_dir, digest, pacing.upload.clone())
            .map(|(r, _)| r)
    }

    fn load(&self, name: &CheckpointName, dest: &Path) -> Result<LoadReport, TierError> {
        self.load_paced(name, dest, &crate::Pacing::default())
    }

    fn load_paced(
        &self,
        name: &CheckpointName,
        dest: &Path,
        pacing: &crate::Pacing,
    ) -> Result<LoadReport, TierError> {
        let manifest = self.manifest(name)?;
        let key = self.opening_key(&manifest)?;
        let fetch = PacedFetch {
            tier: self,
            rate: pacing.download.as_deref(),
        };
        restore_image_set(
            TIER,
            &manifest,
            key.map(|k| &**k),
            dest,
            &fetch,
            &self.pool,
            self.config.fetch_concurrency,
        )
    }

    fn contains(&self, name: &CheckpointName) -> Result<bool, TierError> {
        let key = self.manifest_key(name);
        let result = self
            .rt
            .block_on(retrying(&self.config, "head manifest", || {
                self.client
                    .head_object()
                    .bucket(&self.config.bucket)
                    .key(&key)
                    .send()
            }));
        match result {
            Ok(_) => Ok(true),
            Err((e, _)) if status(&e) == Some(404) => Ok(false),
            Err((e, n)) => Err(remote("head", &key, &e, n)),
        }
    }

    /// Deletes the checkpoint (manifest, index object, record), then runs one garbage
    /// collection pass. The pass only ever deletes what the rules in [`super::gc`] allow, so
    /// packs the removed checkpoint shared with others, or that a store on another node is
    /// about to reference, stay; a failed pass is logged and left to the next one.
    fn remove(&self, name: &CheckpointName) -> Result<bool, TierError> {
        // The record goes too: without a copy, no other node can restore the checkpoint.
        self.delete_record(name)?;
        if !self.contains(name)? {
            return Ok(false);
        }
        self.delete_key("delete manifest", &self.manifest_key(name))?;
        self.delete_index(name)?;
        match self.collect_garbage() {
            Ok(report) => tracing::debug!(checkpoint = %name, ?report, "S3 garbage collection"),
            Err(e) => tracing::warn!(checkpoint = %name, error = %e,
                "S3 garbage collection failed; the next removal or sweep retries it"),
        }
        Ok(true)
    }

    fn list(&self) -> Result<Vec<CheckpointName>, TierError> {
        let prefix = format!("{}manifests/", self.prefix);
        let mut names: Vec<_> = self
            .list_keys(&prefix)?
            .into_iter()
            .filter_map(|o| CheckpointName::new(&o.key[prefix.len()..]).ok())
            .collect();
        names.sort();
        Ok(names)
    }

    fn put_record(&self, name: &CheckpointName, record: &[u8]) -> Result<(), TierError> {
        self.write_record(name, record)
    }

    fn get_record(&self, name: &CheckpointName) -> Result<Option<Vec<u8>>, TierError> {
        self.read_record(name)
    }

    fn used_bytes(&self) -> Result<u64, TierError> {
        let keys = self.list_keys(&self.prefix)?;
        Ok(keys
            .iter()
            .map(|o| u64::try_from(o.size).unwrap_or(0))
            .sum())
    }
}
