//! The NVMe tier: a content-addressed chunk store on local disk plus one manifest per
//! checkpoint.
//!
//! Layout under the root: `chunks/<2 hex>/<64 hex>` (a chunk's stored bytes, named by the
//! BLAKE3 of its raw bytes), `chunks/.tmp/` (chunks being written), `manifests/<name>`.
//! A chunk already present is never written again, so a second checkpoint of the same memory,
//! or a second replica of the same model, adds only its new chunks. A checkpoint exists once
//! its manifest is renamed into place, after all its chunks are fsynced.
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
use crate::chunk::{ChunkConfig, ChunkEncoding, ChunkHash, IO_ALIGN};
use crate::manifest::{CheckpointManifest, ChunkLocation, ChunkRef, MAX_MANIFEST_BYTES};
use crate::pipeline::{
    drain_image_set, ChunkIndex, ChunkWriter, DrainStats, StoredChunk, WriteBacklog,
};
use crate::restore::{restore_image_set, ChunkFetch};
use crate::uring::{UringWriter, WriteJob};
use crate::{
    ByteRate, CheckpointName, ImageDigest, LoadReport, Pacing, StoreReport, Tier, TierError,
    TierKind,
};

const TIER: TierKind = TierKind::Nvme;

/// Content-addressed, chunked, compressed image sets on local disk (see the module docs).
#[derive(Debug)]
pub struct NvmeTier {
    root: PathBuf,
    config: ChunkConfig,
    pool: BufferPool,
    /// Serialises stores and removals, so garbage collection never races a store that is
    /// about to reference a chunk.
    lock: Mutex<()>,
    tmp_seq: AtomicU64,
    /// Chunks known good, with the state of their file when they were.
    verified: Mutex<HashMap<ChunkHash, FileStamp>>,
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
    /// Opens (creating if needed) the tier at `root` and removes chunk files left half-written
    /// by a crash. Allocates the tier's pinned buffer pool.
    pub fn open(root: impl Into<PathBuf>, config: ChunkConfig) -> Result<Self, TierError> {
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
        let pool = BufferPool::new(config.chunk_size, config.worker_count() * 2 + 24);
        let tier = Self {
            root,
            config,
            pool,
            lock: Mutex::new(()),
            tmp_seq: AtomicU64::new(0),
            verified: Mutex::new(HashMap::new()),
        };
        // Chunks of a store that never committed (the agent died mid-stream) are garbage: no
        // store runs before the tier is open, so nothing can be about to reference them.
        // A manifest that cannot be read makes the sweep keep every chunk.
        match tier.remove_unreferenced() {
            Ok(0) => {}
            Ok(swept) => {
                tracing::info!(chunks = swept, root = %tier.root.display(), "removed chunks no checkpoint references");
            }
            Err(e) => {
                tracing::warn!(error = %e, "kept every chunk: cannot tell which ones are unreferenced");
            }
        }
        Ok(tier)
    }

    /// Removes every chunk file no manifest references; returns how many went. Call with no
    /// store in progress (under [`NvmeTier::lock_stores`], or before the tier is shared).
    fn remove_unreferenced(&self) -> Result<u64, TierError> {
        let keep: HashSet<String> = self
            .all_referenced()?
            .iter()
            .map(ChunkHash::to_hex)
            .collect();
        let mut removed = 0;
        for chunk in self.chunk_files()? {
            let referenced = chunk
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| keep.contains(n));
            if !referenced {
                fs::remove_file(&chunk).map_err(|e| io("remove chunk", &chunk, e))?;
                removed += 1;
                if let Some(hash) = chunk
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(ChunkHash::from_hex)
                {
                    self.verified
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&hash);
                }
            }
        }
        Ok(removed)
    }

    /// Root directory of the tier.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The pipeline settings this tier stores with.
    pub fn config(&self) -> &ChunkConfig {
        &self.config
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
        let manifest = CheckpointManifest::read_from(reader).map_err(|e| TierError::Corrupt {
            tier: TIER,
            name: name.clone(),
            detail: format!("manifest {}: {e}", path.display()),
        })?;
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
        self.store_known(name, image_dir, None, None)
    }

    fn store_known(
        &self,
        name: &CheckpointName,
        image_dir: &Path,
        known: Option<&ImageDigest>,
        write_rate: Option<Arc<ByteRate>>,
    ) -> Result<(StoreReport, DrainStats), TierError> {
        let _guard = self.lock_stores();
        if let Ok(m) = self.manifest(name) {
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
        let mut writer = self.chunk_writer(write_rate)?;
        let drained = drain_image_set(
            TIER,
            name,
            image_dir,
            known,
            &self.config,
            &self.pool,
            self,
            &mut writer,
        );
        self.finish_store(writer, drained)
    }

    /// Serialises stores and removals: held for a whole store, so garbage collection never
    /// removes a chunk that a store in progress has just deduplicated against.
    pub(crate) fn lock_stores(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The tier's pinned buffer pool (chunk-sized buffers).
    pub(crate) fn pool(&self) -> &BufferPool {
        &self.pool
    }

    /// A writer for the new chunks of one store; call with [`NvmeTier::lock_stores`] held.
    pub(crate) fn chunk_writer(
        &self,
        write_rate: Option<Arc<ByteRate>>,
    ) -> Result<NvmeChunkWriter<'_>, TierError> {
        Ok(NvmeChunkWriter {
            tier: self,
            uring: Some(UringWriter::start()?),
            dirs: HashSet::new(),
            write_rate,
        })
    }

    /// Ends a store: waits until every chunk `writer` took is durable, then commits
    /// `drained`'s manifest; on any error (the store's own, passed in `drained`, or the
    /// writer's) removes the chunks this store added instead and returns the error.
    pub(crate) fn finish_store(
        &self,
        mut writer: NvmeChunkWriter<'_>,
        drained: Result<(CheckpointManifest, DrainStats), TierError>,
    ) -> Result<(StoreReport, DrainStats), TierError> {
        let outcome = writer.uring.take().expect("writer present").finish();
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
            Ok(stats)
        });
        match committed {
            Ok(stats) => {
                self.remember_written(&outcome.written);
                Ok((StoreReport::from(&stats), stats))
            }
            Err(e) => {
                // Nothing references the chunks this store added (stores are serialised), so
                // they go; the source image set was only read and is untouched.
                for path in &outcome.written {
                    let _ = fs::remove_file(path);
                }
                Err(e)
            }
        }
    }

    fn write_manifest(&self, manifest: &CheckpointManifest) -> Result<(), TierError> {
        let dir = self.root.join("manifests");
        let tmp = dir.join(format!(".tmp-{}", manifest.name));
        let path = self.manifest_path(&manifest.name);
        let result = (|| {
            let mut file = File::create(&tmp).map_err(|e| io("create manifest", &tmp, e))?;
            let mut buf = Vec::new();
            manifest
                .write_to(&mut buf)
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

    /// Whether the chunk file at `path` decodes to bytes that hash to `hash`.
    fn chunk_is_intact(
        path: &Path,
        hash: &ChunkHash,
        encoding: ChunkEncoding,
        raw_len: u32,
    ) -> Result<bool, TierError> {
        let stored = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io("read chunk", path, e)),
        };
        let raw_len = usize::try_from(raw_len).expect("u32 fits usize");
        let intact = match encoding {
            ChunkEncoding::Raw => ChunkHash::of(&stored) == *hash,
            ChunkEncoding::Zstd => zstd::bulk::decompress(&stored, raw_len)
                .is_ok_and(|raw| raw.len() == raw_len && ChunkHash::of(&raw) == *hash),
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

    fn all_referenced(&self) -> Result<HashSet<ChunkHash>, TierError> {
        let mut hashes = HashSet::new();
        for name in self.list()? {
            for f in self.manifest(&name)?.files {
                hashes.extend(
                    f.chunks
                        .iter()
                        .filter(|c| c.encoding != ChunkEncoding::Zero)
                        .map(|c| c.hash),
                );
            }
        }
        Ok(hashes)
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
        let encoding = match stored_len {
            0 => return Ok(None),
            n if n == raw_len => ChunkEncoding::Raw,
            n if n < raw_len => ChunkEncoding::Zstd,
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
            if !Self::chunk_is_intact(&path, hash, encoding, raw_len)? {
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

/// Takes a store's new chunks and writes them durably through io_uring.
pub(crate) struct NvmeChunkWriter<'a> {
    tier: &'a NvmeTier,
    uring: Option<UringWriter>,
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
        let job = WriteJob {
            tmp_path,
            final_path,
            data,
        };
        if self
            .uring
            .as_ref()
            .expect("writer present")
            .submit(job)
            .is_err()
        {
            // The writer stopped on an error; the store reports that one from `finish`.
            return Err(io(
                "queue chunk write",
                &self.tier.chunk_path(&hash),
                io::Error::other("io_uring writer stopped"),
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
        self.uring.as_ref().map(UringWriter::backlog)
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
        self.store_known(name, image_dir, digest, pacing.disk_write.clone())
            .map(|(report, _)| report)
    }

    fn load(&self, name: &CheckpointName, dest: &Path) -> Result<LoadReport, TierError> {
        let manifest = self.manifest(name)?;
        // Twice the cores: while half the workers decompress, the other half keep the disk busy.
        let workers = self.config.worker_count() * 2;
        let loaded = restore_image_set(TIER, &manifest, dest, self, &self.pool, workers);
        if let Err(TierError::Corrupt { .. }) = &loaded {
            self.forget_verified();
        }
        loaded
    }

    fn contains(&self, name: &CheckpointName) -> Result<bool, TierError> {
        Ok(self.manifest_path(name).is_file())
    }

    fn remove(&self, name: &CheckpointName) -> Result<bool, TierError> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.manifest_path(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io("remove manifest", &path, e)),
        }
        sync_dir(&self.root.join("manifests"))?;
        self.remove_unreferenced()?;
        Ok(true)
    }

    fn list(&self) -> Result<Vec<CheckpointName>, TierError> {
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

    fn used_bytes(&self) -> Result<u64, TierError> {
        let mut total = 0;
        for path in self.chunk_files()? {
            total += fs::metadata(&path).map_err(|e| io("stat", &path, e))?.len();
        }
        Ok(total)
    }
}
