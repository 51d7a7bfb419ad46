//! The directories that hold checkpoints, kept private to root.
//!
//! A checkpoint is a copy of a workload's memory: its tokens, keys and data. The agent runs
//! with umask 077 (`kybernate-agent` sets it before anything else), so every directory it
//! or CRIU creates is 0700 and every file 0600: images, chunks, manifests, records, staging,
//! partial and quarantine directories alike. What this module adds is the check of
//! directories that already exist: a tier directory someone else owns, or one that others can
//! write, could have its images swapped for a forged copy that a later restore would run, so
//! the agent refuses to start on it and names the path, its owner and its mode. A directory
//! created by an older version (root's, 0755) is tightened to 0700.
//!
//! The check is race-free because of what it requires. Once a directory is root's and only
//! root can write to it and to its parent (or the parent is sticky, as `/dev/shm` is), no
//! other user can replace, rename or enter it between the check and any later use.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Group and others may write.
const WRITABLE_BY_OTHERS: u32 = 0o022;
/// Group and others have any access.
const OPEN_TO_OTHERS: u32 = 0o077;
/// Only the owner may delete or rename entries of a sticky directory.
const STICKY: u32 = 0o1000;

/// A directory for checkpoint data that cannot be used safely.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrivateDirError {
    /// Someone other than root could change what the directory holds.
    #[error(
        "{role} {} is {why} (owner uid {owner}, mode {mode:04o}); checkpoints hold workload \
         memory, so it must be root's and writable by root alone: fix or remove it",
        path.display()
    )]
    Unsafe {
        /// What the agent uses the directory for.
        role: &'static str,
        /// The directory (or its parent, when that is the problem).
        path: PathBuf,
        /// What is wrong with it.
        why: &'static str,
        /// Its owner.
        owner: u32,
        /// Its permission bits.
        mode: u32,
    },
    /// The directory could not be created, inspected or tightened.
    #[error("{role} {}: {message}", path.display())]
    Io {
        /// What the agent uses the directory for.
        role: &'static str,
        /// The directory.
        path: PathBuf,
        /// What failed.
        message: String,
    },
}

/// Creates `path` as a 0700 directory of root's, or checks the one that exists and tightens
/// it to 0700; see the module documentation.
pub fn prepare(role: &'static str, path: &Path) -> Result<(), PrivateDirError> {
    let io = |message: String| PrivateDirError::Io {
        role,
        path: path.to_owned(),
        message,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| io(format!("cannot create its parent: {e}")))?;
        let meta =
            std::fs::metadata(parent).map_err(|e| io(format!("cannot inspect its parent: {e}")))?;
        let mode = meta.permissions().mode();
        if mode & WRITABLE_BY_OTHERS != 0 && mode & STICKY == 0 {
            return Err(PrivateDirError::Unsafe {
                role,
                path: parent.to_owned(),
                why: "the parent of the directory, and others may write to it (not sticky)",
                owner: meta.uid(),
                mode: mode & 0o7777,
            });
        }
    }
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(format!("cannot create: {e}"))),
    }
    let meta = std::fs::symlink_metadata(path).map_err(|e| io(e.to_string()))?;
    let mode = meta.permissions().mode() & 0o7777;
    let unsafe_because = |why| PrivateDirError::Unsafe {
        role,
        path: path.to_owned(),
        why,
        owner: meta.uid(),
        mode,
    };
    if meta.file_type().is_symlink() {
        return Err(unsafe_because("a symbolic link"));
    }
    if !meta.is_dir() {
        return Err(unsafe_because("not a directory"));
    }
    // SAFETY: geteuid has no preconditions.
    if meta.uid() != unsafe { libc::geteuid() } {
        return Err(unsafe_because("owned by another user"));
    }
    if mode & WRITABLE_BY_OTHERS != 0 {
        return Err(unsafe_because("writable by others"));
    }
    if mode & OPEN_TO_OTHERS != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io(format!("cannot tighten mode {mode:04o} to 0700: {e}")))?;
        tracing::warn!(path = %path.display(), from = format!("{mode:04o}"), "{role}: tightened to mode 0700");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_missing_directory_is_created_0700() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/ram");
        prepare("RAM tier", &dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn a_root_directory_open_to_reading_is_tightened() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("nvme");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare("NVMe tier", &dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn a_directory_others_may_write_is_refused_naming_its_mode() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ram");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = prepare("RAM tier", &dir).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&dir.display().to_string())
                && text.contains("writable by others")
                && text.contains("mode 0777"),
            "{text}"
        );
        assert_eq!(mode(&dir), 0o777, "a refused directory is left as it was");
    }

    #[test]
    fn a_directory_of_another_user_is_refused_naming_the_owner() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ram");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(4242), Some(4242)).unwrap();
        let err = prepare("RAM tier", &dir).unwrap_err().to_string();
        assert!(
            err.contains("owned by another user") && err.contains("owner uid 4242"),
            "{err}"
        );
    }

    #[test]
    fn a_symlink_or_a_file_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        let link = root.path().join("ram");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = prepare("RAM tier", &link).unwrap_err().to_string();
        assert!(err.contains("a symbolic link"), "{err}");
        let file = root.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let err = prepare("RAM tier", &file).unwrap_err().to_string();
        assert!(err.contains("not a directory"), "{err}");
    }

    #[test]
    fn a_parent_others_may_write_is_refused_unless_sticky() {
        let root = tempfile::tempdir().unwrap();
        let parent = root.path().join("shared");
        std::fs::create_dir(&parent).unwrap();
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = prepare("RAM tier", &parent.join("ram"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("the parent of the directory"), "{err}");
        // /dev/shm and /tmp are sticky: others cannot rename or remove root's entries.
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o1777)).unwrap();
        prepare("RAM tier", &parent.join("ram")).unwrap();
    }
}
