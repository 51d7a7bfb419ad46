//! The seam between the agent and the external programs it drives (CRIU): a small trait with
//! the real spawner and, in tests, a recording fake.

use std::ffi::OsString;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

/// A boxed future, as returned by [`CommandRunner::run`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How a finished command ended.
#[derive(Debug)]
pub enum CommandOutcome {
    /// It exited by itself.
    Exited {
        /// Its exit status.
        status: ExitStatus,
        /// What it wrote to stderr (CRIU writes its log to a file; this catches early failures).
        stderr: String,
    },
    /// It ran past its timeout and was killed.
    TimedOut,
}

/// Runs an external program with a deadline.
pub trait CommandRunner: Send + Sync + std::fmt::Debug {
    /// Runs `program args...`, killing it after `timeout`.
    fn run(
        &self,
        program: PathBuf,
        args: Vec<OsString>,
        timeout: Duration,
    ) -> BoxFuture<'static, io::Result<CommandOutcome>>;
}

/// The real spawner, on tokio's process support.
///
/// The program's stderr goes to an anonymous in-memory file, not a pipe: CRIU is left to
/// finish a dump when the agent dies (its dump is then adopted at the next start), and a
/// pipe whose reader died would kill CRIU with SIGPIPE at its next error line.
#[derive(Debug, Default)]
pub struct TokioCommandRunner;

/// Most bytes of a program's stderr kept for its error message (the end, where the cause is).
const STDERR_TAIL: u64 = 64 * 1024;

impl CommandRunner for TokioCommandRunner {
    fn run(
        &self,
        program: PathBuf,
        args: Vec<OsString>,
        timeout: Duration,
    ) -> BoxFuture<'static, io::Result<CommandOutcome>> {
        Box::pin(async move {
            let capture = stderr_file()?;
            let mut child = tokio::process::Command::new(&program)
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(capture.try_clone()?))
                .kill_on_drop(true)
                .spawn()?;
            match tokio::time::timeout(timeout, child.wait()).await {
                Ok(status) => Ok(CommandOutcome::Exited {
                    status: status?,
                    stderr: read_tail(capture),
                }),
                Err(_) => {
                    child.kill().await?;
                    Ok(CommandOutcome::TimedOut)
                }
            }
        })
    }
}

/// An anonymous in-memory file (memfd) for a child's stderr: writes to it never fail because
/// the agent went away, and it vanishes with its last descriptor.
fn stderr_file() -> io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a NUL-terminated name and valid flags has no other
    // preconditions; it returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"kybernate-stderr".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// The last [`STDERR_TAIL`] bytes written to `file`, as text.
fn read_tail(mut file: std::fs::File) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut bytes = Vec::new();
    let read = file
        .seek(SeekFrom::Start(len.saturating_sub(STDERR_TAIL)))
        .and_then(|_| file.take(STDERR_TAIL).read_to_end(&mut bytes));
    if let Err(e) = read {
        tracing::warn!(error = %e, "cannot read a child's stderr");
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
pub(crate) mod fake {
    //! A recording [`CommandRunner`] for unit tests.

    use std::os::unix::process::ExitStatusExt;
    use std::sync::Mutex;

    use super::*;

    /// Records every invocation and answers with a scripted outcome.
    #[derive(Debug, Default)]
    pub struct RecordingRunner {
        /// Program and arguments of each call, in order.
        pub calls: Mutex<Vec<(PathBuf, Vec<String>)>>,
        /// Exit code to answer with; `None` answers "timed out".
        pub exit_code: Option<i32>,
    }

    impl CommandRunner for RecordingRunner {
        fn run(
            &self,
            program: PathBuf,
            args: Vec<OsString>,
            _timeout: Duration,
        ) -> BoxFuture<'static, io::Result<CommandOutcome>> {
            let args = args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            self.calls.lock().unwrap().push((program, args));
            let outcome = match self.exit_code {
                Some(code) => CommandOutcome::Exited {
                    status: ExitStatus::from_raw(code << 8),
                    stderr: String::new(),
                },
                None => CommandOutcome::TimedOut,
            };
            Box::pin(async move { Ok(outcome) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_rt::test]
    async fn real_runner_reports_exit_and_timeout() {
        let runner = TokioCommandRunner;
        let out = runner
            .run(
                "sh".into(),
                vec!["-c".into(), "echo oops >&2; exit 3".into()],
                Duration::from_secs(30),
            )
            .await
            .unwrap();
        match out {
            CommandOutcome::Exited { status, stderr } => {
                assert_eq!(status.code(), Some(3));
                assert_eq!(stderr, "oops\n");
            }
            CommandOutcome::TimedOut => panic!("sh timed out"),
        }
        let out = runner
            .run("sleep".into(), vec!["30".into()], Duration::from_millis(50))
            .await
            .unwrap();
        assert!(matches!(out, CommandOutcome::TimedOut));
        let err = runner
            .run("/nonexistent/criu".into(), vec![], Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    /// A program that outlives the agent's interest in it (the agent died, so the run was
    /// dropped) can still write to its stderr: it is not killed by SIGPIPE.
    #[actix_rt::test]
    async fn stderr_outlives_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let (started, wrote) = (dir.path().join("started"), dir.path().join("wrote"));
        // The grandchild writes to stderr only once the program it belongs to is gone.
        let script = format!(
            "p=$$; (touch {s}; while grep -qv ') Z ' /proc/$p/stat 2>/dev/null; do sleep 0.02; done; \
             echo late >&2; touch {w}) & exec sleep 30",
            s = started.display(),
            w = wrote.display()
        );
        let run = TokioCommandRunner.run(
            "sh".into(),
            vec!["-c".into(), script.into()],
            Duration::from_secs(60),
        );
        tokio::select! {
            _ = run => panic!("sh ended early"),
            () = async {
                while !started.exists() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            } => {}
        }
        // The run is dropped here: sh is killed and nobody reads its stderr any more.
        for _ in 0..3000 {
            if wrote.exists() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the grandchild died writing to stderr");
    }
}
