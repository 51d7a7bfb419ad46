//! The installer's one error type: every refusal names the file, path or command it is about.

use std::path::PathBuf;

/// Why an install, uninstall or dry run refused or failed. Each variant renders as one line
/// that names the path or command, because the installer's output is read in a pod log.
#[derive(Debug, thiserror::Error)]
pub enum InstallerError {
    /// A host path the installer needs does not exist under `--host-root`.
    #[error("host path {path} does not exist (is the host filesystem mounted at --host-root?)")]
    HostPathMissing {
        /// The missing path, as seen by the installer.
        path: PathBuf,
    },
    /// Reading a file failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// Writing, renaming or removing a file failed; read-only mounts land here.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// A containerd config or template is not valid TOML.
    #[error("{path} is not valid TOML, nothing changed: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The parser's message, on one line.
        message: String,
    },
    /// The config's `version` is not one the installer knows how to edit.
    #[error("{path} has config version {found}; only version 2 (containerd 1.x) and version 3 (containerd 2.x) are supported")]
    UnknownVersion {
        /// The config file.
        path: PathBuf,
        /// What the `version` key held, or "1 (no version key)".
        found: String,
    },
    /// A runtime named `kybernate` exists that the installer did not write.
    #[error("{path} already defines runtime `kybernate` with other settings ({detail}); rerun with --force to replace it")]
    Conflict {
        /// The config file.
        path: PathBuf,
        /// What differs.
        detail: String,
    },
    /// The config is valid but shaped in a way the installer will not edit safely.
    #[error("{path}: {detail}")]
    Unsupported {
        /// The config file.
        path: PathBuf,
        /// What is in the way.
        detail: String,
    },
    /// No known containerd layout was found under the host root.
    #[error("no containerd config found under {host_root} (looked for {tried}); pass --flavour and --config")]
    NoFlavour {
        /// The host root searched.
        host_root: PathBuf,
        /// The paths tried, comma separated.
        tried: String,
    },
    /// The shim binary to install cannot be read.
    #[error("shim source {path} is not readable: {source}")]
    ShimSource {
        /// The source path inside the installer image.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The command that restarts containerd failed.
    #[error("restarting containerd with `{command}` failed: {detail}")]
    Restart {
        /// The command line.
        command: String,
        /// Its exit status and stderr.
        detail: String,
    },
    /// containerd did not come back, or came back without the runtime, in time.
    #[error("containerd at {socket} {detail} after {attempts} checks")]
    NotReady {
        /// The socket probed.
        socket: PathBuf,
        /// What the last probe saw.
        detail: String,
        /// How many probes were made.
        attempts: u32,
    },
}

/// Result alias for the installer library.
pub type Result<T, E = InstallerError> = std::result::Result<T, E>;
