//! Puts the shim binary onto the host, replacing an older one atomically so that a shim
//! being exec'd by containerd is never half-written, and skipping the copy when the
//! checksum already matches.

use std::fs;
use std::path::{Path, PathBuf};

use crate::files::{remove_file, write_atomic};
use crate::{InstallerError, Result};

/// What installing the shim will do or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShimStep {
    /// Copy `from` to `to` (new or different checksum).
    Copy {
        /// The binary in the installer image.
        from: PathBuf,
        /// Its place on the host.
        to: PathBuf,
    },
    /// `to` already holds the same bytes.
    Unchanged {
        /// Its place on the host.
        to: PathBuf,
    },
    /// Uninstall: remove `path`.
    Remove {
        /// The installed shim.
        path: PathBuf,
    },
    /// Uninstall: nothing installed at `path`.
    Absent {
        /// Where the shim would be.
        path: PathBuf,
    },
}

impl ShimStep {
    /// Decides the install step from the source binary and the installed one.
    pub fn for_install(from: &Path, to: &Path) -> Result<Self> {
        let source = fs::read(from).map_err(|source| InstallerError::ShimSource {
            path: from.to_path_buf(),
            source,
        })?;
        let dir = to.parent().unwrap_or(Path::new("/"));
        if !dir.is_dir() {
            return Err(InstallerError::HostPathMissing {
                path: dir.to_path_buf(),
            });
        }
        let same = match fs::read(to) {
            Ok(installed) => blake3::hash(&installed) == blake3::hash(&source),
            Err(_) => false,
        };
        Ok(if same {
            Self::Unchanged {
                to: to.to_path_buf(),
            }
        } else {
            Self::Copy {
                from: from.to_path_buf(),
                to: to.to_path_buf(),
            }
        })
    }

    /// Decides the uninstall step.
    pub fn for_uninstall(path: &Path) -> Self {
        if path.exists() {
            Self::Remove {
                path: path.to_path_buf(),
            }
        } else {
            Self::Absent {
                path: path.to_path_buf(),
            }
        }
    }

    /// Carries the step out.
    pub fn apply(&self) -> Result<()> {
        match self {
            Self::Copy { from, to } => {
                let bytes = fs::read(from).map_err(|source| InstallerError::ShimSource {
                    path: from.clone(),
                    source,
                })?;
                write_atomic(to, &bytes, 0o755)
            }
            Self::Remove { path } => remove_file(path),
            Self::Unchanged { .. } | Self::Absent { .. } => Ok(()),
        }
    }

    /// One line for the log and the dry run.
    pub fn describe(&self) -> String {
        match self {
            Self::Copy { from, to } => {
                format!("install shim {} -> {}", from.display(), to.display())
            }
            Self::Unchanged { to } => format!("shim {} is up to date", to.display()),
            Self::Remove { path } => format!("remove shim {}", path.display()),
            Self::Absent { path } => format!("no shim at {}", path.display()),
        }
    }
}
