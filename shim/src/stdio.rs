//! Standard streams of container processes. containerd hands the shim FIFO paths (or
//! `file://` URIs); like the stock runc shim, the container gets pipes and the shim copies
//! between them and the FIFOs, so a reader going away never kills the container. With a
//! terminal, runc hands the pty master over a console socket.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Result, ShimError};
use crate::runc_cli::CommandStdio;

/// Where containerd wants a process's streams.
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    /// stdin FIFO (empty: none).
    pub stdin: String,
    /// stdout FIFO or `file://` URI (empty: discarded).
    pub stdout: String,
    /// stderr FIFO or `file://` URI (empty: discarded).
    pub stderr: String,
    /// Allocate a pty.
    pub terminal: bool,
    /// Owner (uid, gid) of the process's ends of its pipes (runtime options `IoUid` and
    /// `IoGid`); root's when `None`.
    pub owner: Option<(u32, u32)>,
}

/// The shim's end of a process's streams, kept for CloseIO and ResizePty.
#[derive(Debug, Default)]
pub struct ProcessIo {
    /// Write side of the container's stdin; dropping it is CloseIO.
    pub stdin: Arc<Mutex<Option<File>>>,
    /// pty master, when the process has a terminal.
    pub console: Option<Arc<File>>,
}

/// Streams being set up for one runc command.
#[derive(Debug)]
pub struct PreparedIo {
    paths: StdioPaths,
    id: String,
    io: ProcessIo,
    console: Option<(PathBuf, std::thread::JoinHandle<std::io::Result<OwnedFd>>)>,
}

static SOCKETS: AtomicU64 = AtomicU64::new(0);

impl PreparedIo {
    /// Sets up the streams for a process of container `id`; the returned [`CommandStdio`]
    /// goes to runc, and `console_socket` (with a terminal) to its `--console-socket`.
    pub fn new(id: &str, paths: &StdioPaths) -> Result<(Self, CommandStdio)> {
        let io_err = |what: &str, e| ShimError::io(id, what.to_owned(), e);
        let mut prepared = PreparedIo {
            paths: paths.clone(),
            id: id.to_owned(),
            io: ProcessIo::default(),
            console: None,
        };
        if paths.terminal {
            let n = SOCKETS.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir()
                .join(format!("kybernate-console-{}-{n}.sock", std::process::id()));
            let _ = std::fs::remove_file(&path);
            let listener =
                UnixListener::bind(&path).map_err(|e| io_err("bind console socket", e))?;
            let handle = std::thread::spawn(move || receive_master(&listener));
            prepared.console = Some((path, handle));
            let null = |write: bool| {
                OpenOptions::new()
                    .read(!write)
                    .write(write)
                    .open("/dev/null")
                    .map_err(|e| io_err("open /dev/null", e))
            };
            let stdio = CommandStdio {
                stdin: Some(null(false)?),
                stdout: Some(null(true)?),
                stderr: Some(null(true)?),
            };
            return Ok((prepared, stdio));
        }
        let stdin = if paths.stdin.is_empty() {
            File::open("/dev/null").map_err(|e| io_err("open /dev/null", e))?
        } else {
            let (r, w) = pipe().map_err(|e| io_err("create stdin pipe", e))?;
            own(&r, paths.owner).map_err(|e| io_err("chown stdin pipe (IoUid/IoGid)", e))?;
            *lock(&prepared.io.stdin) = Some(w);
            let target = prepared.io.stdin.clone();
            let fifo = paths.stdin.clone();
            std::thread::spawn(move || copy_stdin(&fifo, &target));
            r
        };
        let stdout = output_end(id, &paths.stdout, paths.owner)?;
        let stderr = output_end(id, &paths.stderr, paths.owner)?;
        Ok((
            prepared,
            CommandStdio {
                stdin: Some(stdin),
                stdout: Some(stdout),
                stderr: Some(stderr),
            },
        ))
    }

    /// The console socket runc must connect to, with a terminal.
    pub fn console_socket(&self) -> Option<&Path> {
        self.console.as_ref().map(|(p, _)| p.as_path())
    }

    /// After runc returned: takes the pty master (with a terminal) and starts copying.
    pub fn finish(self) -> Result<ProcessIo> {
        let mut io = self.io;
        if let Some((path, handle)) = self.console {
            let _ = std::fs::remove_file(&path);
            let master = handle
                .join()
                .map_err(|_| ShimError::State {
                    id: self.id.clone(),
                    message: "console socket thread panicked".into(),
                })?
                .map_err(|e| ShimError::io(&self.id, "receive the pty master from runc", e))?;
            let master = Arc::new(File::from(master));
            if !self.paths.stdin.is_empty() {
                let writer = master
                    .try_clone()
                    .map_err(|e| ShimError::io(&self.id, "dup pty master", e))?;
                *lock(&io.stdin) = Some(writer);
                let target = io.stdin.clone();
                let fifo = self.paths.stdin.clone();
                std::thread::spawn(move || copy_stdin(&fifo, &target));
            }
            let reader = master
                .try_clone()
                .map_err(|e| ShimError::io(&self.id, "dup pty master", e))?;
            let out = self.paths.stdout.clone();
            std::thread::spawn(move || copy_output(reader, &out));
            io.console = Some(master);
        }
        Ok(io)
    }

    /// When runc failed: releases the console socket.
    pub fn abandon(self) {
        if let Some((path, _)) = self.console {
            // Unblocks the accepting thread.
            let _ = std::os::unix::net::UnixStream::connect(&path);
            let _ = std::fs::remove_file(&path);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Gives a pipe end to `owner` (IoUid/IoGid), so a container process running as that user
/// can reopen it through /proc/self/fd.
fn own(end: &File, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    let Some((uid, gid)) = owner else {
        return Ok(());
    };
    // SAFETY: `end` is an open descriptor for the duration of the call.
    let rc = unsafe { libc::fchown(end.as_raw_fd(), uid, gid) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn pipe() -> std::io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

/// The container-side write end for an output stream; a thread copies into `target`.
fn output_end(id: &str, target: &str, owner: Option<(u32, u32)>) -> Result<File> {
    if target.is_empty() {
        return OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .map_err(|e| ShimError::io(id, "open /dev/null", e));
    }
    if target.starts_with("binary://") {
        return Err(ShimError::Invalid {
            id: id.to_owned(),
            message: format!("log driver {target} is not supported; use a FIFO or file://"),
        });
    }
    let (r, w) = pipe().map_err(|e| ShimError::io(id, "create output pipe", e))?;
    own(&w, owner).map_err(|e| ShimError::io(id, "chown output pipe (IoUid/IoGid)", e))?;
    let target = target.to_owned();
    std::thread::spawn(move || copy_output(r, &target));
    Ok(w)
}

/// Opens an output FIFO (or file) for writing without waiting for a reader: a read end is
/// held while opening, as a FIFO opened write-only blocks until someone reads.
fn open_output(target: &str) -> std::io::Result<File> {
    if let Some(path) = target.strip_prefix("file://") {
        if let Some(parent) = Path::new(path).parent() {
            std::fs::create_dir_all(parent)?;
        }
        return OpenOptions::new().create(true).append(true).open(path);
    }
    let keep = OpenOptions::new().read(true).write(true).open(target)?;
    let file = OpenOptions::new().write(true).open(target)?;
    drop(keep);
    Ok(file)
}

fn copy_output(mut from: File, target: &str) {
    let mut to = open_output(target).ok();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(w) = to.as_mut() {
                    if w.write_all(&buf[..n]).is_err() {
                        // The reader went away: keep draining so the container never blocks.
                        to = None;
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

fn copy_stdin(fifo: &str, target: &Mutex<Option<File>>) {
    let Ok(mut from) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(fifo)
    else {
        return;
    };
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let mut guard = lock(target);
                let Some(w) = guard.as_mut() else { return };
                if w.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    // EOF from containerd's side: the container sees EOF too (unless it is a pty).
    if let Some(w) = lock(target).take() {
        if w.as_raw_fd() >= 0 {
            drop(w);
        }
    }
}

/// Accepts runc's connection on the console socket and takes the pty master it sends.
fn receive_master(listener: &UnixListener) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let (stream, _) = listener.accept()?;
    let mut name = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut name)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    for cmsg in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            if let Some(fd) = fds.first() {
                // SAFETY: the kernel installed this descriptor for us with SCM_RIGHTS; we own it.
                return Ok(unsafe { OwnedFd::from_raw_fd(*fd) });
            }
        }
    }
    Err(std::io::Error::other(
        "runc connected to the console socket but sent no pty master",
    ))
}

/// Sets a pty's window size.
pub fn resize(console: &File, width: u32, height: u32) -> std::io::Result<()> {
    let size = libc::winsize {
        ws_row: u16::try_from(height).unwrap_or(u16::MAX),
        ws_col: u16::try_from(width).unwrap_or(u16::MAX),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(console.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_reaches_a_file_uri_and_stdin_closes() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sub/out.log");
        let paths = StdioPaths {
            stdout: format!("file://{}", log.display()),
            ..Default::default()
        };
        let (prepared, stdio) = PreparedIo::new("c1", &paths).unwrap();
        let mut out = stdio.stdout.unwrap();
        out.write_all(b"hello\n").unwrap();
        drop(out);
        let io = prepared.finish().unwrap();
        assert!(lock(&io.stdin).is_none());
        for _ in 0..200 {
            if std::fs::read_to_string(&log).unwrap_or_default() == "hello\n" {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("output never reached {}", log.display());
    }

    #[test]
    fn binary_log_uris_are_refused_by_name() {
        let paths = StdioPaths {
            stdout: "binary:///usr/bin/logger".into(),
            ..Default::default()
        };
        let e = PreparedIo::new("c2", &paths).unwrap_err().to_string();
        assert!(
            e.contains("binary:///usr/bin/logger") && e.contains("c2"),
            "{e}"
        );
    }
}
