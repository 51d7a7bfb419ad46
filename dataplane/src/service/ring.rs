//! The io_uring engine of the chunk writer: up to [`RING_DEPTH`] chunks in flight, each a
//! write (from a registered fixed buffer when the chunk's buffer belongs to the data plane's
//! pool) followed by an fsync, both through the ring.
//!
//! Files are not registered: every chunk is a new temporary file written once, so a
//! registration (a syscall, like the `fget` it saves) would cost as much as it spares.
//! Buffers are, because the same pool buffers carry chunk after chunk: the kernel then skips
//! pinning and mapping their pages for every write.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::mpsc::{Receiver, TryRecvError};

use io_uring::{opcode, squeue, types, IoUring};

use super::plain::run_plain;
use super::write_job::{cancelled, io_error, open_direct, WriteJob};
use crate::buffer::BufferPool;
use crate::TierError;

/// Writes kept in flight on the ring.
pub(crate) const RING_DEPTH: usize = 16;

enum Stage {
    Write,
    Fsync,
}

struct InFlight {
    job: WriteJob,
    file: std::fs::File,
    padded: usize,
    stage: Stage,
}

/// The data plane pool's buffers as the ring's fixed-buffer table: registered lazily, the
/// first time each buffer carries a chunk, because the pool allocates them on demand.
struct FixedBuffers {
    pool_id: u64,
    registered: Vec<bool>,
}

impl FixedBuffers {
    fn new(ring: &IoUring, pool: &BufferPool) -> Option<Self> {
        let count = u32::try_from(pool.count())
            .ok()
            .filter(|&n| n <= u32::from(u16::MAX))?;
        match ring.submitter().register_buffers_sparse(count) {
            Ok(()) => Some(Self {
                pool_id: pool.id(),
                registered: vec![false; pool.count()],
            }),
            Err(e) => {
                tracing::info!(error = %e, "io_uring fixed buffers unavailable; plain writes");
                None
            }
        }
    }

    /// The fixed-buffer index of the job's buffer, registering it first if needed.
    fn index_of(&mut self, ring: &IoUring, job: &WriteJob) -> Option<u16> {
        if job.data.pool_id() != self.pool_id {
            return None;
        }
        let slot = job.data.slot();
        let index = u16::try_from(slot).ok()?;
        if !*self.registered.get(slot)? {
            let iov = libc::iovec {
                iov_base: job.data.as_ptr().cast_mut().cast(),
                iov_len: job.data.capacity(),
            };
            // SAFETY: the buffer belongs to the pool this thread keeps alive (`run`'s `pool`
            // outlives `ring`), and pool buffers are freed only when the pool is dropped, so
            // the registered range stays valid for as long as the ring exists.
            let done = unsafe {
                ring.submitter()
                    .register_buffers_update(u32::from(index), &[iov], None)
            };
            if done.is_err() {
                return None;
            }
            self.registered[slot] = true;
        }
        Some(index)
    }
}

/// Serves jobs through `ring` until every store's sender is gone. `pool` is the data plane's
/// buffer pool, registered as fixed buffers; it must outlive the ring, which it does as a
/// parameter that lives longer than the ring's owner here.
pub(crate) fn run(mut ring: IoUring, rx: &Receiver<WriteJob>, pool: &BufferPool) {
    let mut fixed = FixedBuffers::new(&ring, pool);
    if let Err(e) = serve(&mut ring, rx, &mut fixed) {
        // The kernel may still own in-flight buffers, so they were leaked, not reused; the
        // remaining jobs are written without io_uring.
        tracing::error!(error = %e, "io_uring failed; the data plane continues with pwrite/fsync");
        run_plain(rx);
    }
    drop(ring);
}

fn serve(
    ring: &mut IoUring,
    rx: &Receiver<WriteJob>,
    fixed: &mut Option<FixedBuffers>,
) -> io::Result<()> {
    let mut slots: Vec<Option<InFlight>> = (0..RING_DEPTH).map(|_| None).collect();
    let mut in_flight = 0usize;
    let mut open_channel = true;
    loop {
        // Fill the ring while there is work and room; block for work only when idle.
        while open_channel && in_flight < RING_DEPTH {
            let job = if in_flight == 0 {
                match rx.recv() {
                    Ok(job) => job,
                    Err(_) => {
                        open_channel = false;
                        break;
                    }
                }
            } else {
                match rx.try_recv() {
                    Ok(job) => job,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open_channel = false;
                        break;
                    }
                }
            };
            if job.cancel.is_cancelled() {
                let path = job.final_path.clone();
                job.complete(Err(cancelled(&path)));
                continue;
            }
            let file = match open_direct(&job.tmp_path) {
                Ok(f) => f,
                Err(e) => {
                    let err = io_error("create chunk file", &job.tmp_path, e);
                    job.complete(Err(err));
                    continue;
                }
            };
            let padded = job.padded_len();
            let slot = slots.iter().position(Option::is_none).expect("a free slot");
            let user_data = u64::try_from(slot).expect("small");
            let len = u32::try_from(padded).expect("chunks are below 4 GiB");
            let fd = types::Fd(file.as_raw_fd());
            let sqe = match fixed.as_mut().and_then(|f| f.index_of(ring, &job)) {
                Some(index) => opcode::WriteFixed::new(fd, job.data.as_ptr(), len, index)
                    .offset(0)
                    .build(),
                None => opcode::Write::new(fd, job.data.as_ptr(), len)
                    .offset(0)
                    .build(),
            };
            // The buffer and the fd live in `slots[slot]` until the completion for this
            // user_data is reaped below; the buffer holds at least `padded` bytes (capacity
            // is a multiple of IO_ALIGN).
            push(ring, &sqe.user_data(user_data))?;
            slots[slot] = Some(InFlight {
                job,
                file,
                padded,
                stage: Stage::Write,
            });
            in_flight += 1;
        }
        if in_flight == 0 {
            return Ok(());
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            // The kernel may still read these buffers, so they are never dropped or reused;
            // their stores get the error.
            for op in slots.into_iter().flatten() {
                let _ = op.job.reply.send(Err(io_error(
                    "io_uring submit",
                    &op.job.tmp_path,
                    io::Error::new(e.kind(), e.to_string()),
                )));
                std::mem::forget(op);
            }
            return Err(e);
        }
        let completions: Vec<(usize, i32)> = ring
            .completion()
            .map(|c| {
                (
                    usize::try_from(c.user_data()).expect("slot index"),
                    c.result(),
                )
            })
            .collect();
        for (slot, res) in completions {
            let mut op = slots[slot].take().expect("completion for a live slot");
            let step: Result<bool, TierError> = match op.stage {
                Stage::Write if res < 0 => Err(io::Error::from_raw_os_error(-res)),
                Stage::Write if usize::try_from(res).ok() != Some(op.padded) => {
                    Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("short write: {res} of {} bytes (disk full?)", op.padded),
                    ))
                }
                Stage::Write => {
                    let len = u64::try_from(op.job.data.as_slice().len()).expect("fits");
                    op.file.set_len(len).map(|()| true)
                }
                Stage::Fsync if res < 0 => Err(io::Error::from_raw_os_error(-res)),
                Stage::Fsync => Ok(false),
            }
            .map_err(|e| io_error("write chunk file", &op.job.tmp_path, e));
            match step {
                Ok(true) if op.job.cancel.is_cancelled() => {
                    in_flight -= 1;
                    let path = op.job.final_path.clone();
                    op.job.complete(Err(cancelled(&path)));
                }
                Ok(true) => {
                    let sqe = opcode::Fsync::new(types::Fd(op.file.as_raw_fd()))
                        .build()
                        .user_data(u64::try_from(slot).expect("small"));
                    // The fd stays open in `slots[slot]` until this completes.
                    push(ring, &sqe)?;
                    op.stage = Stage::Fsync;
                    slots[slot] = Some(op);
                }
                Ok(false) => {
                    in_flight -= 1;
                    op.job.complete(Ok(()));
                }
                Err(e) => {
                    in_flight -= 1;
                    op.job.complete(Err(e));
                }
            }
        }
        if !open_channel && in_flight == 0 {
            return Ok(());
        }
    }
}

/// Queues one entry; the ring has room for every slot's one outstanding entry.
fn push(ring: &mut IoUring, sqe: &squeue::Entry) -> io::Result<()> {
    // SAFETY: the caller keeps the entry's buffer and fd alive until its completion (see the
    // call sites).
    unsafe { ring.submission().push(sqe) }
        .map_err(|_| io::Error::other("io_uring submission queue is full"))
}
