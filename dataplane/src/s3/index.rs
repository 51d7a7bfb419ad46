//! The per-checkpoint index objects (`<prefix>index/<checkpoint>`): which packs a checkpoint
//! uses and its distinct stored chunks, so that neither a store (looking for chunks to
//! deduplicate against) nor garbage collection (looking for packs still in use) reads every
//! manifest every time.
//!
//! Why one small object per checkpoint rather than one shared index: a shared object would
//! need a compare-and-swap loop (`If-Match` on its ETag) that every store and every removal
//! on every node contends on, and one lost update loses a reference, which garbage collection
//! would then turn into a deleted pack. Objects of their own cannot lose each other's entries:
//! each is written once by the node that committed the checkpoint, and a LIST of `index/`
//! (one request per thousand checkpoints) shows them all. Index objects never change within
//! one generation of a checkpoint, so each node keeps the ones it has read in memory, keyed by
//! name and LastModified, and a store only fetches the ones that are new since the last.
//!
//! An index object is valid only when it is at least as new as its manifest (it is written
//! after the manifest commit): an older one was left by an earlier checkpoint of the same name
//! whose removal was cut short, and its manifest is read instead. A manifest without a valid
//! index (a store cut off between its commit and its index write, or a bucket written before
//! index objects existed) is read directly, so every committed checkpoint's packs are known.
//!
//! The object is encoded like a manifest (same magic, version, checksum and size caps, same
//! validating parser), with a single entry `distinct-chunks` holding every pack-stored chunk
//! of the checkpoint once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::request::{remote, retrying, status};
use super::{PackIndex, S3Tier, TIER};
use crate::manifest::{ChunkLocation, FileEntry, MAX_MANIFEST_BYTES};
use crate::{CheckpointManifest, CheckpointName, TierError};

/// Name of the one entry of an index object.
const DISTINCT_CHUNKS: &str = "distinct-chunks";

/// What the bucket holds right now, as one pass of a store or of garbage collection sees it.
pub(crate) struct BucketView {
    /// The index (or, lacking a valid one, the manifest) of every committed checkpoint.
    pub checkpoints: Vec<Arc<CheckpointManifest>>,
    /// Index objects with no manifest beside them: (checkpoint, LastModified in ms).
    pub orphan_indexes: Vec<(CheckpointName, i64)>,
}

impl BucketView {
    /// Relative keys of every pack a committed checkpoint uses.
    pub fn referenced_packs(&self) -> BTreeSet<String> {
        self.checkpoints
            .iter()
            .flat_map(|m| m.packs.iter().cloned())
            .collect()
    }

    /// The chunks the committed checkpoints hold in packs, with global pack numbers.
    pub fn pack_index(&self) -> PackIndex {
        let mut index = PackIndex::default();
        let mut pack_ids: HashMap<&str, u32> = HashMap::new();
        for m in &self.checkpoints {
            for c in m.files.iter().flat_map(|f| f.chunks.iter()) {
                let ChunkLocation::Pack { pack, offset } = c.location else {
                    continue;
                };
                let key = &m.packs[usize::try_from(pack).expect("validated index")];
                let next = u32::try_from(index.packs.len()).expect("fewer than 4G packs");
                let id = *pack_ids.entry(key.as_str()).or_insert_with(|| {
                    index.packs.push(key.clone());
                    next
                });
                index
                    .chunks
                    .entry(c.hash)
                    .or_insert((c.encoding, c.stored_len, id, offset));
            }
        }
        index
    }
}

impl S3Tier {
    /// Object key of the index object of `name`.
    pub fn index_key(&self, name: &CheckpointName) -> String {
        format!("{}index/{name}", self.prefix)
    }

    /// Writes the index object of the just committed `manifest`. It is created with
    /// `If-None-Match: *`; when one is there already, it is left alone if it says the same
    /// (our own earlier attempt whose answer was lost) and replaced otherwise (a leftover of an
    /// earlier checkpoint of this name: the manifest is ours now).
    pub(super) fn put_index(&self, manifest: &CheckpointManifest) -> Result<(), TierError> {
        let index = index_of(manifest);
        let body = self.encode(&index)?;
        let key = self.index_key(&manifest.name);
        match self.put_object(&key, body.clone(), true)? {
            super::Put::Created => Ok(()),
            super::Put::Exists => {
                if self.read_index(&manifest.name)?.as_ref() == Some(&index) {
                    return Ok(());
                }
                self.put_object(&key, body, false).map(|_| ())
            }
        }
    }

    fn read_index(&self, name: &CheckpointName) -> Result<Option<CheckpointManifest>, TierError> {
        let key = self.index_key(name);
        let corrupt = |detail: String| TierError::Corrupt {
            tier: TIER,
            name: name.clone(),
            detail: format!("index object {key}: {detail}"),
        };
        let Some(body) = self.get_small("get index", &key, MAX_MANIFEST_BYTES + 64, corrupt)?
        else {
            return Ok(None);
        };
        let index = self.parse_manifest(name, &key, &body)?;
        if &index.name != name {
            return Err(corrupt(format!("names checkpoint {}", index.name)));
        }
        Ok(Some(index))
    }

    /// Deletes the index object of `name`; a missing one is no error.
    pub(super) fn delete_index(&self, name: &CheckpointName) -> Result<(), TierError> {
        self.delete_key("delete index", &self.index_key(name))
    }

    /// Lists manifests and index objects and reads the valid index of every checkpoint (from
    /// the cache when it has not changed), or its manifest when it has none or a damaged one.
    /// A damaged manifest fails a `strict` view (garbage collection cannot know what it
    /// references) and is skipped otherwise (a store then only deduplicates less).
    pub(super) fn bucket_view(&self, strict: bool) -> Result<BucketView, TierError> {
        let manifests_prefix = format!("{}manifests/", self.prefix);
        let index_prefix = format!("{}index/", self.prefix);
        let manifests = self.names_under(&manifests_prefix)?;
        let indexes = self.names_under(&index_prefix)?;
        let mut checkpoints = Vec::with_capacity(manifests.len());
        let mut seen = BTreeSet::new();
        for (name, manifest_modified) in &manifests {
            let valid_index = indexes
                .get(name)
                .filter(|&&index_modified| index_modified >= *manifest_modified);
            let read = match valid_index {
                Some(&modified) => {
                    match self.cached(name, 'i', modified, || self.read_index(name)) {
                        Err(
                            TierError::Corrupt { detail, .. } | TierError::Sealing { detail, .. },
                        ) => {
                            tracing::warn!(checkpoint = %name, %detail, "ignoring a damaged or unreadable index object");
                            None
                        }
                        other => other?,
                    }
                }
                None => None,
            };
            let read = match read {
                Some(index) => Some(index),
                None => {
                    let m = self.cached(name, 'm', *manifest_modified, || {
                        match self.manifest(name) {
                            Ok(m) => Ok(Some(m)),
                            // Removed since the listing: it references nothing any more.
                            Err(TierError::NotFound { .. }) => Ok(None),
                            Err(e) => Err(e),
                        }
                    });
                    match m {
                        Err(
                            TierError::Corrupt { detail, .. } | TierError::Sealing { detail, .. },
                        ) if !strict => {
                            tracing::warn!(checkpoint = %name, %detail,
                                "a damaged manifest, or one sealed with a key this node lacks, offers no chunks to deduplicate against");
                            None
                        }
                        other => other?,
                    }
                }
            };
            if let Some(m) = read {
                seen.insert(name.clone());
                checkpoints.push(m);
            }
        }
        let mut cache = self.index_cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|(_, name), _| seen.contains(name));
        drop(cache);
        let orphan_indexes = indexes
            .into_iter()
            .filter(|(name, _)| !manifests.contains_key(name))
            .collect();
        Ok(BucketView {
            checkpoints,
            orphan_indexes,
        })
    }

    /// `read()`'s result for (`kind`, `name`) as last modified at `modified`, from the cache
    /// when it holds that version.
    fn cached(
        &self,
        name: &CheckpointName,
        kind: char,
        modified: i64,
        read: impl FnOnce() -> Result<Option<CheckpointManifest>, TierError>,
    ) -> Result<Option<Arc<CheckpointManifest>>, TierError> {
        let key = (kind, name.clone());
        {
            let cache = self.index_cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((m, held)) = cache.get(&key) {
                if *m == modified {
                    return Ok(Some(Arc::clone(held)));
                }
            }
        }
        let Some(fresh) = read()? else {
            return Ok(None);
        };
        let fresh = Arc::new(fresh);
        let mut cache = self.index_cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.insert(key, (modified, Arc::clone(&fresh)));
        Ok(Some(fresh))
    }

    /// Checkpoint name → LastModified (ms) of the objects directly under `prefix`; keys that
    /// are not checkpoint names are not ours and are skipped.
    fn names_under(&self, prefix: &str) -> Result<BTreeMap<CheckpointName, i64>, TierError> {
        Ok(self
            .list_keys(prefix)?
            .into_iter()
            .filter_map(|o| {
                let name = CheckpointName::new(&o.key[prefix.len()..]).ok()?;
                Some((name, o.modified_ms))
            })
            .collect())
    }

    /// Deletes `key`; a missing object is no error.
    pub(super) fn delete_key(&self, op: &str, key: &str) -> Result<(), TierError> {
        let result = self.rt.block_on(retrying(&self.config, op, || {
            self.client
                .delete_object()
                .bucket(&self.config.bucket)
                .key(key)
                .send()
        }));
        match result {
            Ok(_) => Ok(()),
            Err((e, _)) if status(&e) == Some(404) => Ok(()),
            Err((e, n)) => Err(remote(op, key, &e, n)),
        }
    }
}

/// The index object of `manifest`: its packs and each of its pack-stored chunks once.
fn index_of(manifest: &CheckpointManifest) -> CheckpointManifest {
    let mut seen = BTreeSet::new();
    let chunks: Vec<_> = manifest
        .files
        .iter()
        .flat_map(|f| f.chunks.iter())
        .filter(|c| matches!(c.location, ChunkLocation::Pack { .. }) && seen.insert(c.hash))
        .copied()
        .collect();
    let size = chunks.iter().map(|c| u64::from(c.raw_len)).sum();
    CheckpointManifest {
        name: manifest.name.clone(),
        key_id: manifest.key_id.clone(),
        chunk_size: manifest.chunk_size,
        packs: manifest.packs.clone(),
        files: vec![FileEntry {
            name: DISTINCT_CHUNKS.into(),
            size,
            mode: 0,
            chunks,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{ChunkEncoding, ChunkHash};
    use crate::manifest::ChunkRef;

    #[test]
    fn the_index_keeps_packs_and_each_stored_chunk_once() {
        let chunk = |b: u8, location| ChunkRef {
            hash: if b == 0 {
                ChunkHash::ZERO
            } else {
                ChunkHash([b; 32])
            },
            encoding: if b == 0 {
                ChunkEncoding::Zero
            } else {
                ChunkEncoding::Raw
            },
            raw_len: 4096,
            stored_len: if b == 0 { 0 } else { 4096 },
            location,
        };
        let at = |pack, offset| ChunkLocation::Pack { pack, offset };
        let manifest = CheckpointManifest {
            name: CheckpointName::new("cp").unwrap(),
            key_id: None,
            chunk_size: 4096,
            packs: vec!["packs/a.pack".into(), "packs/b.pack".into()],
            files: vec![
                FileEntry {
                    name: "core-1.img".into(),
                    size: 8192,
                    mode: 0o600,
                    chunks: vec![chunk(1, at(0, 0)), chunk(0, ChunkLocation::Store)],
                },
                FileEntry {
                    name: "pages-1.img".into(),
                    size: 12288,
                    mode: 0o600,
                    chunks: vec![chunk(1, at(0, 0)), chunk(2, at(1, 0)), chunk(1, at(0, 0))],
                },
            ],
        };
        let index = index_of(&manifest);
        assert_eq!(index.packs, manifest.packs);
        assert_eq!(index.files.len(), 1);
        let hashes: Vec<_> = index.files[0].chunks.iter().map(|c| c.hash.0[0]).collect();
        assert_eq!(hashes, vec![1, 2]);
        let mut bytes = Vec::new();
        index.write_to(&mut bytes).unwrap();
        assert_eq!(CheckpointManifest::read_from(&bytes[..]).unwrap(), index);
        let view = BucketView {
            checkpoints: vec![Arc::new(index)],
            orphan_indexes: Vec::new(),
        };
        assert_eq!(view.referenced_packs().len(), 2);
        assert_eq!(view.pack_index().chunks.len(), 2);
    }
}
