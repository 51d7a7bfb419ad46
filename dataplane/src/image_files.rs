//! The files of a flat image directory (what CRIU wrote), memory-mapped for the drain and
//! the digest pass to read without a copy.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use memmap2::Mmap;

use crate::{TierError, TierKind};

/// One memory-mapped file of an image set.
pub(crate) struct SourceFile {
    pub name: String,
    pub mode: u32,
    pub size: u64,
    pub map: Option<Mmap>,
}

fn io_err(tier: TierKind, op: &'static str, path: &Path, source: std::io::Error) -> TierError {
    TierError::Io {
        tier,
        op,
        path: path.to_owned(),
        source,
    }
}

/// Maps every file of the flat image directory `dir`, sorted by name.
pub(crate) fn open_sources(tier: TierKind, dir: &Path) -> Result<Vec<SourceFile>, TierError> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_err(tier, "read image directory", dir, e))? {
        let entry = entry.map_err(|e| io_err(tier, "read image directory", dir, e))?;
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).map_err(|e| io_err(tier, "stat", &path, e))?;
        if !meta.is_file() {
            return Err(io_err(
                tier,
                "read image set",
                &path,
                std::io::Error::other(
                    "not a regular file; image sets are flat directories of files",
                ),
            ));
        }
        let name = entry.file_name().into_string().map_err(|_| {
            io_err(
                tier,
                "read image set",
                &path,
                std::io::Error::other("file name is not UTF-8"),
            )
        })?;
        let file = fs::File::open(&path).map_err(|e| io_err(tier, "open", &path, e))?;
        let map = if meta.len() == 0 {
            None
        } else {
            // Populating maps every page in one go instead of faulting them in one by one
            // from the workers.
            let options = memmap2::MmapOptions::new().populate().clone();
            // SAFETY: CRIU has finished writing the image set before it is drained, and
            // nothing modifies or truncates files in the RAM tier while a store reads them.
            let map = unsafe { options.map(&file) };
            Some(map.map_err(|e| io_err(tier, "mmap", &path, e))?)
        };
        files.push(SourceFile {
            name,
            mode: meta.permissions().mode() & 0o7777,
            size: meta.len(),
            map,
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}
