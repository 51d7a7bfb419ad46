//! Host paths and crash-safe file writes: every write goes to a temp file in the same
//! directory, is fsynced and renamed over the target, so a reader (containerd, a running
//! shim's exec) sees the old file or the new one and never half of one.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::{InstallerError, Result};

/// Where the host's filesystem is mounted inside the installer's container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoot(PathBuf);

impl HostRoot {
    /// A host root at `dir` (`/host` in the DaemonSet, a temp dir in tests, `/` on a node).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self(dir.into())
    }

    /// The directory itself.
    pub fn dir(&self) -> &Path {
        &self.0
    }

    /// Maps a path as the host sees it to the path the installer opens.
    pub fn resolve(&self, host_path: &Path) -> PathBuf {
        let relative: PathBuf = host_path
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect();
        self.0.join(relative)
    }
}

/// Reads a UTF-8 file; `Ok(None)` when it does not exist.
pub fn read_text(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(source) => Err(InstallerError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Reads a file that must exist.
pub fn read_required(path: &Path) -> Result<String> {
    read_text(path)?.ok_or_else(|| InstallerError::HostPathMissing {
        path: path.to_path_buf(),
    })
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> InstallerError + '_ {
    move |source| InstallerError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// Replaces `path` with `bytes` atomically (temp file, fsync, rename, fsync of the
/// directory) and gives it `mode`. The directory must exist.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| InstallerError::HostPathMissing {
            path: path.to_path_buf(),
        })?;
    if !dir.is_dir() {
        return Err(InstallerError::HostPathMissing {
            path: dir.to_path_buf(),
        });
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.kybernate-tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temp)
            .map_err(write_err(path))?;
        file.write_all(bytes).map_err(write_err(path))?;
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(write_err(path))?;
        file.sync_all().map_err(write_err(path))?;
        fs::rename(&temp, path).map_err(write_err(path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(write_err(dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// Removes a file if it exists, and syncs its directory.
pub fn remove_file(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(InstallerError::Write {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(write_err(dir))?;
    }
    Ok(())
}

/// Mode of an existing file, or `default` when there is none.
pub fn mode_or(path: &Path, default: u32) -> u32 {
    fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(default)
}

/// The copy of a config as it was before the first install.
pub fn backup_path(config: &Path) -> PathBuf {
    with_suffix(config, ".kybernate-backup")
}

/// Written when the installer created a config (a k3s template) from a seed; holds the seed
/// so that uninstall can tell the file is unchanged and remove it again.
pub fn created_marker_path(config: &Path) -> PathBuf {
    with_suffix(config, ".kybernate-created")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths_stay_under_the_host_root() {
        let host = HostRoot::new("/host");
        assert_eq!(
            host.resolve(Path::new("/etc/containerd/config.toml")),
            Path::new("/host/etc/containerd/config.toml")
        );
        assert_eq!(
            host.resolve(Path::new("/../../etc/shadow")),
            Path::new("/host/etc/shadow")
        );
        assert_eq!(
            HostRoot::new("/").resolve(Path::new("/run/x.sock")),
            Path::new("/run/x.sock")
        );
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        fs::write(&path, "old").unwrap();
        write_atomic(&path, b"new", 0o600).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "new");
        assert_eq!(mode_or(&path, 0), 0o600);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["config.toml"]);
        let err = write_atomic(&dir.path().join("missing/config.toml"), b"x", 0o644).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
