//! CRIU's post-dump step as the commit point of a streamed dump.
//!
//! When CRIU has written every image it runs its action script for `post-dump`, and only then
//! kills the dumped tree (or, if the script fails, resumes it). Our script blocks on a FIFO in
//! the images directory until the capture has made every chunk durable and written the
//! manifest, and succeeds only if that worked. So in stop mode the workload is never killed
//! before its checkpoint exists, and a store that fails at the very end resumes it instead.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Name of the FIFO in the images directory.
const FIFO: &str = "stream-commit";
/// Name of the action script in the images directory.
const SCRIPT: &str = "stream-commit.sh";
/// What the script waits for to let CRIU finish the dump.
const COMMITTED: &str = "committed";

/// The FIFO, the script and the thread waiting for CRIU to reach its post-dump step.
#[derive(Debug)]
pub(crate) struct CommitBarrier {
    fifo: PathBuf,
    script: PathBuf,
    reached: Arc<AtomicBool>,
    cancelled: Arc<AtomicBool>,
    waiter: Option<JoinHandle<Option<File>>>,
}

impl CommitBarrier {
    /// Creates the FIFO and the script in `dir` and starts waiting; `on_reached` runs once
    /// CRIU's script opens the FIFO.
    pub fn create(dir: &Path, on_reached: impl FnOnce() + Send + 'static) -> io::Result<Self> {
        let fifo = dir.join(FIFO);
        let script = dir.join(SCRIPT);
        for stale in [&fifo, &script] {
            match fs::remove_file(stale) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        let fifo_text = fifo
            .to_str()
            .filter(|p| !p.contains('\''))
            .ok_or_else(|| io::Error::other("the images directory must be UTF-8 without quotes"))?;
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_bytes())
            .map_err(|_| io::Error::other("the images directory contains a NUL byte"))?;
        // SAFETY: `c_path` is a valid NUL-terminated path; mkfifo only creates that node.
        if unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let text = format!(
            "#!/bin/sh\n# Kybernate's dump stream: CRIU may end the dump only once the \
             checkpoint is committed.\n\
             [ \"$CRTOOLS_SCRIPT_ACTION\" = post-dump ] || exit 0\n\
             read verdict < '{fifo_text}' || exit 1\n\
             [ \"$verdict\" = {COMMITTED} ]\n"
        );
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o700)
            .open(&script)
            .and_then(|mut f| f.write_all(text.as_bytes()))?;
        let reached = Arc::new(AtomicBool::new(false));
        let cancelled = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (fifo, reached, cancelled) =
                (fifo.clone(), Arc::clone(&reached), Arc::clone(&cancelled));
            std::thread::Builder::new()
                .name("kyb-stream-barrier".into())
                .spawn(move || {
                    // Blocks until a reader opens the FIFO: CRIU's script, or `finish`.
                    let file = OpenOptions::new().write(true).open(&fifo).ok()?;
                    if cancelled.load(Ordering::SeqCst) {
                        return None;
                    }
                    reached.store(true, Ordering::SeqCst);
                    on_reached();
                    Some(file)
                })?
        };
        Ok(Self {
            fifo,
            script,
            reached,
            cancelled,
            waiter: Some(waiter),
        })
    }

    /// The script to pass to CRIU as `--action-script`.
    pub fn script(&self) -> &Path {
        &self.script
    }

    /// Call once the stream has ended: the FIFO CRIU's script waits on, if CRIU reached its
    /// post-dump step; `None` if it did not (CRIU failed, or the peer was not CRIU).
    pub fn finish(&mut self) -> Option<File> {
        if !self.reached.load(Ordering::SeqCst) {
            self.cancelled.store(true, Ordering::SeqCst);
            // Opening the read side releases the waiter's blocking open.
            let _unblock = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.fifo);
            return self.waiter.take().and_then(|w| w.join().ok()).flatten();
        }
        self.waiter.take().and_then(|w| w.join().ok()).flatten()
    }
}

impl Drop for CommitBarrier {
    fn drop(&mut self) {
        if self.waiter.is_some() {
            drop(self.finish());
        }
        let _ = fs::remove_file(&self.fifo);
        let _ = fs::remove_file(&self.script);
    }
}

/// Tells CRIU's waiting script whether the checkpoint is committed.
pub(crate) fn tell(mut fifo: File, committed: bool) {
    let verdict = if committed { COMMITTED } else { "failed" };
    // A script that is gone (CRIU was killed) makes this fail; nothing is waiting then.
    let _ = writeln!(fifo, "{verdict}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::sync::mpsc::channel;

    fn run_script(script: &Path, action: &str) -> std::process::Child {
        Command::new(script)
            .env("CRTOOLS_SCRIPT_ACTION", action)
            .spawn()
            .unwrap()
    }

    #[test]
    fn the_script_waits_for_the_verdict_at_post_dump_only() {
        let dir = tempfile::tempdir().unwrap();
        for committed in [true, false] {
            let (tx, rx) = channel();
            let mut barrier =
                CommitBarrier::create(dir.path(), move || tx.send(()).unwrap()).unwrap();
            assert!(run_script(barrier.script(), "pre-dump")
                .wait()
                .unwrap()
                .success());
            let mut script = run_script(barrier.script(), "post-dump");
            rx.recv().unwrap();
            let fifo = barrier.finish().expect("CRIU's script reached the barrier");
            tell(fifo, committed);
            assert_eq!(script.wait().unwrap().success(), committed);
        }
    }

    #[test]
    fn a_stream_that_ends_without_post_dump_releases_the_waiter() {
        let dir = tempfile::tempdir().unwrap();
        let mut barrier = CommitBarrier::create(dir.path(), || panic!("not reached")).unwrap();
        assert!(barrier.finish().is_none());
        drop(barrier);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "cleaned up");
    }
}
