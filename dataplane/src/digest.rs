//! The one hashing pass over a checkpoint's images.
//!
//! Right after the dump, every chunk of the RAM copy is hashed once (zero chunks are only
//! scanned). The result is both the integrity record of the RAM copy (checked chunk by chunk
//! before CRIU restores from it) and the content addresses the drain into the slower tiers
//! uses, so the drain does not hash the bytes a second time.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::chunk::address_of;
use crate::chunk::{is_zero, ChunkConfig, ChunkHash};
use crate::crypt::SealKey;
use crate::image_files::open_sources;
use crate::{TierError, TierKind};

/// Chunk hashes of one image file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileDigest {
    /// File name inside the image directory.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Hash of each chunk, [`ChunkHash::ZERO`] for an all-zero chunk.
    pub chunks: Vec<ChunkHash>,
}

/// Chunk hashes of a whole image set, files sorted by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageDigest {
    /// Chunk size the hashes were taken with.
    pub chunk_size: usize,
    /// Every regular file of the set.
    pub files: Vec<FileDigest>,
}

/// A chunk of an image set on disk does not match its digest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestMismatch {
    /// A file is missing, extra or has another size.
    #[error("image file {file}: {detail}")]
    File {
        /// File name.
        file: String,
        /// What differs.
        detail: String,
    },
    /// A chunk's content differs.
    #[error(
        "image file {file} chunk {index} (bytes {offset}..): content differs from the checkpoint"
    )]
    Chunk {
        /// File name.
        file: String,
        /// Chunk index in the file.
        index: usize,
        /// Byte offset of the chunk.
        offset: u64,
    },
    /// The set could not be read.
    #[error("{0}")]
    Read(String),
}

/// Hashes every chunk of the image set in `dir` with `config.worker_count()` threads.
pub fn digest_image_set(dir: &Path, config: &ChunkConfig) -> Result<ImageDigest, TierError> {
    digest_image_set_keyed(dir, config, None)
}

/// [`digest_image_set`] with the chunk addresses of a checkpoint sealed with `key`.
pub(crate) fn digest_image_set_keyed(
    dir: &Path,
    config: &ChunkConfig,
    key: Option<&SealKey>,
) -> Result<ImageDigest, TierError> {
    config.validate().map_err(|detail| TierError::Config {
        tier: TierKind::Ram,
        detail,
    })?;
    let sources = open_sources(TierKind::Ram, dir)?;
    let chunk = config.chunk_size;
    let mut jobs = Vec::new();
    for (file, src) in sources.iter().enumerate() {
        if let Some(map) = &src.map {
            jobs.extend(map.chunks(chunk).enumerate().map(|(i, d)| (file, i, d)));
        }
    }
    let hashes = Mutex::new(vec![ChunkHash::ZERO; jobs.len()]);
    for_each_parallel(jobs.len(), config.worker_count(), |j| {
        let (_, _, data) = jobs[j];
        if !is_zero(data) {
            let h = address_of(key, data);
            hashes.lock().unwrap_or_else(|e| e.into_inner())[j] = h;
        }
        Ok(())
    })
    .map_err(|e: std::convert::Infallible| match e {})?;
    let hashes = hashes.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut files: Vec<FileDigest> = sources
        .iter()
        .map(|s| FileDigest {
            name: s.name.clone(),
            size: s.size,
            chunks: Vec::new(),
        })
        .collect();
    for ((file, _, _), h) in jobs.iter().zip(hashes) {
        files[*file].chunks.push(h);
    }
    Ok(ImageDigest {
        chunk_size: chunk,
        files,
    })
}

/// Checks the image set in `dir` against `digest` chunk by chunk, with `workers` threads.
pub fn verify_image_set(
    dir: &Path,
    digest: &ImageDigest,
    workers: usize,
) -> Result<(), DigestMismatch> {
    let sources =
        open_sources(TierKind::Ram, dir).map_err(|e| DigestMismatch::Read(e.to_string()))?;
    for want in &digest.files {
        let Some(src) = sources.iter().find(|s| s.name == want.name) else {
            return Err(DigestMismatch::File {
                file: want.name.clone(),
                detail: "missing".into(),
            });
        };
        if src.size != want.size {
            return Err(DigestMismatch::File {
                file: want.name.clone(),
                detail: format!("{} bytes, expected {}", src.size, want.size),
            });
        }
    }
    let chunk = digest.chunk_size;
    let mut jobs = Vec::new();
    for want in &digest.files {
        let src = sources
            .iter()
            .find(|s| s.name == want.name)
            .expect("checked");
        let Some(map) = &src.map else { continue };
        if map.len().div_ceil(chunk) != want.chunks.len() {
            return Err(DigestMismatch::File {
                file: want.name.clone(),
                detail: "the digest lists another number of chunks".into(),
            });
        }
        jobs.extend(
            map.chunks(chunk)
                .zip(&want.chunks)
                .enumerate()
                .map(|(i, (d, h))| (want.name.as_str(), i, d, h)),
        );
    }
    for_each_parallel(jobs.len(), workers, |j| {
        let (file, index, data, want) = jobs[j];
        let good = if *want == ChunkHash::ZERO {
            is_zero(data)
        } else {
            ChunkHash::of(data) == *want
        };
        if good {
            Ok(())
        } else {
            Err(DigestMismatch::Chunk {
                file: file.to_owned(),
                index,
                offset: u64::try_from(index * chunk).expect("fits"),
            })
        }
    })
}

/// Runs `f(0..n)` on `workers` threads; stops at and returns the first error.
fn for_each_parallel<E: Send>(
    n: usize,
    workers: usize,
    f: impl Fn(usize) -> Result<(), E> + Sync,
) -> Result<(), E> {
    let next = AtomicUsize::new(0);
    let failed = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..workers.clamp(1, n.max(1)) {
            s.spawn(|| loop {
                let j = next.fetch_add(1, Ordering::Relaxed);
                if j >= n {
                    return;
                }
                if let Err(e) = f(j) {
                    next.store(n, Ordering::Relaxed);
                    failed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(e);
                    return;
                }
            });
        }
    });
    match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_verifies_and_names_the_changed_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let mut pages = vec![0u8; 5 * 4096 + 10];
        pages[4096 * 2 + 5] = 7;
        pages[5 * 4096 + 3] = 1;
        std::fs::write(dir.path().join("pages-1.img"), &pages).unwrap();
        std::fs::write(dir.path().join("core-1.img"), b"core").unwrap();
        std::fs::write(dir.path().join("empty.img"), b"").unwrap();
        let config = ChunkConfig {
            chunk_size: 8192,
            workers: 2,
            ..ChunkConfig::default()
        };
        let digest = digest_image_set(dir.path(), &config).unwrap();
        let names: Vec<_> = digest.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["core-1.img", "empty.img", "pages-1.img"]);
        let pages_digest = &digest.files[2].chunks;
        assert_eq!(pages_digest.len(), 3);
        assert_eq!(pages_digest[0], ChunkHash::ZERO);
        assert_eq!(pages_digest[1], ChunkHash::of(&pages[8192..16384]));
        verify_image_set(dir.path(), &digest, 2).unwrap();

        pages[8192 * 2 + 1] = 9;
        std::fs::write(dir.path().join("pages-1.img"), &pages).unwrap();
        assert_eq!(
            verify_image_set(dir.path(), &digest, 2)
                .unwrap_err()
                .to_string(),
            "image file pages-1.img chunk 2 (bytes 16384..): content differs from the checkpoint"
        );
        pages[1] = 1;
        pages[8192 * 2 + 1] = 0;
        std::fs::write(dir.path().join("pages-1.img"), &pages).unwrap();
        assert!(matches!(
            verify_image_set(dir.path(), &digest, 2).unwrap_err(),
            DigestMismatch::Chunk { index: 0, .. }
        ));
        std::fs::remove_file(dir.path().join("core-1.img")).unwrap();
        assert_eq!(
            verify_image_set(dir.path(), &digest, 2)
                .unwrap_err()
                .to_string(),
            "image file core-1.img: missing"
        );
    }
}
