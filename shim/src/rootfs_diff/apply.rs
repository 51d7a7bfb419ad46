//! Applying a rootfs diff onto a new container's rootfs: the whole list and tar are checked
//! first, then the deletions, then the entries, never through a symlink.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{
    io, safe_relative, DiffList, DiffSummary, Result, RootfsDiffError, DIFF_LIST, DIFF_TAR,
    LIST_VERSION,
};

/// Whether the image dir `images` carries a rootfs diff. Both files or neither (older
/// checkpoints) are fine; one alone is a damaged checkpoint.
pub fn present(images: &Path) -> Result<bool> {
    match (
        images.join(DIFF_TAR).is_file(),
        images.join(DIFF_LIST).is_file(),
    ) {
        (true, true) => Ok(true),
        (false, false) => Ok(false),
        (tar, _) => Err(RootfsDiffError::Corrupt {
            file: if tar { DIFF_LIST } else { DIFF_TAR },
            detail: "missing while its companion file is present".into(),
        }),
    }
}

fn corrupt_tar(detail: impl std::fmt::Display) -> RootfsDiffError {
    RootfsDiffError::Corrupt {
        file: DIFF_TAR,
        detail: detail.to_string(),
    }
}

/// A rootfs diff whose list and tar passed [`check`]: every path stays inside the rootfs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CheckedDiff {
    /// Paths to delete, relative to the rootfs.
    pub deleted: Vec<PathBuf>,
    /// Directories whose old content goes, relative to the rootfs.
    pub opaque: Vec<PathBuf>,
    /// Entries in the tar.
    pub entries: u64,
}

/// Checks a diff's list (the bytes of `rootfs-diff.json`) and its tar without touching any
/// rootfs: the list's version and paths, and every tar entry's path, type and place (never
/// below a symlink the tar itself makes). Pure, so the fuzzer and [`apply`] share it.
pub fn check(list_json: &[u8], tar: impl Read) -> Result<CheckedDiff> {
    let list: DiffList =
        serde_json::from_slice(list_json).map_err(|e| RootfsDiffError::Corrupt {
            file: DIFF_LIST,
            detail: e.to_string(),
        })?;
    if list.version != LIST_VERSION {
        return Err(RootfsDiffError::Corrupt {
            file: DIFF_LIST,
            detail: format!("unknown version {}", list.version),
        });
    }
    let checked = |p: &String| {
        safe_relative(Path::new(p)).ok_or_else(|| RootfsDiffError::Corrupt {
            file: DIFF_LIST,
            detail: format!("path {p:?} leaves the rootfs"),
        })
    };
    let deleted = list
        .deleted
        .iter()
        .map(checked)
        .collect::<Result<Vec<_>>>()?;
    let opaque = list
        .opaque
        .iter()
        .map(checked)
        .collect::<Result<Vec<_>>>()?;
    let mut links = BTreeSet::new();
    let entries = each_entry(tar, |rel, entry| {
        if let Some(link) = rel.ancestors().skip(1).find(|a| links.contains(*a)) {
            return Err(corrupt_tar(format!(
                "entry {} lies below the symlink {}",
                rel.display(),
                link.display()
            )));
        }
        if entry.header().entry_type() == tar::EntryType::Symlink {
            links.insert(rel);
        }
        Ok(())
    })?;
    Ok(CheckedDiff {
        deleted,
        opaque,
        entries,
    })
}

/// Applies the diff in `images` onto `rootfs`: first validates the whole list and tar, then
/// removes the deleted paths and the opaque directories' old content, then writes the tar's
/// entries. Nothing is written when validation fails.
pub fn apply(images: &Path, rootfs: &Path) -> Result<DiffSummary> {
    let list_path = images.join(DIFF_LIST);
    let text = fs::read(&list_path).map_err(io("read", &list_path))?;
    let tar_path = images.join(DIFF_TAR);
    let CheckedDiff {
        deleted,
        opaque,
        entries,
    } = check(&text, open_tar(&tar_path)?)?;

    for rel in &deleted {
        let target = inside(rootfs, rel)?;
        remove_any(&target)?;
    }
    for rel in &opaque {
        let target = inside(rootfs, rel)?;
        match fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => {
                for entry in fs::read_dir(&target).map_err(io("read", &target))? {
                    remove_any(&entry.map_err(io("read", &target))?.path())?;
                }
            }
            Ok(_) => remove_any(&target)?,
            Err(_) => {}
        }
    }
    each_entry(open_tar(&tar_path)?, |rel, entry| {
        let target = inside(rootfs, &rel)?;
        unpack(entry, &rel, &target)
    })?;
    Ok(DiffSummary {
        entries,
        deletions: u64::try_from(deleted.len() + opaque.len()).unwrap_or(u64::MAX),
        tar_bytes: fs::metadata(&tar_path).map_or(0, |m| m.len()),
    })
}

fn open_tar(tar_path: &Path) -> Result<BufReader<File>> {
    let file = File::open(tar_path).map_err(io("open", tar_path))?;
    Ok(BufReader::new(file))
}

/// Runs `each` on every entry of the tar with its checked relative path; returns the count.
fn each_entry<R: Read>(
    tar: R,
    mut each: impl FnMut(PathBuf, &mut tar::Entry<'_, R>) -> Result<()>,
) -> Result<u64> {
    let mut archive = tar::Archive::new(tar);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_mask(0);
    let mut count = 0;
    for entry in archive.entries().map_err(corrupt_tar)? {
        let mut entry = entry.map_err(corrupt_tar)?;
        let raw = entry.path().map_err(corrupt_tar)?.into_owned();
        let rel = safe_relative(&raw)
            .ok_or_else(|| corrupt_tar(format!("entry {:?} leaves the rootfs", raw.display())))?;
        use tar::EntryType as T;
        let kind = entry.header().entry_type();
        if !matches!(
            kind,
            T::Regular | T::Directory | T::Symlink | T::Char | T::Block | T::Fifo
        ) {
            return Err(corrupt_tar(format!(
                "entry {} has an unsupported type {kind:?}",
                rel.display()
            )));
        }
        if kind == T::Symlink && entry.link_name().map_err(corrupt_tar)?.is_none() {
            return Err(corrupt_tar(format!(
                "symlink {} has no target",
                rel.display()
            )));
        }
        each(rel, &mut entry)?;
        count += 1;
    }
    Ok(count)
}

/// `rootfs/rel`, after checking that no existing parent of it is a symlink (which would lead
/// out of the rootfs, into the host's tree); missing parents are created.
fn inside(rootfs: &Path, rel: &Path) -> Result<PathBuf> {
    let mut at = rootfs.to_path_buf();
    let mut parts = rel.components().peekable();
    while let Some(part) = parts.next() {
        at.push(part);
        if parts.peek().is_none() {
            break;
        }
        match fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(RootfsDiffError::Corrupt {
                    file: DIFF_TAR,
                    detail: format!(
                        "{} would be written through {}, which is not a directory",
                        rel.display(),
                        at.display()
                    ),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir(&at).map_err(io("create", &at))?;
            }
            Err(e) => return Err(io("stat", &at)(e)),
        }
    }
    Ok(at)
}

fn remove_any(target: &Path) -> Result<()> {
    let removed = match fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(target),
        Ok(_) => fs::remove_file(target),
        Err(_) => Ok(()),
    };
    removed.map_err(io("remove", target))
}

fn unpack(entry: &mut tar::Entry<'_, impl Read>, rel: &Path, target: &Path) -> Result<()> {
    use tar::EntryType as T;
    let kind = entry.header().entry_type();
    let existing = fs::symlink_metadata(target).ok();
    if existing
        .as_ref()
        .is_some_and(|m| !(m.is_dir() && kind == T::Directory))
    {
        remove_any(target)?;
    }
    if matches!(kind, T::Char | T::Block | T::Fifo) {
        return make_node(entry.header(), kind, rel, target);
    }
    entry.unpack(target).map_err(io("write", target))?;
    Ok(())
}

fn make_node(header: &tar::Header, kind: tar::EntryType, rel: &Path, target: &Path) -> Result<()> {
    let bad = |e: std::io::Error| corrupt_tar(format!("entry {}: {e}", rel.display()));
    let mode = header.mode().map_err(bad)?;
    let major = header.device_major().map_err(bad)?.unwrap_or(0);
    let minor = header.device_minor().map_err(bad)?.unwrap_or(0);
    let format = match kind {
        tar::EntryType::Char => libc::S_IFCHR,
        tar::EntryType::Block => libc::S_IFBLK,
        _ => libc::S_IFIFO,
    };
    let path = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| corrupt_tar(format!("entry {} has a NUL byte", rel.display())))?;
    let uid = u32::try_from(header.uid().map_err(bad)?).map_err(|_| bad(too_big()))?;
    let gid = u32::try_from(header.gid().map_err(bad)?).map_err(|_| bad(too_big()))?;
    // SAFETY: `path` is NUL-terminated and lives for the calls; the rest are plain integers.
    let rc = unsafe {
        let rc = libc::mknod(
            path.as_ptr(),
            format | (mode & 0o7777),
            libc::makedev(major, minor),
        );
        if rc != 0 {
            rc
        } else if libc::lchown(path.as_ptr(), uid, gid) != 0 {
            -1
        } else {
            libc::chmod(path.as_ptr(), mode & 0o7777)
        }
    };
    if rc != 0 {
        return Err(io("create", target)(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn too_big() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, "id out of range")
}
