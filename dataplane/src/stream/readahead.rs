//! Ordered read-ahead for a streamed restore: a few workers fetch, decompress and verify the
//! chunks of one image ahead of CRIU, and the image's writer hands them to CRIU's pipe in file
//! order. A chunk reaches the pipe only after its hash checked out; the first bad chunk ends
//! the image there, so CRIU never sees a byte of it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Condvar, Mutex};

use crate::chunk::{decode_into, verify, ChunkEncoding};
use crate::manifest::{CheckpointManifest, FileEntry};
use crate::restore::ChunkFetch;
use crate::{NvmeTier, TierError, TierKind, WorkClass};

const TIER: TierKind = TierKind::Nvme;

/// A decoded chunk's raw bytes; `None` for a zero chunk.
type Decoded = Result<Option<Vec<u8>>, TierError>;

/// How far the workers may run ahead of the writer.
struct Window {
    state: Mutex<WindowState>,
    moved: Condvar,
    size: usize,
}

struct WindowState {
    written: usize,
    stop: bool,
}

impl Window {
    /// Waits until chunk `index` is inside the window; `false` once the image is stopped.
    fn admit(&self, index: usize) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while !state.stop && index >= state.written + self.size {
            state = self.moved.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        !state.stop
    }

    fn advance(&self, written: usize) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).written = written;
        self.moved.notify_all();
    }

    fn stop(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        self.moved.notify_all();
    }
}

/// Writes image `entry` of `manifest` into `pipe` with `workers` read-ahead workers. Returns
/// the bytes written; CRIU closing its end early (it needed no more) is not an error.
pub(crate) fn feed_image(
    tier: &NvmeTier,
    manifest: &CheckpointManifest,
    entry: &FileEntry,
    pipe: &mut File,
    workers: usize,
) -> Result<u64, TierError> {
    let count = entry.chunks.len();
    let chunk_size = usize::try_from(manifest.chunk_size).expect("u32 fits usize");
    let workers = workers.clamp(1, count.max(1));
    let window = Window {
        state: Mutex::new(WindowState {
            written: 0,
            stop: false,
        }),
        moved: Condvar::new(),
        size: workers * 2,
    };
    let next = AtomicUsize::new(0);
    let spare: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        let (tx, rx) = sync_channel::<(usize, Decoded)>(window.size);
        for _ in 0..workers {
            let tx = tx.clone();
            let (window, next, spare) = (&window, &next, &spare);
            s.spawn(move || {
                let mut decompressor = match zstd::bulk::Decompressor::new() {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = tx.send((
                            next.load(Ordering::SeqCst),
                            Err(TierError::Io {
                                tier: TIER,
                                op: "start decompressor for",
                                path: PathBuf::from(&entry.name),
                                source: e,
                            }),
                        ));
                        return;
                    }
                };
                let mut stored = tier.pool().take();
                loop {
                    let index = next.fetch_add(1, Ordering::SeqCst);
                    if index >= count || !window.admit(index) {
                        return;
                    }
                    let buf = spare.lock().unwrap_or_else(|e| e.into_inner()).pop();
                    let decoded = decode(
                        tier,
                        manifest,
                        entry,
                        index,
                        chunk_size,
                        buf,
                        &mut stored,
                        &mut decompressor,
                    );
                    if tx.send((index, decoded)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let written = write_in_order(entry, &rx, pipe, &window, &spare, chunk_size);
        window.stop();
        drop(rx);
        written
    })
}

fn write_in_order(
    entry: &FileEntry,
    rx: &Receiver<(usize, Decoded)>,
    pipe: &mut File,
    window: &Window,
    spare: &Mutex<Vec<Vec<u8>>>,
    chunk_size: usize,
) -> Result<u64, TierError> {
    let zeros = vec![0u8; chunk_size];
    let mut pending: BTreeMap<usize, Decoded> = BTreeMap::new();
    let mut total = 0u64;
    for (expected, chunk) in entry.chunks.iter().enumerate() {
        let decoded = loop {
            if let Some(decoded) = pending.remove(&expected) {
                break decoded;
            }
            let Ok((index, decoded)) = rx.recv() else {
                return Err(TierError::Io {
                    tier: TIER,
                    op: "read ahead",
                    path: PathBuf::from(&entry.name),
                    source: io::Error::other("the read-ahead workers stopped"),
                });
            };
            pending.insert(index, decoded);
        };
        let bytes = decoded?;
        let len = usize::try_from(chunk.raw_len).expect("u32 fits usize");
        let data = bytes.as_deref().unwrap_or(&zeros[..len]);
        match pipe.write_all(data) {
            Ok(()) => total += u64::from(chunk.raw_len),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(total),
            Err(e) => {
                return Err(TierError::Io {
                    tier: TIER,
                    op: "write the stream of image",
                    path: PathBuf::from(&entry.name),
                    source: e,
                })
            }
        }
        if let Some(buf) = bytes {
            spare.lock().unwrap_or_else(|e| e.into_inner()).push(buf);
        }
        window.advance(expected + 1);
    }
    Ok(total)
}

/// Fetches, decodes and verifies chunk `index` of `entry` into `buf` (reused when given).
#[allow(clippy::too_many_arguments)]
fn decode(
    tier: &NvmeTier,
    manifest: &CheckpointManifest,
    entry: &FileEntry,
    index: usize,
    chunk_size: usize,
    buf: Option<Vec<u8>>,
    stored: &mut crate::buffer::PooledBuf,
    decompressor: &mut zstd::bulk::Decompressor<'_>,
) -> Decoded {
    let chunk = &entry.chunks[index];
    let corrupt = |detail: String| TierError::Corrupt {
        tier: TIER,
        name: manifest.name.clone(),
        detail: format!(
            "file {} chunk {index} ({}): {detail}",
            entry.name, chunk.hash
        ),
    };
    let len = usize::try_from(chunk.raw_len).expect("u32 fits usize");
    if len > chunk_size {
        return Err(corrupt(format!(
            "raw length {len} exceeds the chunk size {chunk_size}"
        )));
    }
    if chunk.encoding == ChunkEncoding::Zero {
        return Ok(None);
    }
    let mut out = buf.unwrap_or_default();
    out.resize(len, 0);
    let key = tier.opening_key(manifest)?.map(|k| &**k);
    // A sealed chunk is opened in a buffer: its tag and nonce do not fit the destination.
    let direct = chunk.encoding == ChunkEncoding::Raw
        && key.is_none()
        && tier.fetch_raw_into(manifest, &entry.name, index, chunk, &mut out)?;
    // Reading is I/O; verifying and decompressing is the CPU work the data plane's gate
    // bounds. A streamed restore is what a caller waits for: foreground.
    let gate = tier.plane().gate();
    if direct {
        let _permit = gate.acquire(WorkClass::Foreground);
        verify(&out, &chunk.hash, key).map_err(|e| corrupt(e.to_string()))?;
    } else {
        tier.fetch(manifest, &entry.name, index, chunk, stored)?;
        let _permit = gate.acquire(WorkClass::Foreground);
        let len = stored.as_slice().len();
        let encoded = crate::chunk::open_stored(
            key,
            &chunk.hash,
            chunk.encoding,
            chunk.raw_len,
            &mut stored.spare_mut()[..len],
        )
        .map_err(|e| corrupt(e.to_string()))?;
        decode_into(
            chunk.encoding,
            encoded,
            &chunk.hash,
            key,
            decompressor,
            &mut out,
        )
        .map_err(|e| corrupt(e.to_string()))?;
    }
    Ok(Some(out))
}
