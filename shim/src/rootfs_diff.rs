//! The container's writable layer travels with its checkpoint. At checkpoint the overlay
//! upper dir of the container's rootfs becomes `rootfs-diff.tar` (new and changed entries)
//! and `rootfs-diff.json` (paths the container deleted and directories it made opaque), both
//! written into the CRIU image dir so the agent digests and stores them like any image file.
//! At restore they are applied onto the new container's rootfs before `runc restore`, so the
//! files the workload wrote (and holds open) are there again and the files it deleted are
//! gone. Every path is checked before anything is written; nothing is written through a
//! symlink.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::BufWriter;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Image file holding the new and changed entries of the writable layer.
pub const DIFF_TAR: &str = "rootfs-diff.tar";
/// Image file listing the deleted paths and the opaque directories.
pub const DIFF_LIST: &str = "rootfs-diff.json";
const LIST_VERSION: u32 = 1;
const OPAQUE_XATTRS: [&str; 2] = ["trusted.overlay.opaque", "user.overlay.opaque"];
const UNSUPPORTED_XATTRS: [&str; 2] = ["trusted.overlay.redirect", "trusted.overlay.metacopy"];

/// Why a rootfs diff could not be taken or applied.
#[derive(Debug, thiserror::Error)]
pub enum RootfsDiffError {
    /// Reading or writing a file failed.
    #[error("{context} {}: {source}", path.display())]
    Io {
        /// What was being done.
        context: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The diff files are damaged or name a path outside the rootfs.
    #[error("{file} is corrupt: {detail}")]
    Corrupt {
        /// `rootfs-diff.tar` or `rootfs-diff.json`.
        file: &'static str,
        /// What is wrong, naming the entry.
        detail: String,
    },
    /// The upper dir holds something the diff cannot carry faithfully.
    #[error("cannot carry {} in the rootfs diff: {detail}", path.display())]
    Unsupported {
        /// The entry, relative to the rootfs.
        path: PathBuf,
        /// Why.
        detail: String,
    },
}

type Result<T> = std::result::Result<T, RootfsDiffError>;

fn io(context: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RootfsDiffError {
    let path = path.to_owned();
    move |source| RootfsDiffError::Io {
        context,
        path,
        source,
    }
}

/// Deletions recorded beside the tar.
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffList {
    /// Format version.
    pub version: u32,
    /// Paths (relative to the rootfs) the container deleted: overlay whiteouts.
    pub deleted: Vec<String>,
    /// Directories whose image content the container replaced as a whole: their old
    /// entries are removed before the tar's entries are written.
    pub opaque: Vec<String>,
}

/// What a capture wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DiffSummary {
    /// Entries in the tar.
    pub entries: u64,
    /// Deleted paths and opaque directories.
    pub deletions: u64,
    /// Size of the tar in bytes.
    pub tar_bytes: u64,
}

/// The overlay upper dir of the mount at `rootfs`, read from a `/proc/self/mountinfo` text;
/// `Err(fstype)` when the topmost mount there is not an overlay with an upper dir (or
/// nothing is mounted there).
pub fn overlay_upper(mountinfo: &str, rootfs: &Path) -> std::result::Result<PathBuf, String> {
    let target = rootfs.as_os_str().as_bytes();
    let mut found = Err(String::from("no mount"));
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(point) = left.split(' ').nth(4) else {
            continue;
        };
        if unescape(point) != target {
            continue;
        }
        let mut fields = right.split(' ');
        let fstype = fields.next().unwrap_or_default();
        let options = fields.nth(1).unwrap_or_default();
        found = match options.split(',').find_map(|o| o.strip_prefix("upperdir=")) {
            Some(upper) if fstype == "overlay" => {
                Ok(PathBuf::from(std::ffi::OsStr::from_bytes(&unescape(upper))))
            }
            _ => Err(fstype.to_owned()),
        };
    }
    found
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\054` for a comma).
fn unescape(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |n, c| n.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

/// The spec's mount destinations, relative to the rootfs: runc creates them as mount points
/// in the writable layer, and their content belongs to the mounts, not to the rootfs.
pub fn mount_points(spec: &oci_spec::runtime::Spec) -> BTreeSet<PathBuf> {
    spec.mounts()
        .iter()
        .flatten()
        .filter_map(|m| {
            let destination = m.destination();
            safe_relative(
                destination
                    .strip_prefix("/")
                    .unwrap_or(destination.as_path()),
            )
        })
        .collect()
}

/// `raw` as a plain relative path of named components, or `None` (absolute, `..`, empty).
fn safe_relative(raw: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(name) => out.push(name),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// The value of extended attribute `name` of `path` itself (not a symlink's target), or
/// `None` when it has none.
fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let path = CString::new(path.as_os_str().as_bytes()).ok()?;
    let name = CString::new(name).ok()?;
    // SAFETY: both strings are NUL-terminated and live for the call; a null buffer of length
    // 0 asks only for the value's size.
    let size = unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
    let mut buf = vec![0u8; usize::try_from(size).ok()?];
    // SAFETY: as above; `buf` is writable for `buf.len()` bytes.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    buf.truncate(usize::try_from(n).ok()?);
    Some(buf)
}

/// Writes the diff of the overlay upper dir `upper` into `out` (the CRIU image dir),
/// leaving out `excluded` mount points and everything below them.
pub fn capture(upper: &Path, excluded: &BTreeSet<PathBuf>, out: &Path) -> Result<DiffSummary> {
    let tar_path = out.join(DIFF_TAR);
    let file = private_file(&tar_path).map_err(io("create", &tar_path))?;
    let mut builder = tar::Builder::new(BufWriter::new(file));
    builder.follow_symlinks(false);
    let mut list = DiffList {
        version: LIST_VERSION,
        ..DiffList::default()
    };
    let mut summary = DiffSummary::default();
    walk(
        upper,
        Path::new(""),
        excluded,
        &mut builder,
        &mut list,
        &mut summary,
    )?;
    let writer = builder.into_inner().map_err(io("write", &tar_path))?;
    let file = writer.into_inner().map_err(|e| RootfsDiffError::Io {
        context: "write",
        path: tar_path.clone(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io("sync", &tar_path))?;
    summary.tar_bytes = file.metadata().map_err(io("stat", &tar_path))?.len();
    let list_path = out.join(DIFF_LIST);
    let text = serde_json::to_vec(&list).map_err(|e| RootfsDiffError::Io {
        context: "encode",
        path: list_path.clone(),
        source: e.into(),
    })?;
    private_file(&list_path)
        .and_then(|mut file| std::io::Write::write_all(&mut file, &text))
        .map_err(io("write", &list_path))?;
    summary.deletions = u64::try_from(list.deleted.len() + list.opaque.len()).unwrap_or(u64::MAX);
    Ok(summary)
}

/// Creates (or truncates) `path` as root's alone: the diff holds the container's files,
/// which may be as secret as its memory.
fn private_file(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

fn walk(
    upper: &Path,
    rel: &Path,
    excluded: &BTreeSet<PathBuf>,
    builder: &mut tar::Builder<BufWriter<File>>,
    list: &mut DiffList,
    summary: &mut DiffSummary,
) -> Result<()> {
    let dir = upper.join(rel);
    let mut names: Vec<_> = fs::read_dir(&dir)
        .map_err(io("read", &dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()
        .map_err(io("read", &dir))?;
    names.sort();
    for name in names {
        let rel = rel.join(&name);
        if excluded.contains(&rel) {
            continue;
        }
        let full = upper.join(&rel);
        let meta = fs::symlink_metadata(&full).map_err(io("stat", &full))?;
        let kind = meta.file_type();
        let text = || {
            rel.to_str()
                .map(str::to_owned)
                .ok_or_else(|| RootfsDiffError::Unsupported {
                    path: rel.clone(),
                    detail: "the name is not UTF-8".into(),
                })
        };
        if kind.is_char_device() && meta.rdev() == 0 {
            list.deleted.push(text()?);
            continue;
        }
        if kind.is_socket() {
            log::info!("rootfs diff: socket {} is not carried", rel.display());
            continue;
        }
        if let Some(x) = UNSUPPORTED_XATTRS
            .iter()
            .find(|x| xattr(&full, x).is_some())
        {
            return Err(RootfsDiffError::Unsupported {
                path: rel,
                detail: format!("overlay attribute {x} (redirect_dir / metacopy mounts)"),
            });
        }
        if kind.is_dir() {
            if OPAQUE_XATTRS
                .iter()
                .any(|x| xattr(&full, x).as_deref() == Some(b"y"))
            {
                list.opaque.push(text()?);
            }
            builder
                .append_dir(&rel, &full)
                .map_err(io("archive", &full))?;
            summary.entries += 1;
            walk(upper, &rel, excluded, builder, list, summary)?;
        } else {
            builder
                .append_path_with_name(&full, &rel)
                .map_err(io("archive", &full))?;
            summary.entries += 1;
        }
    }
    Ok(())
}

/// Whether `name` is one of the diff's image files (which containerd's own checkpoint path
/// does not need: `ctr c checkpoint --rw` carries the writable layer itself).
pub fn is_diff_file(name: &std::ffi::OsStr) -> bool {
    name == DIFF_TAR || name == DIFF_LIST
}

mod apply;
mod hooks;

pub use apply::{apply, check, present, CheckedDiff};

#[cfg(test)]
mod tests;
