//! Kernel notifications of a cgroup's OOM kills, so that the shim never polls: on cgroup v2
//! an inotify watch on `memory.events` (the kernel raises `IN_MODIFY` on every change of that
//! file), on cgroup v1 an eventfd registered with `cgroup.event_control` for
//! `memory.oom_control` (the kernel signals it on every OOM in the cgroup), as runc's shim
//! does.

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// One container's OOM notifications.
#[derive(Debug)]
pub struct OomNotifier {
    fd: AsyncFd<OwnedFd>,
    /// cgroup v1: `memory.oom_control`, which must stay open while the eventfd is registered.
    _control: Option<std::fs::File>,
}

fn last_error(what: &str, path: &Path) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// Takes ownership of a descriptor a syscall just returned, or its error.
fn owned(fd: libc::c_int, what: &str, path: &Path) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(last_error(what, path));
    }
    // SAFETY: `fd` was just returned by the kernel, is open, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Hands a notification descriptor to tokio's reactor.
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` stays open and names the same file description until it is
    // dropped, and only the `AsyncFd` that owns it drops it.
    Ok(unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?)
}

impl OomNotifier {
    /// Watches `counter`: a cgroup v2 `memory.events` (`unified`) or a cgroup v1
    /// `memory.oom_control`. Must run inside the tokio runtime.
    pub fn open(counter: &Path, unified: bool) -> io::Result<Self> {
        if unified {
            Self::inotify(counter)
        } else {
            Self::eventfd(counter)
        }
    }

    fn inotify(events: &Path) -> io::Result<Self> {
        // SAFETY: inotify_init1 takes flags only and returns a new descriptor or -1.
        let fd = owned(
            unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) },
            "inotify for",
            events,
        )?;
        let path = CString::new(events.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: `fd` is an open inotify descriptor and `path` a NUL-terminated string that
        // outlives the call.
        let watch =
            unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), libc::IN_MODIFY) };
        if watch < 0 {
            return Err(last_error("watch", events));
        }
        Ok(Self {
            fd: register(fd)?,
            _control: None,
        })
    }

    fn eventfd(oom_control: &Path) -> io::Result<Self> {
        let control = std::fs::File::open(oom_control).map_err(|e| {
            io::Error::new(e.kind(), format!("open {}: {e}", oom_control.display()))
        })?;
        // SAFETY: eventfd takes an initial value and flags and returns a new descriptor or -1.
        let fd = owned(
            unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) },
            "eventfd for",
            oom_control,
        )?;
        let event_control = oom_control.with_file_name("cgroup.event_control");
        std::fs::write(
            &event_control,
            format!("{} {}", fd.as_raw_fd(), control.as_raw_fd()),
        )
        .map_err(|e| io::Error::new(e.kind(), format!("write {}: {e}", event_control.display())))?;
        Ok(Self {
            fd: register(fd)?,
            _control: Some(control),
        })
    }

    /// Waits for the next notification (several at once count as one).
    pub async fn changed(&mut self) -> io::Result<()> {
        loop {
            let mut ready = self.fd.readable().await?;
            let mut buf = [0u8; 4096];
            let mut got = false;
            loop {
                // SAFETY: `buf` is valid for writes of its length for the call; the
                // descriptor is open and non-blocking.
                let n = unsafe {
                    libc::read(
                        self.fd.get_ref().as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                    )
                };
                if n > 0 {
                    got = true;
                    continue;
                }
                let e = io::Error::last_os_error();
                if n == 0 || e.kind() == io::ErrorKind::WouldBlock {
                    break;
                }
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            ready.clear_ready();
            if got {
                return Ok(());
            }
        }
    }
}

/// The OOM-kill counter in a cgroup v2 `memory.events` or cgroup v1 `memory.oom_control`
/// file (both have an `oom_kill N` line).
pub fn oom_kills(counter: &str) -> u64 {
    counter
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Each running container's OOM-kill counter file and the kills reported so far.
#[derive(Debug, Default)]
pub struct OomWatches(std::sync::Mutex<HashMap<String, (PathBuf, u64)>>);

impl OomWatches {
    /// Starts counting container `id`'s kills in `counter`.
    pub fn watch(&self, id: &str, counter: PathBuf) {
        self.lock().insert(id.to_owned(), (counter, 0));
    }

    /// Stops counting container `id`'s kills.
    pub fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Whether the count grew since the last look (which it records).
    pub fn new_kills(&self, id: &str) -> bool {
        let mut watches = self.lock();
        let Some((events, seen)) = watches.get_mut(id) else {
            return false;
        };
        let now = oom_kills(&std::fs::read_to_string(events).unwrap_or_default());
        let grew = now > *seen;
        *seen = now.max(*seen);
        grew
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (PathBuf, u64)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_write_to_the_watched_file_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join("memory.events");
        std::fs::write(&events, "oom_kill 0\n").unwrap();
        let mut notifier = OomNotifier::open(&events, true).unwrap();
        std::fs::write(&events, "oom_kill 1\n").unwrap();
        notifier.changed().await.unwrap();
    }

    #[tokio::test]
    async fn a_missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("memory.events");
        let e = OomNotifier::open(&gone, true).unwrap_err().to_string();
        assert!(e.contains("memory.events"), "{e}");
        let e = OomNotifier::open(&dir.path().join("memory.oom_control"), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("memory.oom_control"), "{e}");
    }
}
