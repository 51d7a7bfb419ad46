//! The moving parts of a streamed dump: a reader per image pipe that cuts it into chunks, and
//! the workers that skip, hash, deduplicate and compress them (see `capture` for the whole).

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Mutex;

use crate::buffer::{BufferPool, PooledBuf};
use crate::chunk::{encode_into, is_zero, store_raw, ChunkConfig, ChunkEncoding, ChunkHash};
use crate::pipeline::{ChunkIndex, StoredChunk, WriteBacklog};
use crate::{CheckpointName, PriorityGate, TierError, TierKind, WorkClass};

const TIER: TierKind = TierKind::Nvme;
/// An image that grows past this moves from ordinary memory into a pinned pool buffer: only
/// page images get there, and a pool buffer per small image would waste the pool.
const PIN_AFTER: usize = 1 << 20;
/// Pipe capacity asked for: fewer, larger reads than the default 64 KiB.
const PIPE_BYTES: libc::c_int = 1 << 20;

/// An error of the stream of checkpoint `name`.
pub(super) fn stream_error(name: &CheckpointName, detail: impl Into<String>) -> TierError {
    TierError::Stream {
        tier: TIER,
        name: name.clone(),
        detail: detail.into(),
    }
}

/// The first failure of a capture, seen by every thread.
pub(super) struct Failure {
    pub(super) failed: AtomicBool,
    pub(super) first: Mutex<Option<TierError>>,
    /// A handle on CRIU's socket, shut down on failure to end the request loop.
    pub(super) socket: UnixStream,
}

impl Failure {
    pub(super) fn fail(&self, e: TierError) {
        let mut first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some(e);
        }
        self.failed.store(true, Ordering::SeqCst);
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }

    pub(super) fn is_set(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    pub(super) fn take(&self) -> Option<TierError> {
        self.first.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// A chunk's raw bytes as a reader filled them.
pub(super) enum Staged {
    Heap(Vec<u8>),
    Pinned(PooledBuf),
}

impl Staged {
    pub(super) fn as_slice(&self) -> &[u8] {
        match self {
            Staged::Heap(v) => v,
            Staged::Pinned(b) => b.as_slice(),
        }
    }
}

pub(super) struct Job {
    pub(super) file: usize,
    pub(super) index: usize,
    pub(super) data: Staged,
}

pub(super) enum Outcome {
    Zero,
    Known(StoredChunk),
    New(ChunkEncoding, PooledBuf),
}

pub(super) struct Done {
    pub(super) file: usize,
    pub(super) index: usize,
    pub(super) hash: ChunkHash,
    pub(super) raw_len: u32,
    pub(super) outcome: Outcome,
}

/// What the session's threads share.
pub(super) struct Shared<'a> {
    pub(super) name: &'a CheckpointName,
    pub(super) dir: &'a Path,
    pub(super) config: &'a ChunkConfig,
    /// The key chunks are addressed and sealed with, when the tier encrypts.
    pub(super) key: Option<&'a crate::SealKey>,
    pub(super) staging: BufferPool,
    pub(super) failure: Failure,
}

/// Reads one image from its pipe into chunk jobs; returns its size.
pub(super) fn read_image(
    shared: &Shared<'_>,
    file: usize,
    path: &Path,
    pipe: OwnedFd,
    jobs: &SyncSender<Job>,
) -> Result<u64, TierError> {
    // SAFETY: F_SETPIPE_SZ on a pipe we own only changes its capacity; failure (a pipe
    // larger than pipe-max-size for an unprivileged agent) keeps the default.
    unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES) };
    let mut pipe = File::from(pipe);
    let chunk_size = shared.config.chunk_size;
    let mut size = 0u64;
    let mut index = 0usize;
    let mut scratch = vec![0u8; 64 << 10];
    // Once an image has needed a pinned buffer, its later chunks go straight into one.
    let mut large = false;
    loop {
        let filled = fill_chunk(shared, &mut pipe, &mut scratch, chunk_size, path, large);
        let (data, eof) = match filled {
            Ok(filled) => filled,
            Err(e) => {
                shared.failure.fail(e);
                return Err(stream_error(shared.name, "an image could not be read"));
            }
        };
        if shared.failure.is_set() {
            // Dropping the pipe makes CRIU's next write fail, so the dump ends promptly.
            return Err(stream_error(shared.name, "stopped after another failure"));
        }
        large |= matches!(data, Staged::Pinned(_));
        let len = data.as_slice().len();
        if len > 0 {
            size += u64::try_from(len).expect("fits");
            let job = Job { file, index, data };
            if jobs.send(job).is_err() {
                return Err(stream_error(shared.name, "the chunk workers stopped"));
            }
            index += 1;
        }
        if eof {
            return Ok(size);
        }
    }
}

/// Reads from `pipe` until a chunk is full or the image ends; returns the chunk and whether
/// the image ended. The first [`PIN_AFTER`] bytes go to ordinary memory unless `large`.
fn fill_chunk(
    shared: &Shared<'_>,
    pipe: &mut File,
    scratch: &mut [u8],
    chunk_size: usize,
    path: &Path,
    large: bool,
) -> Result<(Staged, bool), TierError> {
    let read_error = |e: io::Error| TierError::Io {
        tier: TIER,
        op: "read the stream of image",
        path: path.to_owned(),
        source: e,
    };
    let read = |pipe: &mut File, buf: &mut [u8]| loop {
        match pipe.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other.map_err(&read_error),
        }
    };
    let mut heap = Vec::new();
    while !large && heap.len() < chunk_size.min(PIN_AFTER) {
        let want = scratch.len().min(chunk_size - heap.len());
        let n = read(pipe, &mut scratch[..want])?;
        if n == 0 {
            return Ok((Staged::Heap(heap), true));
        }
        heap.extend_from_slice(&scratch[..n]);
    }
    if heap.len() == chunk_size {
        return Ok((Staged::Heap(heap), false));
    }
    let mut buf = shared.staging.take();
    let mut len = heap.len();
    buf.spare_mut()[..len].copy_from_slice(&heap);
    drop(heap);
    while len < chunk_size {
        let n = read(pipe, &mut buf.spare_mut()[len..chunk_size])?;
        if n == 0 {
            buf.set_len(len);
            return Ok((Staged::Pinned(buf), true));
        }
        len += n;
    }
    buf.set_len(len);
    Ok((Staged::Pinned(buf), false))
}

/// A chunk worker: zero check, hash, dedup lookup, adaptive compression, each chunk under a
/// foreground permit of the data plane's `gate` (a streamed dump is what the workload is
/// frozen for).
pub(super) fn work(
    shared: &Shared<'_>,
    jobs: &Mutex<Receiver<Job>>,
    done: &SyncSender<Result<Done, TierError>>,
    out: &BufferPool,
    index: &dyn ChunkIndex,
    backlog: Option<&WriteBacklog>,
    gate: &PriorityGate,
) {
    let config = shared.config;
    let busy_at = u64::try_from(2 * config.worker_count() * config.chunk_size).unwrap_or(u64::MAX);
    let mut compressor = match zstd::bulk::Compressor::new(config.zstd_level) {
        Ok(c) => c,
        Err(e) => {
            let _ = done.send(Err(TierError::Config {
                tier: TIER,
                detail: format!("zstd level {}: {e}", config.zstd_level),
            }));
            return;
        }
    };
    loop {
        let job = match jobs.lock().unwrap_or_else(|e| e.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let permit = gate.acquire(WorkClass::Foreground);
        let data = job.data.as_slice();
        let raw_len = u32::try_from(data.len()).expect("chunk size is capped below 4 GiB");
        let result = if is_zero(data) {
            Ok((ChunkHash::ZERO, Outcome::Zero))
        } else {
            let hash = crate::chunk::address_of(shared.key, data);
            index.lookup(&hash, raw_len).map(|known| match known {
                Some(stored) => (hash, Outcome::Known(stored)),
                None => {
                    let mut buf = out.take();
                    let compress =
                        !config.adaptive || backlog.is_none_or(|b| b.queued() >= busy_at);
                    let (encoding, n) = if compress {
                        encode_into(data, config, &mut compressor, buf.spare_mut())
                    } else {
                        store_raw(data, buf.spare_mut())
                    };
                    let n = crate::chunk::seal_stored(
                        shared.key,
                        &hash,
                        encoding,
                        raw_len,
                        buf.spare_mut(),
                        n,
                    );
                    buf.set_len(n);
                    (hash, Outcome::New(encoding, buf))
                }
            })
        };
        drop(permit);
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
