//! The drain direction: an image set on tmpfs → content-addressed, compressed chunks.
//!
//! Files are memory-mapped (no read() copy). A producer cuts them into fixed-size chunks and
//! feeds a bounded queue; one worker per core skips zero chunks, hashes the rest, asks the
//! destination whether it already holds the hash (then nothing is compressed or written) and
//! otherwise compresses into a pooled pinned buffer. The calling thread hands new chunks to the
//! destination's writer in any order and fills the manifest. Queues and the buffer pool are
//! bounded, so memory stays flat whatever the image size.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

use crate::buffer::{BufferPool, PooledBuf};
use crate::chunk::{address_of, seal_stored};
use crate::chunk::{encode_into, is_zero, store_raw, ChunkConfig, ChunkEncoding, ChunkHash};
use crate::crypt::SealKey;
use crate::digest::ImageDigest;
use crate::image_files::{open_sources, SourceFile};
use crate::manifest::{CheckpointManifest, ChunkLocation, ChunkRef, FileEntry};
use crate::{CancelToken, CheckpointName, PriorityGate, TierError, TierKind, WorkClass};

/// How a destination keeps a chunk it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StoredChunk {
    pub encoding: ChunkEncoding,
    pub stored_len: u32,
    pub location: ChunkLocation,
}

/// Which chunks a destination already holds; asked from the worker threads.
pub(crate) trait ChunkIndex: Sync {
    fn lookup(&self, hash: &ChunkHash, raw_len: u32) -> Result<Option<StoredChunk>, TierError>;
}

/// Takes the new chunks of one store, on the calling thread.
pub(crate) trait ChunkWriter {
    fn put(
        &mut self,
        hash: ChunkHash,
        encoding: ChunkEncoding,
        data: PooledBuf,
    ) -> Result<StoredChunk, TierError>;

    /// The writer's queue of accepted but unfinished bytes, when it has one; with
    /// [`ChunkConfig::adaptive`] the workers compress only while it is long.
    fn backlog(&self) -> Option<Arc<WriteBacklog>> {
        None
    }
}

/// Bytes a writer has accepted and not yet made durable.
#[derive(Debug, Default)]
pub(crate) struct WriteBacklog {
    queued: AtomicU64,
}

impl WriteBacklog {
    /// `bytes` were handed to the writer.
    pub fn add(&self, bytes: u64) {
        self.queued.fetch_add(bytes, Ordering::Relaxed);
    }

    /// `bytes` handed over earlier are finished (written or failed).
    pub fn done(&self, bytes: u64) {
        self.queued.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Bytes queued now.
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }
}

/// What one pass of the pipeline did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DrainStats {
    /// Bytes of the image set.
    pub raw_bytes: u64,
    /// Bytes in zero chunks (recorded, not stored).
    pub zero_bytes: u64,
    /// Raw bytes of chunks the destination already held.
    pub dedup_bytes: u64,
    /// Stored (compressed) bytes handed to the writer.
    pub new_stored_bytes: u64,
    /// Number of chunks handed to the writer.
    pub new_chunks: u64,
}

struct Job<'a> {
    file: usize,
    index: usize,
    data: &'a [u8],
    /// The chunk's hash from the checkpoint's digest, when there is one.
    known: Option<ChunkHash>,
}

enum Outcome {
    Zero,
    Known(StoredChunk),
    New(ChunkEncoding, PooledBuf),
}

struct Done {
    file: usize,
    index: usize,
    hash: ChunkHash,
    raw_len: u32,
    outcome: Outcome,
}

/// Where a pass of the pipeline runs: the node's gate, the pass's class, its cancel token.
#[derive(Clone, Copy)]
pub(crate) struct RunOn<'a> {
    pub gate: &'a PriorityGate,
    pub class: WorkClass,
    pub cancel: &'a CancelToken,
}

/// [`drain_image_set_on`] outside the data plane's gate, never cancelled: for tiers that run
/// no service of their own yet (S3).
#[allow(clippy::too_many_arguments)]
pub(crate) fn drain_image_set(
    tier: TierKind,
    name: &CheckpointName,
    image_dir: &Path,
    known: Option<&ImageDigest>,
    config: &ChunkConfig,
    key: Option<&SealKey>,
    pool: &BufferPool,
    index: &dyn ChunkIndex,
    writer: &mut dyn ChunkWriter,
) -> Result<(CheckpointManifest, DrainStats), TierError> {
    let (gate, cancel) = (PriorityGate::new(usize::MAX), CancelToken::new());
    let run_on = RunOn {
        gate: &gate,
        class: WorkClass::Foreground,
        cancel: &cancel,
    };
    drain_image_set_on(
        tier, name, image_dir, known, config, key, pool, index, writer, run_on,
    )
}

impl RunOn<'_> {
    /// The error of a pass stopped by its token.
    pub fn cancelled(&self, tier: TierKind, name: &CheckpointName) -> TierError {
        TierError::Cancelled {
            tier,
            detail: format!("store of checkpoint {name}"),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn work(
    tier: TierKind,
    jobs: &Mutex<Receiver<Job<'_>>>,
    done: &std::sync::mpsc::SyncSender<Result<Done, TierError>>,
    config: &ChunkConfig,
    key: Option<&SealKey>,
    pool: &BufferPool,
    index: &dyn ChunkIndex,
    backlog: Option<&WriteBacklog>,
    run_on: RunOn<'_>,
) {
    // Enough queued work to keep the device busy while every worker compresses one chunk.
    let busy_at = u64::try_from(2 * config.worker_count() * config.chunk_size).unwrap_or(u64::MAX);
    let mut compressor = match zstd::bulk::Compressor::new(config.zstd_level) {
        Ok(c) => c,
        Err(e) => {
            let _ = done.send(Err(TierError::Config {
                tier,
                detail: format!("zstd level {}: {e}", config.zstd_level),
            }));
            return;
        }
    };
    loop {
        let job = {
            let rx = jobs.lock().unwrap_or_else(|e| e.into_inner());
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        if run_on.cancel.is_cancelled() {
            return;
        }
        let _permit = run_on.gate.acquire(run_on.class);
        let raw_len = u32::try_from(job.data.len()).expect("chunk size is capped below 4 GiB");
        let zero = job
            .known
            .map_or_else(|| is_zero(job.data), |h| h == ChunkHash::ZERO);
        let result = if zero {
            Ok((ChunkHash::ZERO, Outcome::Zero))
        } else {
            // The digest taken after the dump holds plain hashes; a sealed store addresses
            // chunks by a keyed hash instead.
            let hash = match (key, job.known) {
                (None, Some(known)) => known,
                _ => address_of(key, job.data),
            };
            match index.lookup(&hash, raw_len) {
                Ok(Some(stored)) => Ok((hash, Outcome::Known(stored))),
                Ok(None) => {
                    let mut buf = pool.take();
                    let compress =
                        !config.adaptive || backlog.is_none_or(|b| b.queued() >= busy_at);
                    let (encoding, n) = if compress {
                        encode_into(job.data, config, &mut compressor, buf.spare_mut())
                    } else {
                        store_raw(job.data, buf.spare_mut())
                    };
                    let n = seal_stored(key, &hash, encoding, raw_len, buf.spare_mut(), n);
                    buf.set_len(n);
                    Ok((hash, Outcome::New(encoding, buf)))
                }
                Err(e) => Err(e),
            }
        };
        let msg = result.map(|(hash, outcome)| Done {
            file: job.file,
            index: job.index,
            hash,
            raw_len,
            outcome,
        });
        if done.send(msg).is_err() {
            return;
        }
    }
}

/// The digest's hashes per source file and chunk, after checking that it describes `sources`.
fn known_hashes<'d>(
    tier: TierKind,
    name: &CheckpointName,
    digest: &'d ImageDigest,
    sources: &[SourceFile],
    chunk_size: usize,
) -> Result<Vec<&'d [ChunkHash]>, TierError> {
    let changed = |detail: String| TierError::Corrupt {
        tier,
        name: name.clone(),
        detail: format!("the image set no longer matches its digest: {detail}"),
    };
    if digest.chunk_size != chunk_size {
        return Err(TierError::Config {
            tier,
            detail: format!(
                "digest taken with {} byte chunks, the tier stores {chunk_size} byte chunks",
                digest.chunk_size
            ),
        });
    }
    let names = |v: Vec<&str>| v.join(", ");
    if digest.files.len() != sources.len() {
        return Err(changed(format!(
            "files [{}], digest [{}]",
            names(sources.iter().map(|s| s.name.as_str()).collect()),
            names(digest.files.iter().map(|f| f.name.as_str()).collect())
        )));
    }
    sources
        .iter()
        .zip(&digest.files)
        .map(|(src, want)| {
            let chunks = usize::try_from(src.size.div_ceil(chunk_size as u64)).expect("fits");
            if src.name != want.name || src.size != want.size || want.chunks.len() != chunks {
                return Err(changed(format!(
                    "file {} ({} bytes) against {} ({} bytes)",
                    src.name, src.size, want.name, want.size
                )));
            }
            Ok(want.chunks.as_slice())
        })
        .collect()
}

/// Cuts the image set in `image_dir` into chunks and hands the new ones to `writer`; returns
/// the manifest (with [`ChunkLocation`]s from the writer) and what was done. With `known`, the
/// hashes taken right after the dump are used instead of hashing every chunk again. Each
/// chunk's CPU work waits for a permit of `run_on`'s gate; a cancelled token stops the pass
/// between chunks with [`TierError::Cancelled`]. With `key`, chunks are addressed by keyed
/// hashes and sealed, and the manifest names the key.
#[allow(clippy::too_many_arguments)]
pub(crate) fn drain_image_set_on(
    tier: TierKind,
    name: &CheckpointName,
    image_dir: &Path,
    known: Option<&ImageDigest>,
    config: &ChunkConfig,
    key: Option<&SealKey>,
    pool: &BufferPool,
    index: &dyn ChunkIndex,
    writer: &mut dyn ChunkWriter,
    run_on: RunOn<'_>,
) -> Result<(CheckpointManifest, DrainStats), TierError> {
    config
        .validate()
        .map_err(|detail| TierError::Config { tier, detail })?;
    let _running = run_on.gate.session(run_on.class);
    let sources = open_sources(tier, image_dir)?;
    let chunk_size = config.chunk_size;
    let known = match known {
        Some(digest) => Some(known_hashes(tier, name, digest, &sources, chunk_size)?),
        None => None,
    };
    let known = known.as_ref();
    let mut slots: Vec<Vec<Option<ChunkRef>>> = sources
        .iter()
        .map(|f| {
            let n = usize::try_from(f.size.div_ceil(chunk_size as u64)).expect("fits usize");
            vec![None; n]
        })
        .collect();
    let workers = config.worker_count();
    let backlog = writer.backlog();
    let mut stats = DrainStats::default();
    let mut written: HashMap<ChunkHash, StoredChunk> = HashMap::new();

    std::thread::scope(|s| -> Result<(), TierError> {
        let (job_tx, job_rx) = sync_channel::<Job<'_>>(workers * 2);
        let (done_tx, done_rx) = sync_channel::<Result<Done, TierError>>(workers * 2);
        // Owned by the workers only, so the producer stops once they all have.
        let job_rx = Arc::new(Mutex::new(job_rx));
        let sources = &sources;
        let cancel = run_on.cancel;
        s.spawn(move || {
            for (file, src) in sources.iter().enumerate() {
                let Some(map) = &src.map else { continue };
                for (index, data) in map.chunks(chunk_size).enumerate() {
                    if cancel.is_cancelled() {
                        return;
                    }
                    let known = known.map(|k| k[file][index]);
                    let job = Job {
                        file,
                        index,
                        data,
                        known,
                    };
                    if job_tx.send(job).is_err() {
                        return;
                    }
                }
            }
        });
        for _ in 0..workers {
            let done_tx = done_tx.clone();
            let job_rx = Arc::clone(&job_rx);
            let backlog = backlog.as_deref();
            s.spawn(move || {
                work(
                    tier, &job_rx, &done_tx, config, key, pool, index, backlog, run_on,
                )
            });
        }
        drop(done_tx);
        drop(job_rx);
        // Leaving this loop early drops `done_rx`, which stops the workers and the producer.
        for msg in done_rx {
            if run_on.cancel.is_cancelled() {
                return Err(run_on.cancelled(tier, name));
            }
            let done = msg?;
            let raw = u64::from(done.raw_len);
            stats.raw_bytes += raw;
            let stored = match done.outcome {
                Outcome::Zero => {
                    stats.zero_bytes += raw;
                    StoredChunk {
                        encoding: ChunkEncoding::Zero,
                        stored_len: 0,
                        location: ChunkLocation::Store,
                    }
                }
                Outcome::Known(stored) => {
                    stats.dedup_bytes += raw;
                    stored
                }
                Outcome::New(encoding, buf) => {
                    if let Some(stored) = written.get(&done.hash) {
                        stats.dedup_bytes += raw;
                        *stored
                    } else {
                        stats.new_chunks += 1;
                        stats.new_stored_bytes +=
                            u64::try_from(buf.as_slice().len()).expect("fits");
                        let stored = writer.put(done.hash, encoding, buf)?;
                        written.insert(done.hash, stored);
                        stored
                    }
                }
            };
            slots[done.file][done.index] = Some(ChunkRef {
                hash: done.hash,
                encoding: stored.encoding,
                raw_len: done.raw_len,
                stored_len: stored.stored_len,
                location: stored.location,
            });
        }
        if run_on.cancel.is_cancelled() {
            return Err(run_on.cancelled(tier, name));
        }
        Ok(())
    })?;

    let files = sources
        .iter()
        .zip(slots)
        .map(|(src, chunks)| {
            let chunks = chunks
                .into_iter()
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| TierError::Corrupt {
                    tier,
                    name: name.clone(),
                    detail: format!("file {}: a chunk was not processed", src.name),
                })?;
            Ok(FileEntry {
                name: src.name.clone(),
                size: src.size,
                mode: src.mode,
                chunks,
            })
        })
        .collect::<Result<Vec<_>, TierError>>()?;
    let manifest = CheckpointManifest {
        name: name.clone(),
        key_id: key.map(|k| k.id().clone()),
        chunk_size: u32::try_from(chunk_size).expect("validated chunk size"),
        packs: Vec::new(),
        files,
    };
    Ok((manifest, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// Keeps new chunks in memory and reports a fixed backlog.
    struct Recorder {
        backlog: Arc<WriteBacklog>,
        encodings: Vec<ChunkEncoding>,
    }

    impl ChunkWriter for Recorder {
        fn put(
            &mut self,
            _hash: ChunkHash,
            encoding: ChunkEncoding,
            data: PooledBuf,
        ) -> Result<StoredChunk, TierError> {
            self.encodings.push(encoding);
            Ok(StoredChunk {
                encoding,
                stored_len: u32::try_from(data.as_slice().len()).unwrap(),
                location: ChunkLocation::Store,
            })
        }

        fn backlog(&self) -> Option<Arc<WriteBacklog>> {
            Some(Arc::clone(&self.backlog))
        }
    }

    struct Empty;

    impl ChunkIndex for Empty {
        fn lookup(&self, _: &ChunkHash, _: u32) -> Result<Option<StoredChunk>, TierError> {
            Ok(None)
        }
    }

    fn drain_with_backlog(queued: u64, adaptive: bool) -> Vec<ChunkEncoding> {
        let dir = tempfile::tempdir().unwrap();
        let text: Vec<u8> = (0..4 * 65536u32)
            .map(|i| b"heap page 16 byt"[(i % 16) as usize])
            .collect();
        fs::write(dir.path().join("pages-1.img"), &text).unwrap();
        let config = ChunkConfig {
            chunk_size: 65536,
            workers: 2,
            adaptive,
            ..ChunkConfig::default()
        };
        let backlog = Arc::new(WriteBacklog::default());
        backlog.add(queued);
        let mut writer = Recorder {
            backlog,
            encodings: Vec::new(),
        };
        let pool = BufferPool::new(config.chunk_size, 8);
        let name = CheckpointName::new("cp").unwrap();
        let (manifest, _) = drain_image_set_on(
            TierKind::Nvme,
            &name,
            dir.path(),
            None,
            &config,
            None,
            &pool,
            &Empty,
            &mut writer,
            RunOn {
                gate: &PriorityGate::new(2),
                class: WorkClass::Foreground,
                cancel: &CancelToken::new(),
            },
        )
        .unwrap();
        let encodings: Vec<_> = manifest.files[0]
            .chunks
            .iter()
            .map(|c| c.encoding)
            .collect();
        assert_eq!(encodings.len(), 4);
        writer.encodings
    }

    #[test]
    fn adaptive_drain_stores_raw_while_the_writer_idles_and_compresses_while_it_is_busy() {
        // The same chunks are one compressible pattern; only the writer's backlog differs.
        assert_eq!(drain_with_backlog(0, true), vec![ChunkEncoding::Raw]);
        assert_eq!(
            drain_with_backlog(u64::MAX / 2, true),
            vec![ChunkEncoding::Zstd]
        );
        assert_eq!(drain_with_backlog(0, false), vec![ChunkEncoding::Zstd]);
    }
}
