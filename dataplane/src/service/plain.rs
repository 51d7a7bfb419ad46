//! The writer thread's engine when io_uring is unavailable or turned off: pwrite and fsync,
//! one chunk after the other.

use std::os::unix::fs::FileExt;
use std::sync::mpsc::Receiver;

use super::write_job::{cancelled, io_error, open_direct, WriteJob};
use crate::TierError;

/// Writes jobs one after the other with pwrite and fsync.
pub(crate) fn run_plain(rx: &Receiver<WriteJob>) {
    for job in rx {
        let result = write_plain(&job);
        job.complete(result);
    }
}

fn write_plain(job: &WriteJob) -> Result<(), TierError> {
    if job.cancel.is_cancelled() {
        return Err(cancelled(&job.final_path));
    }
    let path = &job.tmp_path;
    let file = open_direct(path).map_err(|e| io_error("create chunk file", path, e))?;
    let len = job.data.as_slice().len();
    let bytes = job
        .data
        .padded(job.padded_len())
        .expect("buffer capacity is a multiple of the block size");
    file.write_all_at(bytes, 0)
        .map_err(|e| io_error("write chunk file", path, e))?;
    file.set_len(u64::try_from(len).unwrap_or(u64::MAX))
        .map_err(|e| io_error("write chunk file", path, e))?;
    if job.cancel.is_cancelled() {
        return Err(cancelled(&job.final_path));
    }
    file.sync_all()
        .map_err(|e| io_error("write chunk file", path, e))
}
