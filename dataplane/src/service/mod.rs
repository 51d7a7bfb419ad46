//! The node's data-plane service: one per agent, shared by every tier and every transfer.
//!
//! It owns what must not be multiplied per store: the chunk writer thread with its probed
//! io_uring (or the pwrite fallback), the pinned buffer pools, and the priority gate that
//! bounds the CPU all chunk work takes together and serves checkpoints and restores before
//! prefetches and those before background drains. Tiers hand it their bulk work; their
//! metadata (which checkpoints they hold, bytes used) never waits for it.

mod cancel;
mod gate;
mod plain;
mod probe;
mod ring;
mod write_job;
mod writer;

use std::sync::Arc;

pub use cancel::CancelToken;
pub use gate::{ClassSession, PriorityGate, WorkClass, WorkPermit};
pub use probe::{IoBackend, IoMode};
pub(crate) use writer::StoreWrites;

use crate::buffer::BufferPool;
use crate::chunk::ChunkConfig;
use crate::{TierError, TierKind};

/// Environment variable that overrides `[dataplane] io` (`auto`, `uring` or `pread`), for
/// nodes whose seccomp profile or sysctl the operator knows about before the config does.
pub const IO_MODE_ENV: &str = "KYBERNATE_DATAPLANE_IO";

/// Chunk buffers beyond two per worker: room for the writer's queue and ring, so workers
/// rarely wait for a buffer while the disk is busy.
const WRITE_BUFFERS: usize = 24;
/// Staging buffers of streamed dumps beyond two per worker: one per image pipe being read.
const STAGING_BUFFERS: usize = 4;

/// The node's data plane; see the module docs.
#[derive(Debug)]
pub struct DataPlane {
    writer: writer::ChunkWriterThread,
    gate: PriorityGate,
    /// Chunk-sized buffers for encoded chunks on their way to disk and for chunks read back.
    pool: BufferPool,
    /// Chunk-sized buffers CRIU's streamed pages land in before they are encoded.
    staging: BufferPool,
}

impl DataPlane {
    /// Starts the service for chunks cut as `chunk` says, with `chunk.worker_count()`
    /// permits (`chunk.background_worker_count()` of them for background work), probing io_uring as `io` (or [`IO_MODE_ENV`], when set) asks.
    pub fn start(io: IoMode, chunk: &ChunkConfig) -> Result<Arc<Self>, TierError> {
        let io = match std::env::var(IO_MODE_ENV) {
            Ok(value) => IoMode::parse(value.trim()).ok_or_else(|| TierError::Config {
                tier: TierKind::Nvme,
                detail: format!("{IO_MODE_ENV}={value:?} is not one of auto, uring, pread"),
            })?,
            Err(_) => io,
        };
        let workers = chunk.worker_count();
        let [(pool_buf, pool_count), (staging_buf, staging_count)] = pool_sizes(chunk);
        let pool = BufferPool::new(pool_buf, pool_count);
        let staging = BufferPool::new(staging_buf, staging_count);
        let writer = writer::ChunkWriterThread::start(io, &pool)?;
        Ok(Arc::new(Self {
            writer,
            gate: PriorityGate::with_lower_limit(workers, chunk.background_worker_count()),
            pool,
            staging,
        }))
    }

    /// The gate every chunk's CPU work passes.
    pub fn gate(&self) -> &PriorityGate {
        &self.gate
    }

    /// Chunks worked on at once, node-wide.
    pub fn workers(&self) -> usize {
        self.gate.permits()
    }

    /// Of [`DataPlane::workers`], how many prefetches and background drains may use.
    pub fn background_workers(&self) -> usize {
        self.gate.lower_limit()
    }

    /// The I/O engine chunk writes use.
    pub fn io_backend(&self) -> &IoBackend {
        self.writer.backend()
    }

    /// Pinned bytes the data plane holds once its pools are fully allocated.
    pub fn pinned_pool_bytes(&self) -> u64 {
        self.pool.capacity_bytes() + self.staging.capacity_bytes()
    }

    /// What [`DataPlane::pinned_pool_bytes`] will be for `chunk`, without starting anything
    /// (for `kybernatectl config show` on a config not yet in force).
    pub fn pinned_pool_bytes_for(chunk: &ChunkConfig) -> u64 {
        pool_sizes(chunk)
            .iter()
            .map(|&(buf, count)| BufferPool::capacity_of(buf, count))
            .sum()
    }

    pub(crate) fn pool(&self) -> &BufferPool {
        &self.pool
    }

    pub(crate) fn staging(&self) -> &BufferPool {
        &self.staging
    }

    /// A handle on the writer for the chunks of one store.
    pub(crate) fn store_writes(&self, cancel: CancelToken) -> StoreWrites {
        self.writer.store_writes(cancel)
    }
}

/// Buffer size and count of the two pinned pools for chunks cut as `chunk` says: the chunk
/// pool (each buffer holds a chunk sealed for encryption at rest: its bytes, tag and nonce)
/// and the staging pool (raw chunks).
fn pool_sizes(chunk: &ChunkConfig) -> [(usize, usize); 2] {
    let workers = chunk.worker_count();
    [
        (
            chunk.chunk_size + crate::SEAL_OVERHEAD,
            workers * 2 + WRITE_BUFFERS,
        ),
        (chunk.chunk_size, workers * 2 + STAGING_BUFFERS),
    ]
}
