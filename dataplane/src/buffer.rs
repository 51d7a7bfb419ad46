//! A bounded pool of page-aligned, mlock'ed buffers.
//!
//! Every encoded chunk and every S3 part lives in one of these: they are aligned for O_DIRECT,
//! pinned so the kernel never pages them out mid-write, and reused, so a multi-GiB drain does
//! no allocation per chunk and its memory stays flat (a full pool makes producers wait).

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::{Arc, Condvar, Mutex};

use crate::chunk::IO_ALIGN;

/// One aligned allocation of `capacity` bytes, with `len` of them in use.
#[derive(Debug)]
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    capacity: usize,
    len: usize,
    locked: bool,
    /// Position among its pool's buffers: its index in an io_uring fixed-buffer table.
    slot: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`; mutation needs `&mut self`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn new(capacity: usize, slot: usize) -> Self {
        let capacity = capacity.div_ceil(IO_ALIGN).max(1) * IO_ALIGN;
        let layout = Layout::from_size_align(capacity, IO_ALIGN).expect("valid buffer layout");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        // SAFETY: ptr..ptr+capacity is our allocation. Failure (RLIMIT_MEMLOCK) only means
        // the buffer is not pinned, which costs speed, not correctness.
        let locked = unsafe { libc::mlock(ptr.as_ptr().cast(), capacity) } == 0;
        Self {
            ptr,
            capacity,
            len: 0,
            locked,
            slot,
        }
    }

    /// Bytes the buffer can hold (a multiple of 4096).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The bytes in use.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: len <= capacity, and the whole allocation is initialised (alloc_zeroed).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The whole allocation, for filling; call [`AlignedBuf::set_len`] afterwards.
    pub fn spare_mut(&mut self) -> &mut [u8] {
        // SAFETY: the allocation is initialised and exclusively borrowed through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.capacity) }
    }

    /// Marks the first `len` bytes as in use.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity, "buffer length beyond capacity");
        self.len = len;
    }

    /// Start of the allocation, for io_uring submissions.
    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// The first `len` bytes of the allocation, which may run past the bytes in use: an
    /// O_DIRECT write must cover whole blocks. `None` if `len` exceeds the capacity.
    pub(crate) fn padded(&self, len: usize) -> Option<&[u8]> {
        // SAFETY: the whole allocation is initialised (alloc_zeroed) and len <= capacity.
        (len <= self.capacity)
            .then(|| unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), len) })
    }

    /// The buffer's place among its pool's buffers.
    pub(crate) fn slot(&self) -> usize {
        self.slot
    }

    /// Whether mlock succeeded.
    pub fn is_pinned(&self) -> bool {
        self.locked
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.capacity, IO_ALIGN).expect("valid layout");
        // SAFETY: same allocation as in `new`; munlock of an unlocked range is harmless.
        unsafe {
            if self.locked {
                libc::munlock(self.ptr.as_ptr().cast(), self.capacity);
            }
            alloc::dealloc(self.ptr.as_ptr(), layout);
        }
    }
}

#[derive(Debug)]
struct PoolState {
    free: Vec<AlignedBuf>,
    /// Buffers allocated so far (free or lent out).
    created: usize,
}

#[derive(Debug)]
struct PoolInner {
    /// Tells pools apart, so a buffer is used as an io_uring fixed buffer only with the ring
    /// its own pool was registered with.
    id: u64,
    state: Mutex<PoolState>,
    returned: Condvar,
}

static NEXT_POOL_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A bounded set of equally sized [`AlignedBuf`]s shared by the stages of the pipeline.
#[derive(Clone, Debug)]
pub struct BufferPool {
    inner: Arc<PoolInner>,
    buf_size: usize,
    count: usize,
}

impl BufferPool {
    /// A pool of at most `count` buffers of at least `buf_size` bytes. Buffers are allocated
    /// and pinned when first needed and then reused, so an idle tier costs no memory.
    pub fn new(buf_size: usize, count: usize) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                id: NEXT_POOL_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                state: Mutex::new(PoolState {
                    free: Vec::new(),
                    created: 0,
                }),
                returned: Condvar::new(),
            }),
            buf_size,
            count: count.max(1),
        }
    }

    /// Size each buffer was asked to hold.
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    /// Number of buffers in the pool.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Takes a buffer, waiting until one is returned if all `count` are in use.
    pub fn take(&self) -> PooledBuf {
        let mut state = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(mut buf) = state.free.pop() {
                buf.set_len(0);
                return self.lend(buf);
            }
            if state.created < self.count {
                let slot = state.created;
                state.created += 1;
                drop(state);
                let buf = AlignedBuf::new(self.buf_size, slot);
                if !buf.is_pinned() {
                    tracing::warn!(
                        size = self.buf_size,
                        "mlock failed; a data-plane buffer is not pinned"
                    );
                }
                return self.lend(buf);
            }
            state = self
                .inner
                .returned
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    fn lend(&self, buf: AlignedBuf) -> PooledBuf {
        PooledBuf {
            buf: Some(buf),
            pool: Arc::clone(&self.inner),
        }
    }

    /// Buffers that could be taken without waiting (for tests and metrics).
    pub fn available(&self) -> usize {
        self.inner
            .state
            .lock()
            .map_or(0, |s| s.free.len() + (self.count - s.created))
    }

    /// Buffers allocated so far.
    pub fn allocated(&self) -> usize {
        self.inner.state.lock().map_or(0, |s| s.created)
    }

    /// Pinned bytes the pool holds once every buffer is allocated.
    pub fn capacity_bytes(&self) -> u64 {
        Self::capacity_of(self.buf_size, self.count)
    }

    /// Pinned bytes of a pool of `count` buffers of `buf_size` bytes once all exist (each
    /// rounded up to whole I/O blocks).
    pub fn capacity_of(buf_size: usize, count: usize) -> u64 {
        let per_buf = buf_size.div_ceil(IO_ALIGN).max(1) * IO_ALIGN;
        u64::try_from(per_buf.saturating_mul(count)).unwrap_or(u64::MAX)
    }

    /// This pool's identity (see [`PooledBuf::pool_id`]).
    pub(crate) fn id(&self) -> u64 {
        self.inner.id
    }
}

/// A buffer on loan from a [`BufferPool`]; dropping it gives it back.
#[derive(Debug)]
pub struct PooledBuf {
    buf: Option<AlignedBuf>,
    pool: Arc<PoolInner>,
}

impl PooledBuf {
    /// Turns the buffer into `Bytes` without copying; it returns to the pool when the last
    /// clone of those `Bytes` is dropped (e.g. after the HTTP client sent it).
    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
    }

    /// Identity of the pool the buffer belongs to.
    pub(crate) fn pool_id(&self) -> u64 {
        self.pool.id
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], AlignedBuf::as_slice)
    }
}

impl std::ops::Deref for PooledBuf {
    type Target = AlignedBuf;
    fn deref(&self) -> &AlignedBuf {
        self.buf.as_ref().expect("buffer present until drop")
    }
}

impl std::ops::DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut AlignedBuf {
        self.buf.as_mut().expect("buffer present until drop")
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            let mut state = self.pool.state.lock().unwrap_or_else(|e| e.into_inner());
            state.free.push(buf);
            self.pool.returned.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_reused_and_returned_through_bytes() {
        let pool = BufferPool::new(10_000, 2);
        assert_eq!(pool.allocated(), 0);
        let mut a = pool.take();
        assert_eq!(pool.allocated(), 1);
        assert_eq!(a.capacity(), 12_288);
        assert_eq!(a.as_ptr() as usize % IO_ALIGN, 0);
        a.spare_mut()[..3].copy_from_slice(b"abc");
        a.set_len(3);
        let first_ptr = a.as_ptr();
        let bytes = a.into_bytes();
        let clone = bytes.clone();
        assert_eq!(&clone[..], b"abc");
        assert_eq!(pool.available(), 1);
        drop(bytes);
        assert_eq!(pool.available(), 1);
        drop(clone);
        assert_eq!(pool.available(), 2);
        let b = pool.take();
        let c = pool.take();
        assert!(b.as_ptr() == first_ptr || c.as_ptr() == first_ptr);
        assert!(b.as_slice().is_empty());
        assert_eq!(pool.allocated(), 2, "no allocation beyond the bound");
    }

    #[test]
    fn take_waits_for_a_returned_buffer() {
        let pool = BufferPool::new(4096, 1);
        let held = pool.take();
        let p2 = pool.clone();
        let waiter = std::thread::spawn(move || p2.take().capacity());
        drop(held);
        assert_eq!(waiter.join().unwrap(), 4096);
    }
}
