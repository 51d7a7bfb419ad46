//! One chunk write as the writer thread's engines see it: where it goes, its pooled buffer,
//! and how it ends (renamed into place on success, removed on failure, reported to its store).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use super::CancelToken;
use crate::buffer::PooledBuf;
use crate::chunk::IO_ALIGN;
use crate::pipeline::WriteBacklog;
use crate::{TierError, TierKind};

/// The tier every chunk write belongs to.
pub(crate) const TIER: TierKind = TierKind::Nvme;
/// One chunk to make durable at `final_path`, and where to say how it went.
pub(crate) struct WriteJob {
    pub tmp_path: PathBuf,
    pub final_path: PathBuf,
    pub data: PooledBuf,
    pub cancel: CancelToken,
    pub backlog: Arc<WriteBacklog>,
    pub reply: Sender<JobDone>,
}

/// The chunk file made durable, or why not (its temporary file is gone either way).
pub(crate) type JobDone = Result<PathBuf, TierError>;

pub(crate) fn io_error(op: &'static str, path: &Path, source: io::Error) -> TierError {
    TierError::Io {
        tier: TIER,
        op,
        path: path.to_owned(),
        source,
    }
}

pub(crate) fn cancelled(path: &Path) -> TierError {
    TierError::Cancelled {
        tier: TIER,
        detail: format!("chunk {} not written", path.display()),
    }
}

impl WriteJob {
    /// Padded length of the write: O_DIRECT needs whole blocks.
    pub(crate) fn padded_len(&self) -> usize {
        self.data.as_slice().len().div_ceil(IO_ALIGN) * IO_ALIGN
    }

    /// Ends the job: on success renames the temporary file into place, on failure removes
    /// it; then tells the store.
    pub(crate) fn complete(self, result: Result<(), TierError>) {
        let len = u64::try_from(self.data.as_slice().len()).unwrap_or(u64::MAX);
        let result = result.and_then(|()| {
            fs::rename(&self.tmp_path, &self.final_path)
                .map(|()| self.final_path.clone())
                .map_err(|e| io_error("rename chunk file", &self.tmp_path, e))
        });
        if result.is_err() {
            let _ = fs::remove_file(&self.tmp_path);
        }
        self.backlog.done(len);
        // A store that stopped listening has failed already and sweeps its own chunks.
        let _ = self.reply.send(result);
    }
}

/// Opens a chunk's temporary file for an uncached write.
pub(crate) fn open_direct(path: &Path) -> io::Result<File> {
    let open = |flags| {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(flags)
            .open(path)
    };
    match open(libc::O_DIRECT) {
        // Some file systems (older tmpfs) refuse O_DIRECT; buffered writes plus fsync are
        // still durable.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => open(0),
        other => other,
    }
}
