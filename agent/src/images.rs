//! Digests of a checkpoint's image files, taken after the dump and checked before a restore,
//! so a deleted or altered image is caught before CRIU runs instead of restoring wrong state.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One image file of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFile {
    /// File name inside the image directory.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// BLAKE3 digest, hex.
    pub blake3: String,
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
    #[error("image file {file} is corrupt: {detail}")]
    Corrupt {
        /// File name.
        file: String,
        /// What differs.
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

/// Lists and digests the regular files of `dir`, sorted by name.
pub fn digest_dir(dir: &Path) -> Result<Vec<ImageFile>, ImageError> {
    let io = |path: &Path, e: std::io::Error| ImageError::Io {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let entry = entry.map_err(|e| io(dir, e))?;
        let path = entry.path();
        let meta = entry.metadata().map_err(|e| io(&path, e))?;
        if !meta.is_file() {
            continue;
        }
        files.push(ImageFile {
            name: entry.file_name().to_string_lossy().into_owned(),
            size: meta.len(),
            blake3: digest_file(&path).map_err(|e| io(&path, e))?,
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// Checks that `dir` holds exactly the recorded content for each recorded file.
pub fn verify_dir(dir: &Path, files: &[ImageFile]) -> Result<(), ImageError> {
    for expected in files {
        let path = dir.join(&expected.name);
        let meta = match fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageError::Missing {
                    file: expected.name.clone(),
                })
            }
            Err(e) => {
                return Err(ImageError::Io {
                    path,
                    message: e.to_string(),
                })
            }
        };
        if meta.len() != expected.size {
            return Err(ImageError::Corrupt {
                file: expected.name.clone(),
                detail: format!("{} bytes, expected {}", meta.len(), expected.size),
            });
        }
        let digest = digest_file(&path).map_err(|e| ImageError::Io {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if digest != expected.blake3 {
            return Err(ImageError::Corrupt {
                file: expected.name.clone(),
                detail: "content differs from the checkpoint".into(),
            });
        }
    }
    Ok(())
}

fn digest_file(path: &Path) -> std::io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap_rayon(path)?;
    Ok(hasher.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_missing_resized_and_altered_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("pages-1.img"), vec![1u8; 4096]).unwrap();
        fs::write(dir.path().join("core-1.img"), b"core").unwrap();
        fs::write(dir.path().join("empty.img"), b"").unwrap();
        let files = digest_dir(dir.path()).unwrap();
        assert_eq!(files.len(), 3);
        assert_eq!(files[0].name, "core-1.img");
        verify_dir(dir.path(), &files).unwrap();

        let mut altered = vec![1u8; 4096];
        altered[100] = 2;
        fs::write(dir.path().join("pages-1.img"), &altered).unwrap();
        assert_eq!(
            verify_dir(dir.path(), &files).unwrap_err().to_string(),
            "image file pages-1.img is corrupt: content differs from the checkpoint"
        );
        fs::write(dir.path().join("pages-1.img"), b"short").unwrap();
        assert!(verify_dir(dir.path(), &files)
            .unwrap_err()
            .to_string()
            .contains("5 bytes, expected 4096"));
        fs::remove_file(dir.path().join("core-1.img")).unwrap();
        assert_eq!(
            verify_dir(dir.path(), &files).unwrap_err(),
            ImageError::Missing {
                file: "core-1.img".into()
            }
        );
    }
}
