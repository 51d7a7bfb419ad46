//! The check that the agent's directories are the host's when it runs in a container.
//!
//! In the DaemonSet the agent has its own mount namespace but the host's PID namespace, and
//! CRIU runs in the host's mount namespace (it cannot dump processes of another one). The
//! images CRIU writes, its logs and the socket the shim dials are therefore named by paths
//! that must mean the same directory on the host and in the agent's container: each must be a
//! host mount at the same path. A missing mount would otherwise show up much later, as a
//! checkpoint CRIU wrote where the agent cannot see it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::config::AgentConfig;

/// A directory of the agent that is not the host's directory of the same path.
#[derive(Debug, thiserror::Error)]
pub enum HostMountError {
    /// The directory exists in the container but is not mounted from the host.
    #[error(
        "{role} {} is not the host's {}: mount the host's directory at the same path \
         (a hostPath volume, as deploy/40-agent-daemonset.yaml does)",
        path.display(), path.display()
    )]
    NotHostMount {
        /// What the agent uses the directory for.
        role: &'static str,
        /// The directory.
        path: PathBuf,
    },
    /// The directory could not be created or inspected.
    #[error("{role} {}: {message}", path.display())]
    Unreadable {
        /// What the agent uses the directory for.
        role: &'static str,
        /// The directory.
        path: PathBuf,
        /// What failed.
        message: String,
    },
}

/// The directories that must be shared with the host: the socket's directory, the state
/// directory (CRIU logs, records, NVMe tier) and the RAM tier.
pub fn required(config: &AgentConfig) -> Vec<(&'static str, PathBuf)> {
    let mut dirs = Vec::new();
    if let Some(dir) = config.socket.parent() {
        dirs.push(("socket directory", dir.to_path_buf()));
    }
    dirs.push(("state_dir", config.state_dir.clone()));
    dirs.push(("RAM tier", config.ram_tier_path()));
    dirs.push(("NVMe tier", config.nvme_tier_path()));
    dirs
}

/// In a container that shares the host's PIDs (the DaemonSet's hostPID), the nearest
/// ancestor in another mount namespace: the container runtime's shim, which runs in the
/// host's namespaces. `None` outside a container, or when the container has its own PIDs
/// (the chain then ends at the container's PID 1). PID 1 itself is not used: some hosts
/// hide its namespaces even from root.
pub fn host_process(proc_root: &Path) -> Option<u32> {
    let mnt = |pid: &str| std::fs::read_link(proc_root.join(pid).join("ns/mnt")).ok();
    let own = mnt("self")?;
    let mut pid = parent_of(proc_root, "self")?;
    while pid > 1 {
        let name = pid.to_string();
        match mnt(&name) {
            Some(ns) if ns != own => return Some(pid),
            _ => pid = parent_of(proc_root, &name)?,
        }
    }
    None
}

fn parent_of(proc_root: &Path, pid: &str) -> Option<u32> {
    let status = std::fs::read_to_string(proc_root.join(pid).join("status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Creates each directory and checks that `host_root` (the host's `/`, seen through
/// `/proc/<host process>/root`) has the very same directory at the same path.
pub fn check(host_root: &Path, dirs: &[(&'static str, PathBuf)]) -> Result<(), HostMountError> {
    for (role, path) in dirs {
        let unreadable = |message: String| HostMountError::Unreadable {
            role,
            path: path.clone(),
            message,
        };
        match std::fs::create_dir_all(path) {
            // Only a mount can be writable in a container with a read-only root.
            Err(e) if e.kind() == std::io::ErrorKind::ReadOnlyFilesystem => {
                return Err(HostMountError::NotHostMount {
                    role,
                    path: path.clone(),
                })
            }
            Err(e) => return Err(unreadable(format!("cannot create: {e}"))),
            Ok(()) => {}
        }
        let own = std::fs::metadata(path).map_err(|e| unreadable(e.to_string()))?;
        let relative = path.strip_prefix("/").unwrap_or(path);
        let same = std::fs::metadata(host_root.join(relative))
            .map(|host| host.dev() == own.dev() && host.ino() == own.ino())
            .unwrap_or(false);
        if !same {
            return Err(HostMountError::NotHostMount {
                role,
                path: path.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_seen_through_the_host_root_passes() {
        let host = tempfile::tempdir().unwrap();
        let dir = host.path().join("var/lib/kybernate");
        // With `/` as the host root every absolute path is its own host path.
        check(Path::new("/"), &[("state_dir", dir.clone())]).unwrap();
        assert!(dir.is_dir());
    }

    #[test]
    fn a_directory_missing_on_the_host_is_named() {
        let container = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        let dir = container.path().join("state");
        let err = check(host.path(), &[("state_dir", dir.clone())]).unwrap_err();
        let line = err.to_string();
        assert!(
            line.contains(&format!("state_dir {}", dir.display())),
            "{line}"
        );
        assert!(line.contains("hostPath"), "{line}");
        assert!(!line.contains('\n'), "{line}");
    }

    #[test]
    fn a_different_directory_at_the_same_host_path_is_refused() {
        let container = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        let dir = container.path().join("run");
        let relative = dir.strip_prefix("/").unwrap();
        std::fs::create_dir_all(host.path().join(relative)).unwrap();
        let err = check(host.path(), &[("socket directory", dir)]).unwrap_err();
        assert!(matches!(err, HostMountError::NotHostMount { .. }), "{err}");
    }

    #[test]
    fn outside_a_container_there_is_no_host_process() {
        // The test and its ancestors share one mount namespace.
        assert_eq!(host_process(Path::new("/proc")), None);
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(host_process(empty.path()), None);
    }
}
