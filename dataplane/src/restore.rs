//! The restore direction: a manifest plus a tier's chunks → an image set in a (tmpfs) dir.
//!
//! Each destination file is created at full size and memory-mapped; workers fetch chunks in
//! parallel, decompress them straight into their place in the mapping and verify the hash
//! there. Zero chunks cost nothing (a fresh file reads as zeros). A chunk that fails is an
//! error naming the checkpoint, file and chunk, and the partial files are removed, so the
//! caller can fall back to another tier with the same empty directory.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};

use memmap2::MmapMut;

use crate::buffer::{AlignedBuf, BufferPool};
use crate::chunk::open_stored;
use crate::chunk::{decode_into, verify, ChunkEncoding};
use crate::crypt::{SealKey, SEAL_OVERHEAD};
use crate::manifest::{CheckpointManifest, ChunkRef};
use crate::pipeline::RunOn;
use crate::{LoadReport, TierError, TierKind};

/// Reads one chunk's stored bytes from a tier; called from many threads at once.
pub(crate) trait ChunkFetch: Sync {
    /// Fills `buf` with exactly `chunk.stored_len` stored bytes of the chunk.
    /// `file` and `index` are for error messages.
    fn fetch(
        &self,
        manifest: &CheckpointManifest,
        file: &str,
        index: usize,
        chunk: &ChunkRef,
        buf: &mut AlignedBuf,
    ) -> Result<(), TierError>;

    /// Reads a raw chunk's stored bytes straight into `dest`, its place in the restored file,
    /// saving a copy; returns `false` when this tier cannot, and [`ChunkFetch::fetch`] is used.
    fn fetch_raw_into(
        &self,
        _manifest: &CheckpointManifest,
        _file: &str,
        _index: usize,
        _chunk: &ChunkRef,
        _dest: &mut [u8],
    ) -> Result<bool, TierError> {
        Ok(false)
    }

    /// Reads a sealed raw chunk's ciphertext straight into `dest` and its tag and nonce into
    /// `trailer`, so it is opened in place; returns `false` when this tier cannot.
    fn fetch_sealed_raw_into(
        &self,
        _manifest: &CheckpointManifest,
        _file: &str,
        _index: usize,
        _chunk: &ChunkRef,
        _dest: &mut [u8],
        _trailer: &mut [u8; SEAL_OVERHEAD],
    ) -> Result<bool, TierError> {
        Ok(false)
    }
}

struct Job<'a> {
    file: &'a str,
    index: usize,
    chunk: &'a ChunkRef,
    dest: &'a mut [u8],
}

/// Writes the image set described by `manifest` into `dest` using `fetch`, with `workers`
/// threads whose decoding and verifying waits for `run_on`'s gate; on error or cancellation
/// nothing it created is left in `dest`. A sealed manifest's chunks are opened with `key`,
/// which the caller looked up by the manifest's key id.
#[allow(clippy::too_many_arguments)]
pub(crate) fn restore_image_set_on(
    tier: TierKind,
    manifest: &CheckpointManifest,
    key: Option<&SealKey>,
    dest: &Path,
    fetch: &dyn ChunkFetch,
    pool: &BufferPool,
    workers: usize,
    run_on: RunOn<'_>,
) -> Result<LoadReport, TierError> {
    let _running = run_on.gate.session(run_on.class);
    let mut created: Vec<PathBuf> = Vec::new();
    let result = restore_inner(
        tier,
        manifest,
        key,
        dest,
        fetch,
        pool,
        workers,
        run_on,
        &mut created,
    );
    if result.is_err() {
        for path in &created {
            let _ = fs::remove_file(path);
        }
    }
    result
}

/// [`restore_image_set_on`] outside the data plane's gate, never cancelled: for tiers that
/// run no service of their own yet (S3).
pub(crate) fn restore_image_set(
    tier: TierKind,
    manifest: &CheckpointManifest,
    key: Option<&SealKey>,
    dest: &Path,
    fetch: &dyn ChunkFetch,
    pool: &BufferPool,
    workers: usize,
) -> Result<LoadReport, TierError> {
    let (gate, cancel) = (
        crate::PriorityGate::new(usize::MAX),
        crate::CancelToken::new(),
    );
    let run_on = RunOn {
        gate: &gate,
        class: crate::WorkClass::Foreground,
        cancel: &cancel,
    };
    restore_image_set_on(tier, manifest, key, dest, fetch, pool, workers, run_on)
}

#[allow(clippy::too_many_arguments)]
fn restore_inner(
    tier: TierKind,
    manifest: &CheckpointManifest,
    key: Option<&SealKey>,
    dest: &Path,
    fetch: &dyn ChunkFetch,
    pool: &BufferPool,
    workers: usize,
    run_on: RunOn<'_>,
    created: &mut Vec<PathBuf>,
) -> Result<LoadReport, TierError> {
    let io = |op, path: &Path, source| TierError::Io {
        tier,
        op,
        path: path.to_owned(),
        source,
    };
    let mut maps: Vec<Option<MmapMut>> = Vec::with_capacity(manifest.files.len());
    for f in &manifest.files {
        let path = dest.join(&f.name);
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io("create", &path, e))?;
        created.push(path.clone());
        file.set_len(f.size).map_err(|e| io("size", &path, e))?;
        // Owner bits only: manifests written before the agent's umask 077 recorded 0644.
        file.set_permissions(fs::Permissions::from_mode(f.mode & 0o700))
            .map_err(|e| io("chmod", &path, e))?;
        maps.push(if f.size == 0 {
            None
        } else {
            // SAFETY: the file was just created by us (create_new) in the restore directory and
            // nobody else writes it until the restore returns.
            Some(unsafe { MmapMut::map_mut(&file) }.map_err(|e| io("mmap", &path, e))?)
        });
    }

    let chunk_size = usize::try_from(manifest.chunk_size).expect("u32 fits usize");
    let first_error: Mutex<Option<TierError>> = Mutex::new(None);
    std::thread::scope(|s| {
        let (tx, rx) = sync_channel::<Job<'_>>(workers * 2);
        // Each worker owns a handle; when all have stopped on errors, sends fail.
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..workers.max(1) {
            let rx = Arc::clone(&rx);
            let first_error = &first_error;
            s.spawn(move || {
                let mut decompressor = match zstd::bulk::Decompressor::new() {
                    Ok(d) => d,
                    Err(e) => {
                        record(first_error, io("start decompressor", Path::new(""), e));
                        return;
                    }
                };
                loop {
                    let job = match rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    };
                    populate_for_write(job.dest);
                    let corrupt = |e: crate::chunk::ChunkDecodeError| TierError::Corrupt {
                        tier,
                        name: manifest.name.clone(),
                        detail: format!(
                            "file {} chunk {} ({}): {e}",
                            job.file, job.index, job.chunk.hash
                        ),
                    };
                    let direct = job.chunk.encoding == ChunkEncoding::Raw;
                    let mut trailer = [0u8; SEAL_OVERHEAD];
                    let (file, index, chunk) = (job.file, job.index, job.chunk);
                    let result = match direct
                        .then(|| match key {
                            None => fetch.fetch_raw_into(manifest, file, index, chunk, job.dest),
                            Some(_) => fetch.fetch_sealed_raw_into(
                                manifest,
                                file,
                                index,
                                chunk,
                                job.dest,
                                &mut trailer,
                            ),
                        })
                        .transpose()
                    {
                        Ok(Some(true)) => {
                            let _permit = run_on.gate.acquire(run_on.class);
                            let opened = match key {
                                Some(key) => key
                                    .open_detached(
                                        &chunk.hash.0,
                                        chunk.encoding.to_byte(),
                                        chunk.raw_len,
                                        job.dest,
                                        &trailer,
                                    )
                                    .map_err(|e| corrupt(crate::chunk::ChunkDecodeError::Seal(e))),
                                None => Ok(()),
                            };
                            opened.and_then(|()| {
                                verify(job.dest, &job.chunk.hash, key).map_err(corrupt)
                            })
                        }
                        Ok(_) => {
                            let mut buf = pool.take();
                            fetch
                                .fetch(manifest, job.file, job.index, job.chunk, &mut buf)
                                .and_then(|()| {
                                    let _permit = run_on.gate.acquire(run_on.class);
                                    let len = buf.as_slice().len();
                                    let stored = &mut buf.spare_mut()[..len];
                                    let encoded = open_stored(
                                        key,
                                        &job.chunk.hash,
                                        job.chunk.encoding,
                                        job.chunk.raw_len,
                                        stored,
                                    )
                                    .map_err(corrupt)?;
                                    decode_into(
                                        job.chunk.encoding,
                                        encoded,
                                        &job.chunk.hash,
                                        key,
                                        &mut decompressor,
                                        job.dest,
                                    )
                                    .map_err(corrupt)
                                })
                        }
                        Err(e) => Err(e),
                    };
                    if let Err(e) = result {
                        record(first_error, e);
                        return;
                    }
                }
            });
        }
        drop(rx);
        'files: for (f, map) in manifest.files.iter().zip(maps.iter_mut()) {
            let Some(map) = map else { continue };
            for (index, (chunk, dest)) in
                f.chunks.iter().zip(map.chunks_mut(chunk_size)).enumerate()
            {
                if chunk.encoding == ChunkEncoding::Zero {
                    continue;
                }
                if run_on.cancel.is_cancelled() {
                    record(
                        &first_error,
                        TierError::Cancelled {
                            tier,
                            detail: format!("load of checkpoint {}", manifest.name),
                        },
                    );
                }
                let stop = first_error.lock().map_or(true, |e| e.is_some());
                let job = Job {
                    file: &f.name,
                    index,
                    chunk,
                    dest,
                };
                if stop || tx.send(job).is_err() {
                    break 'files;
                }
            }
        }
        drop(tx);
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    for (f, map) in manifest.files.iter().zip(&maps) {
        if let Some(map) = map {
            map.flush()
                .map_err(|e| io("flush", &dest.join(&f.name), e))?;
        }
    }
    Ok(LoadReport {
        bytes: manifest.raw_bytes(),
    })
}

/// Backs a chunk's range of the destination mapping with pages in one call, instead of one
/// page fault per 4 KiB while decompressing into it. Best effort: without it (kernels before
/// 5.14) the pages fault in as usual.
fn populate_for_write(dest: &mut [u8]) {
    // SAFETY: `dest` is a live, exclusively borrowed range of a shared file mapping that
    // starts on a page boundary (chunk offsets are multiples of the 4 KiB-aligned chunk
    // size); MADV_POPULATE_WRITE only faults pages in and does not change their contents.
    let _ = unsafe {
        libc::madvise(
            dest.as_mut_ptr().cast(),
            dest.len(),
            libc::MADV_POPULATE_WRITE,
        )
    };
}

fn record(slot: &Mutex<Option<TierError>>, e: TierError) {
    let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
    if slot.is_none() {
        *slot = Some(e);
    }
}
