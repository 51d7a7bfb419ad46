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
#[derive(Debug, Default)]
pub struct TokioCommandRunner;

impl CommandRunner for TokioCommandRunner {
    fn run(
        &self,
        program: PathBuf,
        args: Vec<OsString>,
        timeout: Duration,
    ) -> BoxFuture<'static, io::Result<CommandOutcome>> {
        Box::pin(async move {
            let mut child = tokio::process::Command::new(&program)
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            let stderr = child.stderr.take();
            let read_stderr = async move {
                let mut text = String::new();
                if let Some(mut pipe) = stderr {
                    use tokio::io::AsyncReadExt;
                    let _ = pipe.read_to_string(&mut text).await;
                }
                text
            };
            let waited = tokio::time::timeout(timeout, async {
                let (status, stderr) = tokio::join!(child.wait(), read_stderr);
                status.map(|status| CommandOutcome::Exited { status, stderr })
            })
            .await;
            match waited {
                Ok(outcome) => outcome,
                Err(_) => {
                    child.kill().await?;
                    Ok(CommandOutcome::TimedOut)
                }
            }
        })
    }
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
}
