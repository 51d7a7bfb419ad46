//! Durable chunk-file writes through io_uring on a dedicated thread.
//!
//! Each chunk goes to a temporary file opened with O_DIRECT, is written from its aligned pooled
//! buffer (length padded to 4 KiB, then truncated to the real length), fsynced through the
//! ring, and only then renamed to its content address. So a chunk file under its hash is always
//! complete and on disk; a crash leaves only temporary files, which `NvmeTier::open` sweeps.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;

use io_uring::{opcode, types, IoUring};

use crate::buffer::PooledBuf;
use crate::chunk::IO_ALIGN;
use crate::pipeline::WriteBacklog;
use crate::{TierError, TierKind};

/// Writes kept in flight on the ring.
const RING_DEPTH: usize = 16;

/// One chunk to make durable at `final_path`.
pub(crate) struct WriteJob {
    pub tmp_path: PathBuf,
    pub final_path: PathBuf,
    pub data: PooledBuf,
}

enum Stage {
    Write,
    Fsync,
}

struct InFlight {
    job: WriteJob,
    file: File,
    padded: usize,
    stage: Stage,
}

/// Handle to the writer thread of one store.
pub(crate) struct UringWriter {
    tx: Option<SyncSender<WriteJob>>,
    backlog: Arc<WriteBacklog>,
    thread: Option<JoinHandle<WriterOutcome>>,
}

/// Chunk files the writer made durable, and the first error if any.
pub(crate) struct WriterOutcome {
    pub written: Vec<PathBuf>,
    pub error: Option<TierError>,
}

impl UringWriter {
    /// Starts the writer thread.
    pub fn start() -> Result<Self, TierError> {
        let ring = IoUring::new(u32::try_from(RING_DEPTH * 2).expect("small")).map_err(|e| {
            TierError::Io {
                tier: TierKind::Nvme,
                op: "set up io_uring",
                path: PathBuf::new(),
                source: e,
            }
        })?;
        let (tx, rx) = sync_channel(RING_DEPTH);
        let backlog = Arc::new(WriteBacklog::default());
        let finished = Arc::clone(&backlog);
        let thread = std::thread::Builder::new()
            .name("kyb-nvme-uring".into())
            .spawn(move || run(ring, rx, &finished))
            .map_err(|e| TierError::Io {
                tier: TierKind::Nvme,
                op: "spawn io_uring writer",
                path: PathBuf::new(),
                source: e,
            })?;
        Ok(Self {
            tx: Some(tx),
            backlog,
            thread: Some(thread),
        })
    }

    /// Queues a chunk; fails only if the writer already stopped on an error (which
    /// [`UringWriter::finish`] then reports).
    pub fn submit(&self, job: WriteJob) -> Result<(), ()> {
        let len = u64::try_from(job.data.as_slice().len()).expect("fits");
        self.backlog.add(len);
        self.tx.as_ref().ok_or(())?.send(job).map_err(|_| {
            self.backlog.done(len);
        })
    }

    /// Bytes submitted and not yet durable (or failed).
    pub fn backlog(&self) -> Arc<WriteBacklog> {
        Arc::clone(&self.backlog)
    }

    /// Waits until every queued chunk is durable or the writer failed.
    pub fn finish(mut self) -> WriterOutcome {
        self.join()
    }

    fn join(&mut self) -> WriterOutcome {
        self.tx.take();
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(outcome)) => outcome,
            Some(Err(_)) => WriterOutcome {
                written: Vec::new(),
                error: Some(TierError::Io {
                    tier: TierKind::Nvme,
                    op: "io_uring writer",
                    path: PathBuf::new(),
                    source: io::Error::other("writer thread panicked"),
                }),
            },
            None => WriterOutcome {
                written: Vec::new(),
                error: None,
            },
        }
    }
}

impl Drop for UringWriter {
    fn drop(&mut self) {
        self.join();
    }
}

fn open_direct(path: &PathBuf) -> io::Result<File> {
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

fn run(mut ring: IoUring, rx: Receiver<WriteJob>, backlog: &WriteBacklog) -> WriterOutcome {
    let mut slots: Vec<Option<InFlight>> = (0..RING_DEPTH).map(|_| None).collect();
    let mut in_flight = 0usize;
    let mut written = Vec::new();
    let mut error: Option<TierError> = None;
    let mut open_channel = true;
    let fail = |op, path: &PathBuf, source| TierError::Io {
        tier: TierKind::Nvme,
        op,
        path: path.clone(),
        source,
    };

    loop {
        // Fill the ring while there is work and room; block for work only when idle.
        while open_channel && error.is_none() && in_flight < RING_DEPTH {
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
            let file = match open_direct(&job.tmp_path) {
                Ok(f) => f,
                Err(e) => {
                    error = Some(fail("create chunk file", &job.tmp_path, e));
                    break;
                }
            };
            let len = job.data.as_slice().len();
            let padded = len.div_ceil(IO_ALIGN) * IO_ALIGN;
            let slot = slots.iter().position(Option::is_none).expect("a free slot");
            let sqe = opcode::Write::new(
                types::Fd(file.as_raw_fd()),
                job.data.as_ptr(),
                u32::try_from(padded).expect("chunks are below 4 GiB"),
            )
            .offset(0)
            .build()
            .user_data(u64::try_from(slot).expect("small"));
            // SAFETY: the buffer and the fd live in `slots[slot]` until the completion for
            // this user_data is reaped below; the buffer holds at least `padded` bytes
            // (capacity is a multiple of IO_ALIGN).
            unsafe { ring.submission().push(&sqe) }.expect("ring has room for RING_DEPTH");
            slots[slot] = Some(InFlight {
                job,
                file,
                padded,
                stage: Stage::Write,
            });
            in_flight += 1;
        }
        if in_flight == 0 {
            break;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            // The kernel may still own buffers; do not reuse them: leak rather than corrupt.
            std::mem::forget(slots);
            return WriterOutcome {
                written,
                error: Some(fail("io_uring submit", &PathBuf::new(), e)),
            };
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
            let len = u64::try_from(op.job.data.as_slice().len()).expect("fits");
            let step = match op.stage {
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
            };
            match step {
                Ok(true) if error.is_none() => {
                    let sqe = opcode::Fsync::new(types::Fd(op.file.as_raw_fd()))
                        .build()
                        .user_data(u64::try_from(slot).expect("small"));
                    // SAFETY: the fd stays open in `slots[slot]` until this completes.
                    unsafe { ring.submission().push(&sqe) }.expect("slot's own room");
                    op.stage = Stage::Fsync;
                    slots[slot] = Some(op);
                }
                Ok(true) => {
                    let _ = fs::remove_file(&op.job.tmp_path);
                    in_flight -= 1;
                    backlog.done(len);
                }
                Ok(false) => {
                    in_flight -= 1;
                    backlog.done(len);
                    match fs::rename(&op.job.tmp_path, &op.job.final_path) {
                        Ok(()) => written.push(op.job.final_path),
                        Err(e) => {
                            let _ = fs::remove_file(&op.job.tmp_path);
                            error.get_or_insert(fail("rename chunk file", &op.job.tmp_path, e));
                        }
                    }
                }
                Err(e) => {
                    in_flight -= 1;
                    backlog.done(len);
                    let _ = fs::remove_file(&op.job.tmp_path);
                    error.get_or_insert(fail("write chunk file", &op.job.tmp_path, e));
                }
            }
        }
        if !open_channel && in_flight == 0 {
            break;
        }
    }
    WriterOutcome { written, error }
}
