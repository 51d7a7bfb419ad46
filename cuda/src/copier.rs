//! The copy engine of custom storage: for one GPU mapping, one stream and two pinned
//! buffers registered with the driver. While the driver fills one buffer, the other
//! is hashed and handed to the store (checkpoint), or read from the store and checked
//! (restore), so the copy engine and the storage work at the same time.

use crate::driver::DriverCallError;
use crate::driver::{CudaDriver, MappedGpu};
use crate::vram::{VramImage, VramKey, VramStore};
use std::io;

/// Why copying one GPU's memory failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyFailure {
    /// A driver call (register, copy, synchronise) failed.
    #[error("{call} failed: {source}")]
    Driver {
        /// The call.
        call: &'static str,
        /// Its code.
        source: DriverCallError,
    },
    /// The store could not take or give a chunk.
    #[error("VRAM store failed at offset {offset}: {source}")]
    Store {
        /// Offset of the chunk in the GPU memory.
        offset: u64,
        /// The I/O error.
        source: io::Error,
    },
    /// A chunk read back from the store does not match its recorded hash.
    #[error("chunk at offset {offset} does not match its recorded hash")]
    Corrupt {
        /// Offset of the chunk.
        offset: u64,
    },
    /// The mapping does not match the recorded image.
    #[error("the driver mapped {mapped} bytes but the image holds {recorded}")]
    SizeMismatch {
        /// Bytes the driver mapped.
        mapped: u64,
        /// Bytes recorded.
        recorded: u64,
    },
}

/// A host buffer page-locked with the driver for as long as it lives. When the driver
/// cannot pin it (`cuMemHostRegister` fails: locked-memory limits, a driver without
/// host registration), the copies still run from pageable memory, only slower, so a
/// checkpoint never fails for want of pinning.
struct PinnedBuffer<'d> {
    buf: Vec<u8>,
    pinned: bool,
    driver: &'d dyn CudaDriver,
}

impl<'d> PinnedBuffer<'d> {
    fn new(driver: &'d dyn CudaDriver, len: usize) -> Self {
        let mut buf = vec![0u8; len];
        // SAFETY: the buffer is unregistered in Drop, before it is freed.
        let pinned = match unsafe { driver.register_host(&mut buf) } {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, bytes = len, "cuMemHostRegister failed; copying from pageable memory");
                false
            }
        };
        PinnedBuffer {
            buf,
            pinned,
            driver,
        }
    }
}

impl Drop for PinnedBuffer<'_> {
    fn drop(&mut self) {
        if !self.pinned {
            return;
        }
        if let Err(e) = self.driver.unregister_host(self.buf.as_mut_ptr()) {
            tracing::warn!(error = %e, "cuMemHostUnregister failed");
        }
    }
}

fn driver_err(call: &'static str) -> impl FnOnce(DriverCallError) -> CopyFailure {
    move |source| CopyFailure::Driver { call, source }
}

fn chunk_count(size: u64, chunk: u64) -> usize {
    usize::try_from(size.div_ceil(chunk)).unwrap_or(usize::MAX)
}

fn span(size: u64, chunk: u64, index: usize) -> (u64, usize) {
    let offset = chunk.saturating_mul(index as u64);
    let len = size.saturating_sub(offset).min(chunk);
    (offset, usize::try_from(len).unwrap_or(0))
}

/// Copies `gpu`'s mapped memory into `store` under `key`, double-buffered with chunks
/// of `chunk` bytes; zero chunks are skipped, the others hashed.
pub(crate) fn copy_out(
    driver: &dyn CudaDriver,
    gpu: &MappedGpu,
    key: VramKey,
    store: &dyn VramStore,
    chunk: u64,
) -> Result<VramImage, CopyFailure> {
    let chunk = chunk.max(4096);
    let n = chunk_count(gpu.size, chunk);
    let mut image = VramImage {
        key,
        size: gpu.size,
        chunk_size: chunk,
        chunks: Vec::with_capacity(n),
    };
    if n == 0 {
        return Ok(image);
    }
    let len = usize::try_from(chunk.min(gpu.size)).unwrap_or(usize::MAX);
    let mut buffers = [
        PinnedBuffer::new(driver, len),
        PinnedBuffer::new(driver, len),
    ];
    let enqueue = |buffers: &mut [PinnedBuffer<'_>; 2], i: usize| {
        let (offset, len) = span(gpu.size, chunk, i);
        let dst = &mut buffers[i % 2].buf[..len];
        // SAFETY: the buffer lives in `buffers` until the end of this function, and
        // every path out of it synchronises the stream first.
        unsafe { driver.copy_from_gpu(dst, gpu.ptr + offset, gpu.stream) }
            .map_err(driver_err("cuMemcpyDtoHAsync"))
    };
    let result = (|| {
        enqueue(&mut buffers, 0)?;
        for i in 0..n {
            driver
                .synchronize(gpu.stream)
                .map_err(driver_err("cuStreamSynchronize"))?;
            if i + 1 < n {
                enqueue(&mut buffers, i + 1)?;
            }
            let (offset, len) = span(gpu.size, chunk, i);
            let bytes = &buffers[i % 2].buf[..len];
            if bytes.iter().all(|&b| b == 0) {
                image.chunks.push(None);
                continue;
            }
            image
                .chunks
                .push(Some(blake3::hash(bytes).to_hex().to_string()));
            store
                .put(&key, offset, bytes)
                .map_err(|source| CopyFailure::Store { offset, source })?;
        }
        Ok(())
    })();
    if result.is_err() {
        // Nothing may still be copying into the buffers when they are freed.
        let _ = driver.synchronize(gpu.stream);
    }
    result.map(|()| image)
}

/// Copies `image` from `store` into `gpu`'s mapped memory, double-buffered; each
/// chunk is checked against its recorded hash before it is copied.
pub(crate) fn copy_in(
    driver: &dyn CudaDriver,
    gpu: &MappedGpu,
    image: &VramImage,
    store: &dyn VramStore,
) -> Result<(), CopyFailure> {
    if gpu.size != image.size {
        return Err(CopyFailure::SizeMismatch {
            mapped: gpu.size,
            recorded: image.size,
        });
    }
    let chunk = image.chunk_size.max(1);
    let n = chunk_count(image.size, chunk);
    if n == 0 {
        return Ok(());
    }
    if image.chunks.len() != n {
        return Err(CopyFailure::SizeMismatch {
            mapped: gpu.size,
            recorded: image.chunk_size.saturating_mul(image.chunks.len() as u64),
        });
    }
    let len = usize::try_from(chunk.min(image.size)).unwrap_or(usize::MAX);
    let mut buffers = [
        PinnedBuffer::new(driver, len),
        PinnedBuffer::new(driver, len),
    ];
    let result = (|| {
        for i in 0..n {
            let (offset, len) = span(image.size, chunk, i);
            let buf = &mut buffers[i % 2].buf[..len];
            match &image.chunks[i] {
                None => buf.fill(0),
                Some(hash) => {
                    store
                        .get(&image.key, offset, buf)
                        .map_err(|source| CopyFailure::Store { offset, source })?;
                    if blake3::hash(buf).to_hex().as_str() != hash {
                        return Err(CopyFailure::Corrupt { offset });
                    }
                }
            }
            // The other buffer's copy (chunk i - 1) must land before this one is
            // queued behind it, so that at most one buffer is ever in flight.
            driver
                .synchronize(gpu.stream)
                .map_err(driver_err("cuStreamSynchronize"))?;
            let src = &buffers[i % 2].buf[..len];
            // SAFETY: the buffer lives until the end of this function, and every path
            // out of it synchronises the stream first.
            unsafe { driver.copy_to_gpu(gpu.ptr + offset, src, gpu.stream) }
                .map_err(driver_err("cuMemcpyHtoDAsync"))?;
        }
        driver
            .synchronize(gpu.stream)
            .map_err(driver_err("cuStreamSynchronize"))
    })();
    if result.is_err() {
        let _ = driver.synchronize(gpu.stream);
    }
    result
}
