//! The CRIU runner actor: builds CRIU command lines for bare process trees, runs them with a
//! deadline and turns CRIU's log into errors a person can act on.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::command::{CommandOutcome, CommandRunner};

/// Oldest CRIU that works on current kernels (4.1 fails on inet sockets since Linux 6.16).
pub const MIN_CRIU_VERSION: (u32, u32) = (4, 2);

/// A CRIU operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CriuError {
    /// CRIU is missing or too old.
    #[error("CRIU is not usable: {0}")]
    Unavailable(String),
    /// CRIU could not be started.
    #[error("cannot start {program}: {message}")]
    Spawn {
        /// The CRIU binary.
        program: String,
        /// The OS error.
        message: String,
    },
    /// CRIU ran and failed.
    #[error("criu {op} failed ({status}): {detail} (full log: {})", log.display())]
    Failed {
        /// "dump" or "restore".
        op: &'static str,
        /// Exit status.
        status: String,
        /// CRIU's error lines.
        detail: String,
        /// CRIU's log file.
        log: PathBuf,
    },
    /// CRIU ran past its deadline and was killed.
    #[error("criu {op} timed out after {} ms and was stopped (log: {})", after.as_millis(), log.display())]
    TimedOut {
        /// "dump" or "restore".
        op: &'static str,
        /// The deadline.
        after: Duration,
        /// CRIU's log file.
        log: PathBuf,
    },
}

impl CriuError {
    /// Label for failure metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            CriuError::Unavailable(_) => "criu_unavailable",
            CriuError::Spawn { .. } => "criu_spawn",
            CriuError::Failed { .. } => "criu_failed",
            CriuError::TimedOut { .. } => "timeout",
        }
    }
}

/// Dump a process tree into a directory.
#[derive(Debug, Message)]
#[rtype(result = "Result<Duration, CriuError>")]
pub struct Dump {
    /// Root of the tree.
    pub pid: i32,
    /// Empty directory for the images.
    pub images_dir: PathBuf,
    /// Log file to write.
    pub log: PathBuf,
    /// Keep the tree running after the dump.
    pub leave_running: bool,
    /// The tree does not lead its own session (started from a shell or a terminal).
    pub shell_job: bool,
    /// Deadline of the dump.
    pub timeout: Duration,
    /// Hand the images to the data plane over CRIU's image-streamer socket in `images_dir`
    /// (`--stream`) instead of writing them as files, with this action script, whose
    /// post-dump step waits until the data plane has committed the checkpoint.
    pub stream_commit: Option<PathBuf>,
}

/// Restore a process tree from a directory, detached from CRIU.
#[derive(Debug, Message)]
#[rtype(result = "Result<Restored, CriuError>")]
pub struct Restore {
    /// Directory holding the images.
    pub images_dir: PathBuf,
    /// Log file to write.
    pub log: PathBuf,
    /// Same as the dump's flag.
    pub shell_job: bool,
    /// Deadline of the restore.
    pub timeout: Duration,
    /// Read the images from the data plane over CRIU's image-streamer socket in
    /// `images_dir` (`--stream`), with this action script, which fails CRIU's post-restore
    /// step (so the tree is killed before it runs) when a streamed chunk failed its check.
    pub stream_check: Option<PathBuf>,
}

/// A successful restore.
#[derive(Debug, Clone, Copy)]
pub struct Restored {
    /// PID of the restored tree's root.
    pub pid: i32,
    /// How long CRIU took.
    pub duration: Duration,
}

/// Options shared by dump and restore: what a typical workload holds open.
const COMMON_OPTIONS: [&str; 4] = [
    "--tcp-established",
    "--file-locks",
    "--ext-unix-sk",
    "--link-remap",
];

/// Runs CRIU for the agent. Runs in parallel for different workloads; each container actor
/// serialises its own operations.
#[derive(Debug)]
pub struct CriuRunner {
    program: PathBuf,
    runner: Arc<dyn CommandRunner>,
    availability: Result<(), String>,
}

impl CriuRunner {
    /// A runner for the CRIU at `program`; `availability` is the outcome of [`probe`].
    pub fn new(
        program: PathBuf,
        runner: Arc<dyn CommandRunner>,
        availability: Result<(), String>,
    ) -> Self {
        Self {
            program,
            runner,
            availability,
        }
    }

    fn check_available(&self) -> Result<(), CriuError> {
        self.availability.clone().map_err(CriuError::Unavailable)
    }
}

impl Actor for CriuRunner {
    type Context = Context<Self>;
}

fn log_args(log: &Path) -> Vec<OsString> {
    let dir = log.parent().unwrap_or(Path::new("/"));
    let file = log.file_name().unwrap_or_default();
    vec![
        "-W".into(),
        dir.into(),
        "-o".into(),
        file.into(),
        // Errors and warnings only: debug logging (-v4) lengthens the freeze measurably.
        "-v2".into(),
    ]
}

/// Command line of a dump.
pub fn dump_args(job: &Dump) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "dump".into(),
        "-t".into(),
        job.pid.to_string().into(),
        "-D".into(),
        job.images_dir.clone().into(),
    ];
    args.extend(log_args(&job.log));
    args.extend(COMMON_OPTIONS.iter().map(OsString::from));
    if job.leave_running {
        args.push("--leave-running".into());
    }
    if job.shell_job {
        args.push("--shell-job".into());
    }
    if let Some(script) = &job.stream_commit {
        args.push("--stream".into());
        args.push("--action-script".into());
        args.push(script.into());
    }
    args
}

/// Command line of a restore, writing the root PID to `pidfile`.
pub fn restore_args(job: &Restore, pidfile: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "restore".into(),
        "-D".into(),
        job.images_dir.clone().into(),
        "--restore-detached".into(),
        "--pidfile".into(),
        pidfile.into(),
    ];
    args.extend(log_args(&job.log));
    args.extend(COMMON_OPTIONS.iter().map(OsString::from));
    if job.shell_job {
        args.push("--shell-job".into());
    }
    if let Some(script) = &job.stream_check {
        args.push("--stream".into());
        args.push("--action-script".into());
        args.push(script.into());
    }
    args
}

impl Handler<Dump> for CriuRunner {
    type Result = ResponseFuture<Result<Duration, CriuError>>;

    fn handle(&mut self, job: Dump, _: &mut Self::Context) -> Self::Result {
        if let Err(e) = self.check_available() {
            return Box::pin(async move { Err(e) });
        }
        let args = dump_args(&job);
        let run = self.runner.run(self.program.clone(), args, job.timeout);
        let program = self.program.clone();
        Box::pin(async move {
            let started = Instant::now();
            let outcome = run.await;
            check_outcome("dump", &program, outcome, &job.log, job.timeout)?;
            Ok(started.elapsed())
        })
    }
}

impl Handler<Restore> for CriuRunner {
    type Result = ResponseFuture<Result<Restored, CriuError>>;

    fn handle(&mut self, job: Restore, _: &mut Self::Context) -> Self::Result {
        if let Err(e) = self.check_available() {
            return Box::pin(async move { Err(e) });
        }
        let pidfile = job.log.with_extension("pid");
        let _ = std::fs::remove_file(&pidfile);
        let args = restore_args(&job, &pidfile);
        let run = self.runner.run(self.program.clone(), args, job.timeout);
        let program = self.program.clone();
        Box::pin(async move {
            let started = Instant::now();
            let outcome = run.await;
            check_outcome("restore", &program, outcome, &job.log, job.timeout)?;
            let duration = started.elapsed();
            let text = std::fs::read_to_string(&pidfile).unwrap_or_default();
            let pid = text.trim().parse::<i32>().map_err(|_| CriuError::Failed {
                op: "restore",
                status: "exit status 0".into(),
                detail: format!("no restored PID in {}", pidfile.display()),
                log: job.log.clone(),
            })?;
            Ok(Restored { pid, duration })
        })
    }
}

fn check_outcome(
    op: &'static str,
    program: &Path,
    outcome: std::io::Result<CommandOutcome>,
    log: &Path,
    timeout: Duration,
) -> Result<(), CriuError> {
    match outcome {
        Err(e) => Err(CriuError::Spawn {
            program: program.display().to_string(),
            message: e.to_string(),
        }),
        Ok(CommandOutcome::TimedOut) => Err(CriuError::TimedOut {
            op,
            after: timeout,
            log: log.to_owned(),
        }),
        Ok(CommandOutcome::Exited { status, .. }) if status.success() => Ok(()),
        Ok(CommandOutcome::Exited { status, stderr }) => Err(CriuError::Failed {
            op,
            status: status.to_string(),
            detail: error_lines(log, &stderr),
            log: log.to_owned(),
        }),
    }
}

/// Lines CRIU writes at error level on every run here that are not the cause of anything.
const KNOWN_WARNINGS: [&str; 1] = ["rlimit: Can't setup RLIMIT_NOFILE"];

/// CRIU's closing lines that only say that it failed, not why.
const SUMMARY_LINES: [&str; 2] = ["Restoring FAILED", "Dumping FAILED"];

/// The cause of a failure from CRIU's log (or its stderr when it died before logging): the
/// last error line that is neither a known warning nor a closing summary; without one, the
/// last line that is not a known warning.
fn error_lines(log: &Path, stderr: &str) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text
        .lines()
        .chain(stderr.lines())
        .map(str::trim)
        .filter(|l| !l.is_empty() && !KNOWN_WARNINGS.iter().any(|w| l.contains(w)))
        .collect();
    let is_cause = |l: &str| l.contains("Error") && !SUMMARY_LINES.iter().any(|s| l.contains(s));
    all.iter()
        .rev()
        .find(|l| is_cause(l))
        .or_else(|| all.last())
        .map_or_else(|| "CRIU wrote no error message".into(), |l| (*l).to_owned())
}

/// Checks that `program` is a CRIU of at least [`MIN_CRIU_VERSION`].
pub fn probe(program: &Path) -> Result<String, String> {
    let output = std::process::Command::new(program)
        .arg("--version")
        .output()
        .map_err(|e| {
            format!(
                "cannot run {}: {e}; install CRIU 4.2+ (scripts/install-deps.sh)",
                program.display()
            )
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .ok_or_else(|| format!("{} printed no CRIU version", program.display()))?
        .trim()
        .to_owned();
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if found < MIN_CRIU_VERSION {
        return Err(format!(
            "{} is CRIU {version}; Kybernate needs 4.2 or newer",
            program.display()
        ));
    }
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::fake::RecordingRunner;

    fn dump(leave_running: bool, shell_job: bool) -> Dump {
        Dump {
            pid: 4242,
            images_dir: "/ram/.partial-cp".into(),
            log: "/state/logs/cp-dump.log".into(),
            leave_running,
            shell_job,
            timeout: Duration::from_secs(1),
            stream_commit: None,
        }
    }

    #[test]
    fn dump_command_line() {
        let args: Vec<String> = dump_args(&dump(true, false))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args.join(" "),
            "dump -t 4242 -D /ram/.partial-cp -W /state/logs -o cp-dump.log -v2 \
             --tcp-established --file-locks --ext-unix-sk --link-remap --leave-running"
        );
        let args = dump_args(&dump(false, true));
        assert!(args.iter().any(|a| a == "--shell-job"));
        assert!(!args.iter().any(|a| a == "--leave-running"));
        assert!(!args.iter().any(|a| a == "--stream"));
        let streamed = Dump {
            stream_commit: Some("/ram/.partial-cp/stream-commit.sh".into()),
            ..dump(false, false)
        };
        let args: Vec<String> = dump_args(&streamed)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert!(
            args.join(" ")
                .ends_with("--stream --action-script /ram/.partial-cp/stream-commit.sh"),
            "{args:?}"
        );
    }

    #[test]
    fn a_streamed_restore_runs_the_stream_check() {
        let job = Restore {
            images_dir: "/ram/.stream-restore-cp".into(),
            log: "/state/logs/cp-restore.log".into(),
            shell_job: false,
            timeout: Duration::from_secs(1),
            stream_check: Some("/ram/.stream-restore-cp/stream-check".into()),
        };
        let args: Vec<String> = restore_args(&job, Path::new("/state/logs/cp-restore.pid"))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert!(
            args.join(" ")
                .ends_with("--stream --action-script /ram/.stream-restore-cp/stream-check"),
            "{args:?}"
        );
    }

    #[actix_rt::test]
    async fn failures_name_the_operation() {
        let runner = Arc::new(RecordingRunner {
            exit_code: Some(1),
            ..Default::default()
        });
        let actor = CriuRunner::new("criu".into(), runner.clone(), Ok(())).start();
        let err = actor.send(dump(false, false)).await.unwrap().unwrap_err();
        assert!(err.to_string().starts_with("criu dump failed"), "{err}");
        assert_eq!(runner.calls.lock().unwrap().len(), 1);

        let timing_out = Arc::new(RecordingRunner::default());
        let actor = CriuRunner::new("criu".into(), timing_out, Ok(())).start();
        let err = actor.send(dump(false, false)).await.unwrap().unwrap_err();
        assert_eq!(err.metric_label(), "timeout");

        let missing = Arc::new(RecordingRunner::default());
        let actor =
            CriuRunner::new("criu".into(), missing.clone(), Err("criu not found".into())).start();
        let err = actor.send(dump(false, false)).await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), "CRIU is not usable: criu not found");
        assert!(missing.calls.lock().unwrap().is_empty());
    }

    #[test]
    fn the_cause_is_the_last_real_error_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("restore.log");
        std::fs::write(
            &log,
            "Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n\
             Error (criu/cr-restore.c:1237): Can't fork for 25073: File exists\n\
             Error (criu/cr-restore.c:2331): Restoring FAILED.\n",
        )
        .unwrap();
        assert_eq!(
            error_lines(&log, ""),
            "Error (criu/cr-restore.c:1237): Can't fork for 25073: File exists"
        );
        // Killed before it logged anything but the harmless warning.
        std::fs::write(
            &log,
            "Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n",
        )
        .unwrap();
        assert_eq!(error_lines(&log, ""), "CRIU wrote no error message");
        assert_eq!(
            error_lines(&log, "pie: 123: Trimmed message received (12/0)\n"),
            "pie: 123: Trimmed message received (12/0)"
        );
        assert_eq!(
            error_lines(&dir.path().join("missing.log"), "criu: cannot open\n"),
            "criu: cannot open"
        );
    }

    #[test]
    fn probe_names_a_missing_binary() {
        let err = probe(Path::new("/nonexistent/criu")).unwrap_err();
        assert!(err.contains("/nonexistent/criu"), "{err}");
    }
}
