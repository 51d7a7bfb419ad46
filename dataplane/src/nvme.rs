//! The NVMe tier: a content-addressed chunk store on local disk plus one manifest per
//! checkpoint.
//!
//! Layout under the root: `chunks/<2 hex>/<64 hex>` (a chunk's stored bytes, named by the
//! BLAKE3 of its raw bytes), `chunks/.tmp/` (chunks being written), `manifests/<name>`.
//! A chunk already present is never written again, so a second checkpoint of the same memory,
//! or a second replica of the same model, adds only its new chunks. A checkpoint exists once
//! its manifest is renamed into place, after all its chunks are fsynced.
//!
//! Stores run side by side; what each holds and uses is tracked in memory ([`NvmeIndex`]),
//! which is also where `contains`, `list` and `used_bytes` are answered from.
//!
//! Dedup never trusts a chunk file by its name alone: a chunk is reused only when it is
//! known good, i.e. this process wrote it or verified its content against its hash, and
//! its file has not changed since (same inode, length and ctime, which every write moves
//! and nothing can set back). Any other chunk is read and verified before reuse, and a
//! damaged one is written anew. A restore that finds a damaged chunk clears what is known,
//! so every chunk is verified again before its next reuse.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::buffer::{AlignedBuf, BufferPool, PooledBuf};
use crate::chunk::{address_of, open_stored};
use crate::chunk::{ChunkConfig, ChunkEncoding, ChunkHash, IO_ALIGN};
use crate::crypt::{SealKey, SEAL_OVERHEAD};
use crate::manifest::{
    CheckpointManifest, ChunkLocation, ChunkRef, ManifestError, MAX_MANIFEST_BYTES,
};
use crate::nvme_index::{remove_chunk_file, NvmeIndex};
use crate::pipeline::{
    drain_image_set_on, ChunkIndex, ChunkWriter, DrainStats, RunOn, StoredChunk, WriteBacklog,
};
use crate::restore::{restore_image_set_on, ChunkFetch};
use crate::sealing::Sealing;
use crate::service::StoreWrites;
use crate::{
    ByteRate, CancelToken, CheckpointName, DataPlane, ImageDigest, IoMode, LoadReport, Pacing,
    StoreReport, Tier, TierError, TierKind,
};

const TIER: TierKind = TierKind::Nvme;

/// Content-addressed, chunked, compressed image sets on local disk (see the module docs).
#[derive(Debug)]
pub struct NvmeTier {
    root: PathBuf,
    config: ChunkConfig,
    /// The node's data plane, which runs this tier's bulk work.
    plane: Arc<DataPlane>,
    /// What the tier holds and what stores in progress use.
    index: NvmeIndex,
    /// Checkpoints being stored now: a second store of the same name is refused.
    storing: Mutex<HashSet<CheckpointName>>,
    tmp_seq: AtomicU64,
    /// Chunks known good, with the state of their file when they were.
    verified: Mutex<HashMap<ChunkHash, FileStamp>>,
    /// Which key seals new checkpoints and which ones may be opened.
    sealing: Sealing,
}

/// What identifies one version of a chunk file: any write changes the ctime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    ino: u64,
    len: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl FileStamp {
    fn of(meta: &fs::Metadata) -> Self {
        Self {
            ino: meta.ino(),
            len: meta.len(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        }
    }
}

fn io(op: &'static str, path: &Path, source: io::Error) -> TierError {
    TierError::Io {
        tier: TIER,
        op,
        path: path.to_owned(),
        source,
    }
}

fn sync_dir(path: &Path) -> Result<(), TierError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("sync directory", path, e))
}

impl NvmeTier {
    /// Opens (creating if needed) the tier at `root` on a data plane of its own (io_uring if
    /// the kernel offers it); see [`NvmeTier::open_on`].
    pub fn open(root: impl Into<PathBuf>, config: ChunkConfig) -> Result<Self, TierError> {
        config
            .validate()
            .map_err(|detail| TierError::Config { tier: TIER, detail })?;
        let plane = DataPlane::start(IoMode::Auto, &config)?;
        Self::open_on(root, config, plane)
    }

    /// Opens (creating if needed) the tier at `root`, whose bulk work runs on the node's data
    /// plane `plane` (started for the same `config`), removes chunk files left half-written by
    /// a crash and chunks no checkpoint references, and reads what it holds into memory.
    pub fn open_on(
        root: impl Into<PathBuf>,
        config: ChunkConfig,
        plane: Arc<DataPlane>,
    ) -> Result<Self, TierError> {
        Self::open_sealed(root, config, plane, Sealing::plain())
    }

    /// [`NvmeTier::open_on`] with encryption at rest: new checkpoints are sealed as `sealing`
    /// says, and sealed ones are opened with its keys.
    pub fn open_sealed(
        root: impl Into<PathBuf>,
        config: ChunkConfig,
        plane: Arc<DataPlane>,
        sealing: Sealing,
    ) -> Result<Self, TierError> {
        config
            .validate()
            .map_err(|detail| TierError::Config { tier: TIER, detail })?;
        let root = root.into();
        for dir in [root.join("manifests"), root.join("chunks").join(".tmp")] {
            fs::create_dir_all(&dir).map_err(|e| io("create directory", &dir, e))?;
        }
        let tmp = root.join("chunks").join(".tmp");
        for entry in fs::read_dir(&tmp).map_err(|e| io("read", &tmp, e))? {
            let path = entry.map_err(|e| io("read", &tmp, e))?.path();
            fs::remove_file(&path).map_err(|e| io("remove leftover", &path, e))?;
        }
        let mut tier = Self {
            root,
            config,
            plane,
            index: NvmeIndex::default(),
            storing: Mutex::new(HashSet::new()),
            tmp_seq: AtomicU64::new(0),
            verified: Mutex::new(HashMap::new()),
            sealing,
        };
        tier.index = tier.read_index()?;
        // Chunks of a store that never committed (the agent died mid-stream) are garbage: no
        // store runs before the tier is open, so nothing can be about to reference them.
        // A manifest that cannot be read makes the sweep keep every chunk.
        let swept = tier
            .index
            .sweep(|hash| remove_chunk_file(&tier.chunk_path(hash)));
        if swept > 0 {
            tracing::info!(chunks = swept, root = %tier.root.display(), "removed chunks no checkpoint references");
        }
        Ok(tier)
    }

    /// Reads every manifest and chunk file on disk into an index.
    fn read_index(&self) -> Result<NvmeIndex, TierError> {
        let mut manifests = Vec::new();
        let mut complete = true;
        for name in self.names_on_disk()? {
            match self.manifest(&name) {
                Ok(m) => manifests.push(m),
                Err(e) => {
                    tracing::warn!(error = %e, "kept every chunk: cannot tell which ones are unreferenced");
                    complete = false;
                }
            }
        }
        let mut chunks = Vec::new();
        for path in self.chunk_files()? {
            let hash = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(ChunkHash::from_hex);
            if let Some(hash) = hash {
                let len = fs::metadata(&path).map_err(|e| io("stat", &path, e))?.len();
                chunks.push((hash, len));
            }
        }
        Ok(NvmeIndex::build(manifests, chunks, complete))
    }

    /// The data plane this tier runs on.
    pub fn plane(&self) -> &Arc<DataPlane> {
        &self.plane
    }

    /// Root directory of the tier.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The pipeline settings this tier stores with.
    pub fn config(&self) -> &ChunkConfig {
        &self.config
    }

    /// Which key seals new checkpoints and which ones may be opened.
    pub fn sealing(&self) -> &Sealing {
        &self.sealing
    }

    /// The key that opens `manifest`'s chunks (`None`: plain), or why it cannot be opened.
    pub fn opening_key(
        &self,
        manifest: &CheckpointManifest,
    ) -> Result<Option<&Arc<SealKey>>, TierError> {
        self.sealing
            .opening_key(TIER, &manifest.name, manifest.key_id.as_ref())
    }

    /// Path of the stored bytes of the chunk with `hash`.
    pub fn chunk_path(&self, hash: &ChunkHash) -> PathBuf {
        let hex = hash.to_hex();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    /// Path of the manifest of `name`.
    pub fn manifest_path(&self, name: &CheckpointName) -> PathBuf {
        self.root.join("manifests").join(name.as_str())
    }

    /// Reads and validates the manifest of `name`.
    pub fn manifest(&self, name: &CheckpointName) -> Result<CheckpointManifest, TierError> {
        let path = self.manifest_path(name);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(TierError::NotFound {
                    tier: TIER,
                    name: name.clone(),
                })
            }
            Err(e) => return Err(io("open manifest", &path, e)),
        };
        let reader = BufReader::new(file).take(MAX_MANIFEST_BYTES + 64);
        let manifest =
            CheckpointManifest::read_with_keys(reader, self.sealing.ring().map(|r| &**r)).map_err(
                |e| match e {
                    ManifestError::Key(..) => TierError::Sealing {
                        tier: TIER,
                        name: name.clone(),
                        detail: format!("manifest {}: {e}", path.display()),
                    },
                    e => TierError::Corrupt {
                        tier: TIER,
                        name: name.clone(),
                        detail: format!("manifest {}: {e}", path.display()),
                    },
                },
            )?;
        if &manifest.name != name {
            return Err(TierError::Corrupt {
                tier: TIER,
                name: name.clone(),
                detail: format!(
                    "manifest {} names checkpoint {}",
                    path.display(),
                    manifest.name
                ),
            });
        }
        Ok(manifest)
    }

    /// Stores an image set and reports the pipeline's figures (zero, dedup and new bytes).
    pub fn store_with_stats(
        &self,
        name: &CheckpointName,
        image_dir: &Path,
    ) -> Result<(StoreReport, DrainStats), TierError> {
        self.store_known(name, image_dir, None, &Pacing::default())
    }

    /// [`Tier::store_paced`] with the pipeline's figures. A store whose `pacing.cancel` is
    /// cancelled stops between chunks, writes nothing more and leaves nothing behind.
    pub fn store_known(
        &self,
        name: &CheckpointName,
        image_dir: &Path,
        known: Option<&ImageDigest>,
        pacing: &Pacing,
    ) -> Result<(StoreReport, DrainStats), TierError> {
        if let Some(m) = self.contains_committed(name) {
            let raw = m.raw_bytes();
            return Ok((
                StoreReport {
                    raw_bytes: raw,
                    ..StoreReport::default()
                },
                DrainStats {
                    raw_bytes: raw,
                    ..DrainStats::default()
                },
            ));
        }
        let pins = StorePins::new(self, name)?;
        let mut writer = self.chunk_writer(pacing.disk_write.clone(), &pacing.cancel, &pins);
        let run_on = RunOn {
            gate: self.plane.gate(),
            class: pacing.class,
            cancel: &pacing.cancel,
        };
        let drained = drain_image_set_on(
            TIER,
            name,
            image_dir,
            known,
            &self.config,
            self.sealing.writing_key().map(|k| &**k),
            self.plane.pool(),
            &pins,
            &mut writer,
            run_on,
        );
        self.finish_store(writer, drained)
    }

    /// The manifest of `name` if the tier holds it.
    fn contains_committed(&self, name: &CheckpointName) -> Option<CheckpointManifest> {
        if !self.index.contains(name) {
            return None;
        }
        self.manifest(name).ok()
    }

    /// The data plane's pinned buffer pool (chunk-sized buffers).
    pub(crate) fn pool(&self) -> &BufferPool {
        self.plane.pool()
    }

    /// A writer for the new chunks of the store holding `pins`.
    pub(crate) fn chunk_writer<'a>(
        &'a self,
        write_rate: Option<Arc<ByteRate>>,
        cancel: &CancelToken,
        pins: &'a StorePins<'a>,
    ) -> NvmeChunkWriter<'a> {
        NvmeChunkWriter {
            tier: self,
            pins,
            writes: Some(self.plane.store_writes(cancel.clone())),
            dirs: HashSet::new(),
            write_rate,
        }
    }

    /// Ends a store: waits until every chunk `writer` took is durable, then commits
    /// `drained`'s manifest; on any error (the store's own, passed in `drained`, or the
    /// writer's) returns the error, and the chunks this store added go when its
    /// [`StorePins`] are dropped (unless another store or checkpoint uses them by then).
    pub(crate) fn finish_store(
        &self,
        mut writer: NvmeChunkWriter<'_>,
        drained: Result<(CheckpointManifest, DrainStats), TierError>,
    ) -> Result<(StoreReport, DrainStats), TierError> {
        let outcome = writer.writes.take().expect("writer present").finish();
        for path in &outcome.written {
            let hash = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(ChunkHash::from_hex);
            if let (Some(hash), Ok(meta)) = (hash, fs::metadata(path)) {
                self.index.chunk_written(hash, meta.len());
            }
        }
        let drained = match (drained, outcome.error) {
            // The writer's own error explains a failed put better than the put's.
            (_, Some(e)) | (Err(e), None) => Err(e),
            (Ok(done), None) => Ok(done),
        };
        let committed = drained.and_then(|(manifest, stats)| {
            for dir in &writer.dirs {
                sync_dir(dir)?;
            }
            self.write_manifest(&manifest)?;
            self.index.committed(&manifest);
            Ok(stats)
        });
        if committed.is_ok() {
            self.remember_written(&outcome.written);
        }
        committed.map(|stats| (StoreReport::from(&stats), stats))
    }

    fn write_manifest(&self, manifest: &CheckpointManifest) -> Result<(), TierError> {
        let dir = self.root.join("manifests");
        let tmp = dir.join(format!(".tmp-{}", manifest.name));
        let path = self.manifest_path(&manifest.name);
        let result = (|| {
            let mut file = File::create(&tmp).map_err(|e| io("create manifest", &tmp, e))?;
            let mut buf = Vec::new();
            let key = self.opening_key(manifest)?;
            match key {
                Some(key) => manifest.write_sealed(&mut buf, key),
                None => manifest.write_to(&mut buf),
            }
            .map_err(|e| TierError::Corrupt {
                tier: TIER,
                name: manifest.name.clone(),
                detail: format!("manifest cannot be encoded: {e}"),
            })?;
            file.write_all(&buf)
                .map_err(|e| io("write manifest", &tmp, e))?;
            file.sync_all().map_err(|e| io("sync manifest", &tmp, e))?;
            fs::rename(&tmp, &path).map_err(|e| io("commit manifest", &tmp, e))?;
            sync_dir(&dir)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Chunks this store wrote from verified data are known good as they are now.
    fn remember_written(&self, written: &[PathBuf]) {
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        for path in written {
            let hash = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(ChunkHash::from_hex);
            if let (Some(hash), Ok(meta)) = (hash, fs::metadata(path)) {
                verified.insert(hash, FileStamp::of(&meta));
            }
        }
    }

    /// Whether the chunk file at `path` opens (under `key`, when sealed) and decodes to bytes
    /// with the address `hash`.
    fn chunk_is_intact(
        path: &Path,
        hash: &ChunkHash,
        encoding: ChunkEncoding,
        raw_len: u32,
        key: Option<&SealKey>,
    ) -> Result<bool, TierError> {
        let mut stored = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io("read chunk", path, e)),
        };
        let Ok(encoded) = open_stored(key, hash, encoding, raw_len, &mut stored) else {
            return Ok(false);
        };
        let address = |raw: &[u8]| address_of(key, raw);
        let raw_len = usize::try_from(raw_len).expect("u32 fits usize");
        let intact = match encoding {
            ChunkEncoding::Raw => address(encoded) == *hash,
            ChunkEncoding::Zstd => zstd::bulk::decompress(encoded, raw_len)
                .is_ok_and(|raw| raw.len() == raw_len && address(&raw) == *hash),
            ChunkEncoding::Zero => false,
        };
        Ok(intact)
    }

    /// Forgets every chunk known good, so each is verified again before its next reuse.
    fn forget_verified(&self) {
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// The checkpoints whose manifests are on disk.
    fn names_on_disk(&self) -> Result<Vec<CheckpointName>, TierError> {
        let dir = self.root.join("manifests");
        let mut names = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| io("read", &dir, e))? {
            let entry = entry.map_err(|e| io("read", &dir, e))?;
            if let Ok(name) = CheckpointName::new(&entry.file_name().to_string_lossy()) {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Swaps the index's references of `manifest`'s checkpoint for the chunks it names now,
    /// removing the old chunks nothing references any more.
    pub(crate) fn replace_in_index(&self, manifest: &CheckpointManifest) {
        self.index
            .replaced(manifest, |hash| self.remove_garbage(hash));
    }

    /// Removes the chunk file of `hash` (index says it is garbage) and forgets it was verified.
    fn remove_garbage(&self, hash: &ChunkHash) -> bool {
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(hash);
        remove_chunk_file(&self.chunk_path(hash))
    }

    fn chunk_files(&self) -> Result<Vec<PathBuf>, TierError> {
        let chunks = self.root.join("chunks");
        let mut out = Vec::new();
        for shard in fs::read_dir(&chunks).map_err(|e| io("read", &chunks, e))? {
            let shard = shard.map_err(|e| io("read", &chunks, e))?;
            if shard.file_name() == ".tmp" {
                continue;
            }
            let dir = shard.path();
            for entry in fs::read_dir(&dir).map_err(|e| io("read", &dir, e))? {
                out.push(entry.map_err(|e| io("read", &dir, e))?.path());
            }
        }
        Ok(out)
    }
}

impl ChunkIndex for NvmeTier {
    fn lookup(&self, hash: &ChunkHash, raw_len: u32) -> Result<Option<StoredChunk>, TierError> {
        let path = self.chunk_path(hash);
        let meta = match fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("stat chunk", &path, e)),
        };
        // A raw chunk keeps its full length; a zstd frame is always shorter. A file that fits
        // neither is damaged and is simply written again.
        let Ok(stored_len) = u32::try_from(meta.len()) else {
            return Ok(None);
        };
        // A sealed store's addresses are keyed by its key, so a chunk found under one was
        // sealed by that key and carries its tag and nonce.
        let key = self.sealing.writing_key().map(|k| &**k);
        let overhead = if key.is_some() {
            u32::try_from(SEAL_OVERHEAD).expect("small")
        } else {
            0
        };
        let encoding = match stored_len.checked_sub(overhead) {
            None | Some(0) => return Ok(None),
            Some(n) if n == raw_len => ChunkEncoding::Raw,
            Some(n) if n < raw_len => ChunkEncoding::Zstd,
            _ => return Ok(None),
        };
        let stamp = FileStamp::of(&meta);
        let known = self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(hash)
            == Some(&stamp);
        if !known {
            if !Self::chunk_is_intact(&path, hash, encoding, raw_len, key)? {
                tracing::warn!(chunk = %path.display(), "damaged chunk found by dedup; writing it anew");
                self.verified
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(hash);
                return Ok(None);
            }
            self.verified
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(*hash, stamp);
        }
        Ok(Some(StoredChunk {
            encoding,
            stored_len,
            location: ChunkLocation::Store,
        }))
    }
}

/// The chunks one store uses (deduplicates against or writes), pinned in the tier's index so
/// no removal or failed store collects them; dropping it ends the store's use, which removes
/// those of them that no checkpoint references (the chunks of a store that failed).
pub(crate) struct StorePins<'a> {
    tier: &'a NvmeTier,
    name: CheckpointName,
    held: Mutex<HashSet<ChunkHash>>,
}

impl<'a> StorePins<'a> {
    /// Starts a store of `name`; refused while another store of `name` runs.
    pub(crate) fn new(tier: &'a NvmeTier, name: &CheckpointName) -> Result<Self, TierError> {
        let mut storing = tier.storing.lock().unwrap_or_else(|e| e.into_inner());
        if !storing.insert(name.clone()) {
            return Err(TierError::Stream {
                tier: TIER,
                name: name.clone(),
                detail: "a store of this checkpoint is already in progress".into(),
            });
        }
        Ok(Self {
            tier,
            name: name.clone(),
            held: Mutex::new(HashSet::new()),
        })
    }

    fn hold(&self, hash: ChunkHash) {
        let first = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(hash);
        if first {
            self.tier.index.pin(hash);
        }
    }
}

impl ChunkIndex for StorePins<'_> {
    fn lookup(&self, hash: &ChunkHash, raw_len: u32) -> Result<Option<StoredChunk>, TierError> {
        // Pinned before the file is looked at, so a removal cannot take it after we saw it.
        self.hold(*hash);
        self.tier.lookup(hash, raw_len)
    }
}

impl Drop for StorePins<'_> {
    fn drop(&mut self) {
        let held = std::mem::take(self.held.get_mut().unwrap_or_else(|e| e.into_inner()));
        let tier = self.tier;
        tier.index.unpin(&held, |hash| tier.remove_garbage(hash));
        tier.storing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.name);
    }
}

/// Takes a store's new chunks and hands them to the data plane's writer.
pub(crate) struct NvmeChunkWriter<'a> {
    tier: &'a NvmeTier,
    pins: &'a StorePins<'a>,
    writes: Option<StoreWrites>,
    dirs: HashSet<PathBuf>,
    /// The background write limit, when one applies to this store.
    write_rate: Option<Arc<ByteRate>>,
}

impl ChunkWriter for NvmeChunkWriter<'_> {
    fn put(
        &mut self,
        hash: ChunkHash,
        encoding: ChunkEncoding,
        data: PooledBuf,
    ) -> Result<StoredChunk, TierError> {
        self.pins.hold(hash);
        let final_path = self.tier.chunk_path(&hash);
        let dir = final_path
            .parent()
            .expect("chunk path has a shard dir")
            .to_owned();
        if !self.dirs.contains(&dir) {
            fs::create_dir_all(&dir).map_err(|e| io("create directory", &dir, e))?;
            self.dirs.insert(dir);
        }
        let seq = self.tier.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp_path = self.tier.root.join("chunks").join(".tmp").join(format!(
            "{}.{}.{seq}",
            hash.to_hex(),
            std::process::id()
        ));
        let stored_len = u32::try_from(data.as_slice().len()).expect("chunk below 4 GiB");
        if let Some(rate) = &self.write_rate {
            rate.pace_blocking(u64::from(stored_len));
        }
        let writes = self.writes.as_mut().expect("writer present");
        if writes.submit(tmp_path, final_path, data).is_err() {
            // A write of this store failed or it was cancelled; `finish` reports why.
            return Err(io(
                "queue chunk write",
                &self.tier.chunk_path(&hash),
                io::Error::other("this store's chunk writes stopped"),
            ));
        }
        Ok(StoredChunk {
            encoding,
            stored_len,
            location: ChunkLocation::Store,
        })
    }

    fn backlog(&self) -> Option<std::sync::Arc<WriteBacklog>> {
        // Under a write limit the disk is the bottleneck by design: compress every chunk.
        if self.write_rate.is_some() {
            return None;
        }
        self.writes.as_ref().map(StoreWrites::backlog)
    }
}

impl NvmeTier {
    /// Opens the stored bytes of `chunk`, checking their length against the manifest.
    fn open_chunk(
        &self,
        manifest: &CheckpointManifest,
        file: &str,
        index: usize,
        chunk: &ChunkRef,
    ) -> Result<(File, PathBuf), TierError> {
        let path = self.chunk_path(&chunk.hash);
        let corrupt = |what: String| TierError::Corrupt {
            tier: TIER,
            name: manifest.name.clone(),
            detail: format!("file {file} chunk {index} ({}): {what}", chunk.hash),
        };
        // Uncached: the chunk is read once, straight into its aligned destination, which
        // saves the page cache's copy and memory.
        let f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .or_else(|_| File::open(&path))
            .map_err(|e| corrupt(format!("chunk file {}: {e}", path.display())))?;
        let actual = f.metadata().map_err(|e| io("stat chunk", &path, e))?.len();
        if actual != u64::from(chunk.stored_len) {
            return Err(corrupt(format!(
                "chunk file {} has {actual} bytes, the manifest says {}",
                path.display(),
                chunk.stored_len
            )));
        }
        Ok((f, path))
    }
}

/// Reads the `len` bytes of a chunk file into the start of `dest`. `dest` may be longer: with
/// O_DIRECT the read asks for whole 4 KiB blocks when `dest` has room and the kernel stops at
/// the end of the file; anything short is finished with ordinary reads.
fn read_chunk(f: &File, path: &Path, dest: &mut [u8], len: usize) -> Result<(), TierError> {
    use std::os::unix::fs::FileExt;
    let padded = len.div_ceil(IO_ALIGN) * IO_ALIGN;
    let ask = if padded <= dest.len() { padded } else { len };
    let mut got = match f.read_at(&mut dest[..ask], 0) {
        Ok(n) => n.min(len),
        // O_DIRECT refuses unaligned requests (EINVAL); fall through to ordinary reads.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => 0,
        Err(e) => return Err(io("read chunk", path, e)),
    };
    if got < len {
        let plain = File::open(path).map_err(|e| io("open chunk", path, e))?;
        while got < len {
            let n = plain
                .read_at(&mut dest[got..len], u64::try_from(got).expect("fits"))
                .map_err(|e| io("read chunk", path, e))?;
            if n == 0 {
                return Err(io(
                    "read chunk",
                    path,
                    io::Error::new(io::ErrorKind::UnexpectedEof, "chunk file ended early"),
                ));
            }
            got += n;
        }
    }
    Ok(())
}

impl ChunkFetch for NvmeTier {
    fn fetch(
        &self,
        manifest: &CheckpointManifest,
        file: &str,
        index: usize,
        chunk: &ChunkRef,
        buf: &mut AlignedBuf,
    ) -> Result<(), TierError> {
        let len = usize::try_from(chunk.stored_len).expect("u32 fits usize");
        if len > buf.capacity() {
            return Err(TierError::Corrupt {
                tier: TIER,
                name: manifest.name.clone(),
                detail: format!(
                    "file {file} chunk {index} ({}): stored length {len} exceeds the chunk size",
                    chunk.hash
                ),
            });
        }
        let (f, path) = self.open_chunk(manifest, file, index, chunk)?;
        read_chunk(&f, &path, buf.spare_mut(), len)?;
        buf.set_len(len);
        Ok(())
    }

    fn fetch_raw_into(
        &self,
        manifest: &CheckpointManifest,
        file: &str,
        index: usize,
        chunk: &ChunkRef,
        dest: &mut [u8],
    ) -> Result<bool, TierError> {
        let len = usize::try_from(chunk.stored_len).expect("u32 fits usize");
        if len != dest.len() {
            // The general path reports the mismatch.
            return Ok(false);
        }
        let (f, path) = self.open_chunk(manifest, file, index, chunk)?;
        read_chunk(&f, &path, dest, len)?;
        Ok(true)
    }

    fn fetch_sealed_raw_into(
        &self,
        manifest: &CheckpointManifest,
        file: &str,
        index: usize,
        chunk: &ChunkRef,
        dest: &mut [u8],
        trailer: &mut [u8; SEAL_OVERHEAD],
    ) -> Result<bool, TierError> {
        use std::os::unix::fs::FileExt;
        let len = usize::try_from(chunk.stored_len).expect("u32 fits usize");
        if len != dest.len() + SEAL_OVERHEAD {
            // The general path reports the mismatch.
            return Ok(false);
        }
        let (f, path) = self.open_chunk(manifest, file, index, chunk)?;
        read_chunk(&f, &path, dest, dest.len())?;
        let at = u64::try_from(dest.len()).expect("fits");
        File::open(&path)
            .and_then(|plain| plain.read_exact_at(trailer, at))
            .map_err(|e| io("read chunk", &path, e))?;
        Ok(true)
    }
}

impl Tier for NvmeTier {
    fn kind(&self) -> TierKind {
        TIER
    }

    fn store(&self, name: &CheckpointName, image_dir: &Path) -> Result<StoreReport, TierError> {
        self.store_with_stats(name, image_dir)
            .map(|(report, _)| report)
    }

    fn store_paced(
        &self,
        name: &CheckpointName,
        image_dir: &Path,
        digest: Option<&ImageDigest>,
        pacing: &Pacing,
    ) -> Result<StoreReport, TierError> {
        self.store_known(name, image_dir, digest, pacing)
            .map(|(report, _)| report)
    }

    fn load(&self, name: &CheckpointName, dest: &Path) -> Result<LoadReport, TierError> {
        self.load_paced(name, dest, &Pacing::default())
    }

    fn load_paced(
        &self,
        name: &CheckpointName,
        dest: &Path,
        pacing: &Pacing,
    ) -> Result<LoadReport, TierError> {
        let manifest = self.manifest(name)?;
        let key = self.opening_key(&manifest)?.map(|k| &**k);
        // Twice the workers: while half decompress, the other half keep the disk busy.
        let workers = self.config.worker_count() * 2;
        let run_on = RunOn {
            gate: self.plane.gate(),
            class: pacing.class,
            cancel: &pacing.cancel,
        };
        let loaded = restore_image_set_on(
            TIER,
            &manifest,
            key,
            dest,
            self,
            self.pool(),
            workers,
            run_on,
        );
        if let Err(TierError::Corrupt { .. }) = &loaded {
            self.forget_verified();
        }
        loaded
    }

    /// From memory, confirmed by the manifest file (one stat, which no store holds up).
    fn contains(&self, name: &CheckpointName) -> Result<bool, TierError> {
        Ok(self.index.contains(name) && self.manifest_path(name).is_file())
    }

    fn remove(&self, name: &CheckpointName) -> Result<bool, TierError> {
        let path = self.manifest_path(name);
        let had_file = match fs::remove_file(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(io("remove manifest", &path, e)),
        };
        if had_file {
            sync_dir(&self.root.join("manifests"))?;
        }
        let held = self.index.removed(name, |hash| self.remove_garbage(hash));
        Ok(had_file || held)
    }

    /// From memory, each confirmed by its manifest file (a stat, which no store holds up):
    /// a manifest removed behind the agent's back is not listed.
    fn list(&self) -> Result<Vec<CheckpointName>, TierError> {
        let mut names = self.index.list();
        names.retain(|name| self.manifest_path(name).is_file());
        Ok(names)
    }

    /// From memory: the bytes of every chunk file (those of a store in progress count once
    /// the store has finished writing them).
    fn used_bytes(&self) -> Result<u64, TierError> {
        Ok(self.index.used_bytes())
    }
}
