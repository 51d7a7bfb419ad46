//! Which I/O engine the data plane writes chunks with: io_uring when the kernel offers every
//! operation we submit, else plain pwrite/fsync on the writer thread. io_uring can be missing
//! in ways the agent cannot fix (`kernel.io_uring_disabled`, a seccomp profile returning
//! EPERM, an old kernel), so it is probed once at start and the fallback is the same durable
//! write, only with one syscall per step.

use std::fmt;

use io_uring::{opcode, IoUring, Probe};

/// What the operator asked for (`[dataplane] io`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IoMode {
    /// io_uring if the probe passes, else pread/pwrite.
    #[default]
    Auto,
    /// io_uring or fail to start: for nodes where the fallback would hide a misconfiguration.
    Uring,
    /// pread/pwrite always.
    Pread,
}

impl IoMode {
    /// Parses the config and environment spelling (`auto`, `uring`, `pread`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(IoMode::Auto),
            "uring" => Some(IoMode::Uring),
            "pread" => Some(IoMode::Pread),
            _ => None,
        }
    }

    /// The spelling [`IoMode::parse`] reads.
    pub fn as_str(self) -> &'static str {
        match self {
            IoMode::Auto => "auto",
            IoMode::Uring => "uring",
            IoMode::Pread => "pread",
        }
    }
}

/// The engine chosen at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoBackend {
    /// io_uring with every probed operation.
    Uring,
    /// pread/pwrite, and why.
    Pread {
        /// Why io_uring is not used.
        reason: String,
    },
}

impl IoBackend {
    /// `uring` or `pread`.
    pub fn as_str(&self) -> &'static str {
        match self {
            IoBackend::Uring => "uring",
            IoBackend::Pread { .. } => "pread",
        }
    }
}

impl fmt::Display for IoBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoBackend::Uring => f.write_str("io_uring"),
            IoBackend::Pread { reason } => write!(f, "pread/pwrite ({reason})"),
        }
    }
}

/// The io_uring operations the chunk writer submits, with their names for messages.
const NEEDED_OPS: [(u8, &str); 3] = [
    (opcode::Write::CODE, "WRITE"),
    (opcode::WriteFixed::CODE, "WRITE_FIXED"),
    (opcode::Fsync::CODE, "FSYNC"),
];

/// Sets up a ring of `entries` and checks that it supports every operation we use; says why
/// not otherwise.
pub(crate) fn probe_ring(entries: u32) -> Result<IoUring, String> {
    let ring = IoUring::new(entries).map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM) => format!(
            "io_uring setup refused ({e}): kernel.io_uring_disabled is {} or a seccomp profile forbids it",
            sysctl_io_uring_disabled()
        ),
        Some(libc::ENOSYS) => format!("the kernel has no io_uring ({e})"),
        _ => format!("io_uring setup failed: {e}"),
    })?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring probe failed: {e}"))?;
    missing_op(&probe).map_or(Ok(ring), Err)
}

fn missing_op(probe: &Probe) -> Option<String> {
    NEEDED_OPS
        .iter()
        .find(|(code, _)| !probe.is_supported(*code))
        .map(|(_, name)| format!("the kernel's io_uring lacks {name}"))
}

fn sysctl_io_uring_disabled() -> String {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map_or_else(|_| "unknown".into(), |v| v.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print_and_a_probe_names_what_it_lacks() {
        for mode in [IoMode::Auto, IoMode::Uring, IoMode::Pread] {
            assert_eq!(IoMode::parse(mode.as_str()), Some(mode));
        }
        assert_eq!(IoMode::parse("io_uring"), None);
        // A probe nobody filled in reports no operation as supported.
        assert_eq!(
            missing_op(&Probe::new()).as_deref(),
            Some("the kernel's io_uring lacks WRITE")
        );
        let fallback = IoBackend::Pread {
            reason: "forced".into(),
        };
        assert_eq!(fallback.to_string(), "pread/pwrite (forced)");
        assert_eq!(fallback.as_str(), "pread");
    }
}
