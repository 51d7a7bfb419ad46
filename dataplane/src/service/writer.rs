//! The node's chunk writer: one thread, shared by every store, that makes chunk files
//! durable. Each chunk goes to a temporary file opened with O_DIRECT, is written from its
//! aligned pooled buffer (length padded to 4 KiB, then truncated to the real length), fsynced,
//! and only then renamed to its content address. So a chunk file under its hash is always
//! complete and on disk; a crash leaves only temporary files, which `NvmeTier::open` sweeps.
//!
//! The thread drives io_uring ([`super::ring`]) or, when the probe failed or the operator
//! asked for it, plain pwrite/fsync ([`super::plain`]). Every store talks to it through its own
//! [`StoreWrites`], which collects that store's results, so one store's failure or
//! cancellation never touches another's chunks.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::plain::run_plain;
use super::probe::{probe_ring, IoBackend, IoMode};
use super::ring;
use super::write_job::{cancelled, io_error, JobDone, WriteJob, TIER};
use super::CancelToken;
use crate::buffer::{BufferPool, PooledBuf};
use crate::pipeline::WriteBacklog;
use crate::TierError;

/// Chunks queued for the writer thread beyond those it works on, over all stores.
const QUEUE_DEPTH: usize = 16;

/// The writer thread and the engine it uses.
#[derive(Debug)]
pub(crate) struct ChunkWriterThread {
    tx: Option<SyncSender<WriteJob>>,
    thread: Option<JoinHandle<()>>,
    backend: IoBackend,
}

impl ChunkWriterThread {
    /// Probes io_uring as `mode` says, logs the engine chosen (one line) and starts the
    /// thread. Buffers of `pool` are registered with the ring as fixed buffers.
    pub fn start(mode: IoMode, pool: &BufferPool) -> Result<Self, TierError> {
        let entries = u32::try_from(ring::RING_DEPTH * 2).expect("small");
        let (backend, uring) = match mode {
            IoMode::Pread => (
                IoBackend::Pread {
                    reason: "forced by [dataplane] io = \"pread\"".into(),
                },
                None,
            ),
            IoMode::Auto | IoMode::Uring => match probe_ring(entries) {
                Ok(uring) => (IoBackend::Uring, Some(uring)),
                Err(reason) if mode == IoMode::Auto => (IoBackend::Pread { reason }, None),
                Err(reason) => {
                    return Err(TierError::Config {
                        tier: TIER,
                        detail: format!("[dataplane] io = \"uring\", but {reason}"),
                    })
                }
            },
        };
        match &backend {
            IoBackend::Uring => tracing::info!("data plane writes chunks through io_uring"),
            IoBackend::Pread { reason } => {
                tracing::warn!(%reason, "data plane writes chunks with pwrite/fsync, not io_uring");
            }
        }
        let (tx, rx) = sync_channel(QUEUE_DEPTH);
        let pool = pool.clone();
        let thread = std::thread::Builder::new()
            .name("kyb-chunk-writer".into())
            .spawn(move || match uring {
                Some(uring) => ring::run(uring, &rx, &pool),
                None => run_plain(&rx),
            })
            .map_err(|e| io_error("start the chunk writer", Path::new(""), e))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            backend,
        })
    }

    /// The engine in use.
    pub fn backend(&self) -> &IoBackend {
        &self.backend
    }

    /// A handle for the chunks of one store, stopped by `cancel`.
    pub fn store_writes(&self, cancel: CancelToken) -> StoreWrites {
        let (reply_tx, replies) = channel();
        StoreWrites {
            tx: self.tx.clone(),
            reply_tx: Some(reply_tx),
            replies,
            pending: 0,
            backlog: Arc::default(),
            cancel,
            outcome: WriterOutcome::default(),
        }
    }
}

impl Drop for ChunkWriterThread {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Chunk files a store's writes made durable, and its first error if any.
#[derive(Debug, Default)]
pub(crate) struct WriterOutcome {
    pub written: Vec<PathBuf>,
    pub error: Option<TierError>,
}

/// One store's side of the writer thread.
pub(crate) struct StoreWrites {
    tx: Option<SyncSender<WriteJob>>,
    reply_tx: Option<Sender<JobDone>>,
    replies: Receiver<JobDone>,
    pending: usize,
    backlog: Arc<WriteBacklog>,
    cancel: CancelToken,
    outcome: WriterOutcome,
}

impl StoreWrites {
    /// Queues a chunk; fails once one of this store's writes failed (which
    /// [`StoreWrites::finish`] then reports) or the store was cancelled.
    pub fn submit(
        &mut self,
        tmp_path: PathBuf,
        final_path: PathBuf,
        data: PooledBuf,
    ) -> Result<(), ()> {
        self.collect(false);
        if self.outcome.error.is_some() {
            return Err(());
        }
        if self.cancel.is_cancelled() {
            self.outcome.error = Some(cancelled(&final_path));
            return Err(());
        }
        let (Some(tx), Some(reply)) = (&self.tx, &self.reply_tx) else {
            return Err(());
        };
        let len = u64::try_from(data.as_slice().len()).unwrap_or(u64::MAX);
        self.backlog.add(len);
        let job = WriteJob {
            tmp_path,
            final_path,
            data,
            cancel: self.cancel.clone(),
            backlog: Arc::clone(&self.backlog),
            reply: reply.clone(),
        };
        match tx.send(job) {
            Ok(()) => {
                self.pending += 1;
                Ok(())
            }
            Err(_) => {
                self.backlog.done(len);
                self.outcome.error = Some(io_error(
                    "queue chunk write",
                    Path::new(""),
                    io::Error::other("the chunk writer thread stopped"),
                ));
                Err(())
            }
        }
    }

    /// Bytes submitted and not yet durable (or failed).
    pub fn backlog(&self) -> Arc<WriteBacklog> {
        Arc::clone(&self.backlog)
    }

    /// Takes the results that arrived (all pending ones when `wait`).
    fn collect(&mut self, wait: bool) {
        while self.pending > 0 {
            let done = if wait {
                match self.replies.recv() {
                    Ok(done) => done,
                    // Every job's sender is gone without a reply: the thread died.
                    Err(_) => Err(io_error(
                        "write chunk",
                        Path::new(""),
                        io::Error::other("the chunk writer thread stopped"),
                    )),
                }
            } else {
                match self.replies.try_recv() {
                    Ok(done) => done,
                    Err(_) => break,
                }
            };
            self.pending -= 1;
            match done {
                Ok(path) => self.outcome.written.push(path),
                Err(e) => {
                    self.outcome.error.get_or_insert(e);
                }
            }
        }
    }

    /// Waits until every queued chunk is durable or failed.
    pub fn finish(mut self) -> WriterOutcome {
        self.tx.take();
        self.reply_tx.take();
        self.collect(true);
        std::mem::take(&mut self.outcome)
    }
}
