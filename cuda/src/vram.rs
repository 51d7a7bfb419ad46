//! Where custom-storage VRAM goes: a [`VramStore`] (the agent plugs in its data plane;
//! [`DirVramStore`] writes plain files for a node-local tier and for tests;
//! [`MemoryVramStore`] holds a rescue copy while a failed checkpoint rolls back), and
//! the [`VramImage`] record of what was saved, chunk by chunk, so a restore can check
//! every chunk before it reaches the GPU.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Mutex;

/// Names one GPU's memory of one process in a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct VramKey {
    /// The process (pid as the agent sees it at checkpoint).
    pub pid: u32,
    /// The GPU's position in the driver's per-device list for that process.
    pub gpu: u32,
}

impl fmt::Display for VramKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} GPU #{}", self.pid, self.gpu)
    }
}

/// Receives VRAM chunks on checkpoint and hands them back on restore. Chunks that are
/// all zero are never put; a restore writes zeros for them.
pub trait VramStore: Send + Sync + fmt::Debug {
    /// Stores `bytes` at `offset` of `key`'s memory.
    fn put(&self, key: &VramKey, offset: u64, bytes: &[u8]) -> io::Result<()>;
    /// Fills `buf` from `offset` of `key`'s memory.
    fn get(&self, key: &VramKey, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// What was saved of one GPU's memory of one process: the manifest's VRAM entry.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VramImage {
    /// Which process and GPU.
    pub key: VramKey,
    /// Bytes of GPU memory.
    pub size: u64,
    /// Bytes per chunk (the last may be shorter).
    pub chunk_size: u64,
    /// Per chunk: its BLAKE3 hash in hex, or `None` for an all-zero chunk.
    pub chunks: Vec<Option<String>>,
}

impl VramImage {
    /// Bytes actually stored (zero chunks excluded).
    pub fn stored_bytes(&self) -> u64 {
        (0..self.chunks.len())
            .filter(|&i| self.chunks[i].is_some())
            .map(|i| self.chunk_len(i))
            .sum()
    }

    /// Length of chunk `index`.
    pub fn chunk_len(&self, index: usize) -> u64 {
        let start = self.chunk_size.saturating_mul(index as u64);
        self.size.saturating_sub(start).min(self.chunk_size)
    }
}

/// A directory of one file per process and GPU (0700 dir, 0600 files), sparse where
/// chunks are zero.
#[derive(Debug)]
pub struct DirVramStore {
    dir: PathBuf,
}

impl DirVramStore {
    /// Creates (0700) or opens the directory.
    pub fn create(dir: impl Into<PathBuf>) -> io::Result<DirVramStore> {
        let dir = dir.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        Ok(DirVramStore { dir })
    }

    fn path(&self, key: &VramKey) -> PathBuf {
        self.dir.join(format!("{}-{}.vram", key.pid, key.gpu))
    }
}

impl VramStore for DirVramStore {
    fn put(&self, key: &VramKey, offset: u64, bytes: &[u8]) -> io::Result<()> {
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(self.path(key))?
            .write_all_at(bytes, offset)
    }

    fn get(&self, key: &VramKey, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let file = fs::File::open(self.path(key))?;
        let mut filled = 0;
        while filled < buf.len() {
            let n = file.read_at(&mut buf[filled..], offset + filled as u64)?;
            if n == 0 {
                // Past the end: trailing zero chunks were never written.
                buf[filled..].fill(0);
                break;
            }
            filled += n;
        }
        Ok(())
    }
}

/// Chunks in this process's memory: the rescue copy of a checkpoint that failed after
/// the driver mapped its VRAM, so the process can be given its memory back.
#[derive(Debug, Default)]
pub struct MemoryVramStore {
    chunks: Mutex<HashMap<(VramKey, u64), Vec<u8>>>,
}

impl VramStore for MemoryVramStore {
    fn put(&self, key: &VramKey, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.chunks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((*key, offset), bytes.to_vec());
        Ok(())
    }

    fn get(&self, key: &VramKey, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let chunks = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
        let chunk = chunks.get(&(*key, offset)).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no chunk at {offset} of {key}"),
            )
        })?;
        if chunk.len() != buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "chunk at {offset} of {key} has {} bytes, not {}",
                    chunk.len(),
                    buf.len()
                ),
            ));
        }
        buf.copy_from_slice(chunk);
        Ok(())
    }
}
