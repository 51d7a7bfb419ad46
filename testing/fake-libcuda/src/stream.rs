//! Streams: each one a FIFO of copies run by its own worker thread, so that copies
//! enqueued with the `*Async` calls overlap with the caller's work as on a GPU, and
//! `cuStreamSynchronize` waits for them. An error sticks to its stream: later work is
//! skipped and every synchronisation reports it.

use crate::codes::{INVALID_HANDLE, NOT_READY, SUCCESS};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Work queued on a stream; returns a driver result code.
pub type Job = Box<dyn FnOnce() -> i32 + Send>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    busy: bool,
    error: i32,
    closed: bool,
}

#[derive(Default)]
struct Stream {
    queue: Mutex<Queue>,
    changed: Condvar,
}

impl Stream {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

static STREAMS: Mutex<BTreeMap<u64, Arc<Stream>>> = Mutex::new(BTreeMap::new());
/// Stream handles are opaque, non-null pointer values.
static NEXT: AtomicU64 = AtomicU64::new(0x5f00_0000);

fn registry() -> MutexGuard<'static, BTreeMap<u64, Arc<Stream>>> {
    STREAMS.lock().unwrap_or_else(|p| p.into_inner())
}

fn find(handle: u64) -> Option<Arc<Stream>> {
    registry().get(&handle).cloned()
}

/// Creates a stream with its worker; `None` when no thread can be started.
pub fn create() -> Option<u64> {
    let handle = NEXT.fetch_add(0x10, Ordering::Relaxed);
    let stream = Arc::new(Stream::default());
    let worker = Arc::clone(&stream);
    std::thread::Builder::new()
        .name("fake-cuda-stream".into())
        .spawn(move || run(&worker))
        .ok()?;
    registry().insert(handle, stream);
    Some(handle)
}

fn run(stream: &Stream) {
    let mut q = stream.lock();
    loop {
        while q.jobs.is_empty() && !q.closed {
            q = stream.changed.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        let Some(job) = q.jobs.pop_front() else {
            return;
        };
        if q.error != SUCCESS {
            stream.changed.notify_all();
            continue;
        }
        q.busy = true;
        drop(q);
        let code = job();
        q = stream.lock();
        q.busy = false;
        if code != SUCCESS && q.error == SUCCESS {
            q.error = code;
        }
        stream.changed.notify_all();
    }
}

/// Queues `job` on `handle`.
pub fn enqueue(handle: u64, job: Job) -> i32 {
    let Some(stream) = find(handle) else {
        return INVALID_HANDLE;
    };
    let mut q = stream.lock();
    if q.closed {
        return INVALID_HANDLE;
    }
    q.jobs.push_back(job);
    stream.changed.notify_all();
    SUCCESS
}

/// Waits until everything queued on `handle` has run; the stream's sticky error, if any.
pub fn synchronize(handle: u64) -> i32 {
    let Some(stream) = find(handle) else {
        return INVALID_HANDLE;
    };
    let mut q = stream.lock();
    while !q.jobs.is_empty() || q.busy {
        q = stream.changed.wait(q).unwrap_or_else(|p| p.into_inner());
    }
    q.error
}

/// `CUDA_ERROR_NOT_READY` while work is pending, else as [`synchronize`].
pub fn query(handle: u64) -> i32 {
    let Some(stream) = find(handle) else {
        return INVALID_HANDLE;
    };
    let q = stream.lock();
    if !q.jobs.is_empty() || q.busy {
        NOT_READY
    } else {
        q.error
    }
}

/// Drains and retires `handle`; later use gets `CUDA_ERROR_INVALID_HANDLE`.
pub fn destroy(handle: u64) -> i32 {
    let code = synchronize(handle);
    if let Some(stream) = registry().remove(&handle) {
        stream.lock().closed = true;
        stream.changed.notify_all();
    }
    code
}
