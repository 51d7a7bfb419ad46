//! Demotion NVMe → S3 without the RAM copy: the NVMe tier's chunks are already cut, compressed
//! and addressed, so they are verified and uploaded as they are, not recompressed.

use std::collections::HashMap;

use super::store::{same_contents, PreparedStore};
use super::upload::PackUpload;
use super::{S3Tier, TIER};
use crate::buffer::BufferPool;
use crate::chunk::{decode_into, open_stored, ChunkEncoding, ChunkHash};
use crate::manifest::ChunkRef;
use crate::pipeline::{ChunkIndex, ChunkWriter, DrainStats, StoredChunk};
use crate::restore::ChunkFetch;
use crate::{CheckpointName, NvmeTier, StoreReport, TierError};

impl S3Tier {
    /// Stores checkpoint `name` held by `nvme` into this tier, uploading only chunks no pack
    /// under the prefix holds yet. Each chunk is verified against its hash before it leaves the
    /// node, so a damaged NVMe copy is an error, never a damaged S3 copy.
    pub fn store_from_nvme(
        &self,
        name: &CheckpointName,
        nvme: &NvmeTier,
    ) -> Result<(StoreReport, DrainStats), TierError> {
        let mut source = nvme.manifest(name)?;
        let source_key = nvme.opening_key(&source)?.cloned();
        if source_key.is_none() && self.sealing.writing_key().is_some() {
            // Copying the chunks as they are would put plaintext into an encrypted bucket.
            return Err(TierError::Sealing {
                tier: TIER,
                name: name.clone(),
                detail: "its NVMe copy is unencrypted and this tier stores encrypted \
                         checkpoints; store it from the RAM copy or re-encrypt it first"
                    .into(),
            });
        }
        if let Some(held) =
            self.begin_store(name, |existing| Ok(same_contents(existing, &source)))?
        {
            return Ok(held);
        }
        let PreparedStore {
            index,
            pack_rel,
            pack_id,
            lease,
        } = self.prepare_store(name)?;
        let total: u64 = source
            .files
            .iter()
            .flat_map(|f| f.chunks.iter())
            .map(|c| u64::from(c.stored_len))
            .sum();
        let part_pool = BufferPool::new(
            self.config.part_size_for(total),
            self.config.parts_in_flight + 1,
        );
        let mut upload = PackUpload::new(
            self,
            format!("{}{pack_rel}", self.prefix),
            pack_id,
            part_pool,
            None,
        );
        let chunk_size = usize::try_from(source.chunk_size).expect("u32 fits usize");
        let buffers = BufferPool::new(chunk_size + crate::SEAL_OVERHEAD, 2);
        let mut stats = DrainStats::default();
        let mut written: HashMap<ChunkHash, StoredChunk> = HashMap::new();
        let mut decompressor = zstd::bulk::Decompressor::new().map_err(|e| TierError::Io {
            tier: TIER,
            op: "start decompressor",
            path: Default::default(),
            source: e,
        })?;
        let mut files = std::mem::take(&mut source.files);
        let copied = (|| {
            for f in &mut files {
                for (i, c) in f.chunks.iter_mut().enumerate() {
                    stats.raw_bytes += u64::from(c.raw_len);
                    if c.encoding == ChunkEncoding::Zero {
                        stats.zero_bytes += u64::from(c.raw_len);
                        continue;
                    }
                    let known = match written.get(&c.hash) {
                        Some(s) => Some(*s),
                        None => index.lookup(&c.hash, c.raw_len)?,
                    };
                    let stored = match known {
                        Some(s) => {
                            stats.dedup_bytes += u64::from(c.raw_len);
                            s
                        }
                        None => {
                            let s = self.copy_chunk(
                                nvme,
                                &source,
                                &f.name,
                                i,
                                c,
                                source_key.as_deref(),
                                &buffers,
                                &mut decompressor,
                                &mut upload,
                            )?;
                            stats.new_chunks += 1;
                            stats.new_stored_bytes += u64::from(s.stored_len);
                            written.insert(c.hash, s);
                            s
                        }
                    };
                    c.encoding = stored.encoding;
                    c.stored_len = stored.stored_len;
                    c.location = stored.location;
                }
            }
            Ok(())
        })();
        if let Err(e) = copied {
            return Err(upload.abort(e));
        }
        upload.finish()?;
        source.files = files;
        self.commit(source, &index, &lease)?;
        Ok((StoreReport::from(&stats), stats))
    }

    #[allow(clippy::too_many_arguments)]
    fn copy_chunk(
        &self,
        nvme: &NvmeTier,
        source: &crate::CheckpointManifest,
        file: &str,
        index: usize,
        chunk: &ChunkRef,
        key: Option<&crate::SealKey>,
        buffers: &BufferPool,
        decompressor: &mut zstd::bulk::Decompressor<'_>,
        upload: &mut PackUpload<'_>,
    ) -> Result<StoredChunk, TierError> {
        let mut stored = buffers.take();
        nvme.fetch(source, file, index, chunk, &mut stored)?;
        let mut scratch = buffers.take();
        let raw_len = usize::try_from(chunk.raw_len).expect("u32 fits usize");
        // The sealed bytes are uploaded as they are; a copy is opened only to check them.
        let mut sealed = Vec::new();
        let encoded = match key {
            None => Ok(stored.as_slice()),
            Some(_) => {
                sealed.extend_from_slice(stored.as_slice());
                open_stored(key, &chunk.hash, chunk.encoding, chunk.raw_len, &mut sealed)
            }
        };
        encoded
            .and_then(|encoded| {
                decode_into(
                    chunk.encoding,
                    encoded,
                    &chunk.hash,
                    key,
                    decompressor,
                    &mut scratch.spare_mut()[..raw_len],
                )
            })
            .map_err(|e| TierError::Corrupt {
                tier: nvme_kind(),
                name: source.name.clone(),
                detail: format!("file {file} chunk {index} ({}): {e}", chunk.hash),
            })?;
        drop(scratch);
        upload.put(chunk.hash, chunk.encoding, stored)
    }
}

fn nvme_kind() -> crate::TierKind {
    crate::TierKind::Nvme
}
