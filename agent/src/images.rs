//! Chunk digests of a checkpoint's image files, taken once after the dump and checked before
//! a restore from RAM, so a deleted or altered image is caught before CRIU runs instead of
//! restoring wrong state. The same hashes are the chunks' addresses when the images drain into
//! the NVMe and S3 tiers, so every byte is hashed once per checkpoint.

use std::path::{Path, PathBuf};

use kybernate_dataplane::{
    digest_image_set, verify_image_set, ChunkConfig, ChunkHash, DigestMismatch, FileDigest,
    ImageDigest,
};
use serde::{Deserialize, Serialize};

/// One image file of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFile {
    /// File name inside the image directory.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Chunk size the hashes were taken with.
    #[serde(default)]
    pub chunk_size: usize,
    /// BLAKE3 of each chunk, hex; all zeros for an all-zero chunk. (Records written before
    /// chunk digests have none, so their RAM copy counts as damaged and the next tier is used.)
    #[serde(default)]
    pub chunks: Vec<String>,
}

/// An image set does not match its record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    /// An image file is gone.
    #[error("image file {file} is missing")]
    Missing {
        /// File name.
        file: String,
    },
    /// An image file has another size or content.
    #[error("{detail}")]
    Corrupt {
        /// File name.
        file: String,
        /// What differs, naming the file and chunk.
        detail: String,
    },
    /// The directory could not be read.
    #[error("cannot read {}: {message}", path.display())]
    Io {
        /// File or directory.
        path: PathBuf,
        /// OS error.
        message: String,
    },
}

/// Hashes every chunk of the regular files of `dir` (sorted by name) with the data plane's
/// chunking, so the drain can reuse the hashes.
pub fn digest_dir(dir: &Path, config: &ChunkConfig) -> Result<Vec<ImageFile>, ImageError> {
    let digest = digest_image_set(dir, config).map_err(|e| ImageError::Io {
        path: dir.to_owned(),
        message: e.to_string(),
    })?;
    Ok(digest
        .files
        .into_iter()
        .map(|f| ImageFile {
            name: f.name,
            size: f.size,
            chunk_size: digest.chunk_size,
            chunks: f.chunks.iter().map(ChunkHash::to_hex).collect(),
        })
        .collect())
}

/// The data plane's form of a record's digests.
pub fn to_digest(files: &[ImageFile]) -> Result<ImageDigest, ImageError> {
    let chunk_size = files
        .first()
        .map_or(ChunkConfig::default().chunk_size, |f| f.chunk_size);
    let files = files
        .iter()
        .map(|f| {
            let bad = || ImageError::Corrupt {
                file: f.name.clone(),
                detail: format!("image file {}: the record's digest is malformed", f.name),
            };
            if f.chunk_size != chunk_size {
                return Err(bad());
            }
            let chunks = f
                .chunks
                .iter()
                .map(|h| ChunkHash::from_hex(h).ok_or_else(bad))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(FileDigest {
                name: f.name.clone(),
                size: f.size,
                chunks,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ImageDigest { chunk_size, files })
}

/// Checks that `dir` holds exactly the recorded content for each recorded file, chunk by
/// chunk on `workers` threads.
pub fn verify_dir(dir: &Path, files: &[ImageFile], workers: usize) -> Result<(), ImageError> {
    let digest = to_digest(files)?;
    verify_image_set(dir, &digest, workers).map_err(|e| match e {
        DigestMismatch::File { file, detail } if detail == "missing" => {
            ImageError::Missing { file }
        }
        DigestMismatch::File { ref file, .. } | DigestMismatch::Chunk { ref file, .. } => {
            ImageError::Corrupt {
                file: file.clone(),
                detail: e.to_string(),
            }
        }
        DigestMismatch::Read(message) => ImageError::Io {
            path: dir.to_owned(),
            message,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn detects_missing_resized_and_altered_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("pages-1.img"), vec![1u8; 4096]).unwrap();
        fs::write(dir.path().join("core-1.img"), b"core").unwrap();
        fs::write(dir.path().join("empty.img"), b"").unwrap();
        let files = digest_dir(dir.path(), &ChunkConfig::default()).unwrap();
        assert_eq!(files.len(), 3);
        assert_eq!(files[0].name, "core-1.img");
        assert_eq!(to_digest(&files).unwrap().files[2].chunks.len(), 1);
        verify_dir(dir.path(), &files, 2).unwrap();

        let mut altered = vec![1u8; 4096];
        altered[100] = 2;
        fs::write(dir.path().join("pages-1.img"), &altered).unwrap();
        assert_eq!(
            verify_dir(dir.path(), &files, 2).unwrap_err().to_string(),
            "image file pages-1.img chunk 0 (bytes 0..): content differs from the checkpoint"
        );
        fs::write(dir.path().join("pages-1.img"), b"short").unwrap();
        assert!(verify_dir(dir.path(), &files, 2)
            .unwrap_err()
            .to_string()
            .contains("5 bytes, expected 4096"));
        fs::remove_file(dir.path().join("core-1.img")).unwrap();
        assert_eq!(
            verify_dir(dir.path(), &files, 2).unwrap_err(),
            ImageError::Missing {
                file: "core-1.img".into()
            }
        );
        let mut bad = files.clone();
        bad[0].chunks[0] = "xyz".into();
        assert!(verify_dir(dir.path(), &bad, 2)
            .unwrap_err()
            .to_string()
            .contains("malformed"));
    }
}
