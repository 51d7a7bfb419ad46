//! What the NVMe tier holds, kept in memory: its checkpoints, which chunks each references,
//! which chunks stores in progress use, and the bytes of its chunk files. `contains`, `list`
//! and `used_bytes` answer from here and never wait for a store, and stores run side by side
//! instead of one after the other behind a tier-wide lock.
//!
//! Garbage collection is safe without that lock because of two counts kept under one mutex:
//! a chunk file is removed only when no manifest references it *and* no store in progress
//! has pinned it. A store pins every chunk before it deduplicates against it or writes it,
//! adds its manifest's references when it commits, and only then drops its pins.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use crate::chunk::{ChunkEncoding, ChunkHash};
use crate::manifest::CheckpointManifest;
use crate::CheckpointName;

#[derive(Debug, Default)]
struct IndexState {
    /// Every committed checkpoint with the distinct stored chunks its manifest references.
    checkpoints: BTreeMap<CheckpointName, Vec<ChunkHash>>,
    /// How many manifests reference each chunk.
    referenced: HashMap<ChunkHash, u32>,
    /// How many stores in progress use each chunk.
    pinned: HashMap<ChunkHash, u32>,
    /// Length of every chunk file on disk.
    on_disk: HashMap<ChunkHash, u64>,
    used_bytes: u64,
    /// Whether every manifest could be read when the tier opened; if not, nothing is ever
    /// collected, because a chunk may belong to the unreadable one.
    complete: bool,
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct NvmeIndex {
    state: Mutex<IndexState>,
}

/// The distinct stored (non-zero) chunks of `manifest`.
pub(crate) fn stored_chunks(manifest: &CheckpointManifest) -> Vec<ChunkHash> {
    let set: HashSet<ChunkHash> = manifest
        .files
        .iter()
        .flat_map(|f| f.chunks.iter())
        .filter(|c| c.encoding != ChunkEncoding::Zero)
        .map(|c| c.hash)
        .collect();
    set.into_iter().collect()
}

impl NvmeIndex {
    fn lock(&self) -> MutexGuard<'_, IndexState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An index of `manifests` and of the chunk files `chunks` (hash, length); `complete`
    /// says whether every manifest on disk is among them.
    pub fn build(
        manifests: Vec<CheckpointManifest>,
        chunks: Vec<(ChunkHash, u64)>,
        complete: bool,
    ) -> Self {
        let index = Self::default();
        {
            let mut s = index.lock();
            s.complete = complete;
            for (hash, len) in chunks {
                s.used_bytes += len;
                s.on_disk.insert(hash, len);
            }
            for m in manifests {
                add_checkpoint(&mut s, &m);
            }
        }
        index
    }

    pub fn contains(&self, name: &CheckpointName) -> bool {
        self.lock().checkpoints.contains_key(name)
    }

    pub fn list(&self) -> Vec<CheckpointName> {
        self.lock().checkpoints.keys().cloned().collect()
    }

    pub fn used_bytes(&self) -> u64 {
        self.lock().used_bytes
    }

    /// Removes, with `remove`, every chunk file no manifest references and no store uses
    /// (the start-up sweep); returns how many went.
    pub fn sweep(&self, remove: impl FnMut(&ChunkHash) -> bool) -> usize {
        let mut s = self.lock();
        let before = s.on_disk.len();
        let all: Vec<ChunkHash> = s.on_disk.keys().copied().collect();
        collect(&mut s, all.into_iter(), remove);
        before - s.on_disk.len()
    }

    /// A store in progress uses `hash` from now until it calls [`NvmeIndex::unpin`].
    pub fn pin(&self, hash: ChunkHash) {
        *self.lock().pinned.entry(hash).or_insert(0) += 1;
    }

    /// A chunk file of `len` bytes is on disk now.
    pub fn chunk_written(&self, hash: ChunkHash, len: u64) {
        let mut s = self.lock();
        if let Some(old) = s.on_disk.insert(hash, len) {
            s.used_bytes -= old;
        }
        s.used_bytes += len;
    }

    /// Makes `manifest` a committed checkpoint: its chunks are referenced from now on.
    /// Called after the manifest file is in place, before the store drops its pins.
    pub fn committed(&self, manifest: &CheckpointManifest) {
        add_checkpoint(&mut self.lock(), manifest);
    }

    /// A store ends and drops its pins on `hashes`; each chunk that no manifest references
    /// and no other store uses is garbage and is removed with `remove` (which gets its hash).
    pub fn unpin(&self, hashes: &HashSet<ChunkHash>, remove: impl FnMut(&ChunkHash) -> bool) {
        let mut s = self.lock();
        for hash in hashes {
            if let Some(n) = s.pinned.get_mut(hash) {
                *n -= 1;
                if *n == 0 {
                    s.pinned.remove(hash);
                }
            }
        }
        collect(&mut s, hashes.iter().copied(), remove);
    }

    /// Forgets checkpoint `name` (its manifest is gone) and removes, with `remove`, the
    /// chunks only it referenced that no store in progress uses. Returns whether it was held.
    pub fn removed(&self, name: &CheckpointName, remove: impl FnMut(&ChunkHash) -> bool) -> bool {
        let mut s = self.lock();
        let Some(hashes) = s.checkpoints.remove(name) else {
            return false;
        };
        for hash in &hashes {
            if let Some(n) = s.referenced.get_mut(hash) {
                *n -= 1;
                if *n == 0 {
                    s.referenced.remove(hash);
                }
            }
        }
        collect(&mut s, hashes.into_iter(), remove);
        true
    }
}

impl NvmeIndex {
    /// `manifest` was committed in place of the checkpoint of the same name (re-encryption):
    /// its chunks are referenced first, then the old ones nothing references any more go.
    pub fn replaced(&self, manifest: &CheckpointManifest, remove: impl FnMut(&ChunkHash) -> bool) {
        let mut s = self.lock();
        let old = s.checkpoints.remove(&manifest.name).unwrap_or_default();
        add_checkpoint(&mut s, manifest);
        for hash in &old {
            if let Some(n) = s.referenced.get_mut(hash) {
                *n -= 1;
                if *n == 0 {
                    s.referenced.remove(hash);
                }
            }
        }
        collect(&mut s, old.into_iter(), remove);
    }
}

fn add_checkpoint(s: &mut IndexState, manifest: &CheckpointManifest) {
    if s.checkpoints.contains_key(&manifest.name) {
        return;
    }
    let hashes = stored_chunks(manifest);
    for hash in &hashes {
        *s.referenced.entry(*hash).or_insert(0) += 1;
    }
    s.checkpoints.insert(manifest.name.clone(), hashes);
}

/// Removes (under the index lock, so no store can pin them meanwhile) the `candidates` that
/// are on disk, unreferenced and unpinned; `remove` deletes one file and says if it did.
fn collect(
    s: &mut IndexState,
    candidates: impl Iterator<Item = ChunkHash>,
    mut remove: impl FnMut(&ChunkHash) -> bool,
) {
    if !s.complete {
        return;
    }
    for hash in candidates {
        let garbage = !s.referenced.contains_key(&hash) && !s.pinned.contains_key(&hash);
        if garbage && s.on_disk.contains_key(&hash) && remove(&hash) {
            if let Some(len) = s.on_disk.remove(&hash) {
                s.used_bytes -= len;
            }
        }
    }
}

/// Removes one chunk file; a file already gone counts as removed.
pub(crate) fn remove_chunk_file(path: &Path) -> bool {
    match fs::remove_file(path) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => {
            tracing::warn!(chunk = %path.display(), error = %e, "could not remove an unreferenced chunk");
            false
        }
    }
}
