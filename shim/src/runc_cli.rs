//! Runs the runc binary. The shim is a subreaper whose SIGCHLD handler reaps every child,
//! so runc's exit status comes from the shim library's exit monitor, not from `wait`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use containerd_shim::monitor::{monitor_subscribe, monitor_unsubscribe, Subject, Topic};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::error::{Result, ShimError};

/// Standard streams handed to a runc command (and through it to the container process).
#[derive(Debug, Default)]
pub struct CommandStdio {
    /// The container's stdin.
    pub stdin: Option<std::fs::File>,
    /// The container's stdout.
    pub stdout: Option<std::fs::File>,
    /// The container's stderr.
    pub stderr: Option<std::fs::File>,
}

/// Runs one command to its end: the seam between the shim's orderings (what runs when, what
/// is rolled back) and real processes, so that those orderings are tested without root.
#[async_trait]
pub trait Spawner: Send + Sync + std::fmt::Debug {
    /// Runs `command`; an `Err` means it could not be started at all.
    async fn run_to_end(&self, command: CommandLine) -> std::io::Result<RuncOutput>;
}

/// One command for a [`Spawner`].
#[derive(Debug)]
pub struct CommandLine {
    /// The program.
    pub binary: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Its streams; those left `None` are captured (stdout, stderr) or null (stdin).
    pub stdio: CommandStdio,
    /// Killed with its process group past this.
    pub deadline: Option<Duration>,
    /// Runs under umask 077, so that the files it creates (CRIU's images of a container's
    /// memory, written by `runc checkpoint`) are readable by root only. Not for commands
    /// that start a container: its process would inherit the umask.
    pub private_files: bool,
}

impl CommandLine {
    /// The arguments as text, for messages and tests.
    pub fn words(&self) -> Vec<String> {
        self.args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }
}

/// The real [`Spawner`]: a child process, reaped by the shim's reaper.
#[derive(Debug, Default)]
pub struct ProcessSpawner;

#[async_trait]
impl Spawner for ProcessSpawner {
    async fn run_to_end(&self, command: CommandLine) -> std::io::Result<RuncOutput> {
        let CommandLine {
            binary,
            args,
            stdio,
            deadline,
            private_files,
        } = command;
        let mut cmd = Command::new(&binary);
        cmd.args(args).env_remove("NOTIFY_SOCKET");
        if private_files {
            // SAFETY: umask(2) is async-signal-safe and touches only the child's own mask.
            unsafe {
                cmd.pre_exec(|| {
                    libc::umask(0o077);
                    Ok(())
                });
            }
        }
        let (capture_out, capture_err) = (stdio.stdout.is_none(), stdio.stderr.is_none());
        cmd.stdin(stdio.stdin.map_or_else(Stdio::null, Stdio::from));
        cmd.stdout(stdio.stdout.map_or_else(Stdio::piped, Stdio::from));
        cmd.stderr(stdio.stderr.map_or_else(Stdio::piped, Stdio::from));
        if deadline.is_some() {
            cmd.process_group(0);
        }
        execute(cmd, capture_out, capture_err, deadline).await
    }
}

/// The runc sub-command whose files hold a container's memory: it runs under umask 077
/// (CRIU writes its images with the default mode, 0644 under the usual umask).
const PRIVATE_FILES_COMMAND: &str = "checkpoint";

/// The runc binary with its global flags.
#[derive(Debug, Clone)]
pub struct RuncCli {
    /// Path or name of the runc binary.
    pub binary: PathBuf,
    /// runc's state root (`--root`).
    pub root: PathBuf,
    /// `--systemd-cgroup`: the container's cgroup is managed through systemd (runtime
    /// option `SystemdCgroup = true`), for every command, as containerd's runc shim does.
    pub systemd_cgroup: bool,
    /// `--criu`: the CRIU binary (runtime option `CriuPath`); runc's default when `None`.
    pub criu: Option<PathBuf>,
    /// `--no-pivot` on create and restore (runtime option `NoPivotRoot`).
    pub no_pivot: bool,
    /// `--no-new-keyring` on create (runtime option `NoNewKeyring`).
    pub no_new_keyring: bool,
    /// What runs the commands.
    pub spawner: Arc<dyn Spawner>,
}

impl Default for RuncCli {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("runc"),
            root: PathBuf::new(),
            systemd_cgroup: false,
            criu: None,
            no_pivot: false,
            no_new_keyring: false,
            spawner: Arc::new(ProcessSpawner),
        }
    }
}

/// What a finished runc command printed.
#[derive(Debug)]
pub struct RuncOutput {
    /// Exit code.
    pub code: i32,
    /// Standard output (empty when stdout went to the container).
    pub stdout: String,
    /// Standard error (empty when stderr went to the container).
    pub stderr: String,
    /// The command ran past its deadline and was killed with its process group.
    pub timed_out: bool,
}

impl RuncCli {
    /// The runc a container created with `options` uses: its binary, state root (a `Root`
    /// option replaces the shim's, keeping the namespace below it), cgroup driver, CRIU and
    /// create flags.
    pub fn for_container(&self, options: &crate::runtime_options::RuncOptions) -> Self {
        let root = match (&options.root, self.root.file_name()) {
            (Some(root), Some(namespace)) => Path::new(root).join(namespace),
            _ => self.root.clone(),
        };
        Self {
            binary: options
                .binary_name
                .as_ref()
                .map_or_else(|| self.binary.clone(), PathBuf::from),
            root,
            systemd_cgroup: options.systemd_cgroup,
            criu: options.criu_path.as_ref().map(PathBuf::from),
            no_pivot: options.no_pivot_root,
            no_new_keyring: options.no_new_keyring,
            spawner: self.spawner.clone(),
        }
    }

    /// The flags `runc create` (`restore: false`) or `runc restore` takes from the runtime
    /// options.
    pub fn create_flags(&self, restore: bool) -> Vec<String> {
        let mut flags = Vec::new();
        if self.no_pivot {
            flags.push("--no-pivot".to_owned());
        }
        if self.no_new_keyring && !restore {
            flags.push("--no-new-keyring".to_owned());
        }
        flags
    }

    /// The global flags before every sub-command.
    pub fn global_args(&self, log: Option<&Path>) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = vec!["--root".into(), self.root.clone().into()];
        if let Some(log) = log {
            args.extend([
                "--log".into(),
                log.into(),
                "--log-format".into(),
                "json".into(),
            ]);
        }
        if self.systemd_cgroup {
            args.push("--systemd-cgroup".into());
        }
        if let Some(criu) = &self.criu {
            args.extend(["--criu".into(), criu.into()]);
        }
        args
    }

    /// runc's status of container `id` (`runc state`: "running", "paused", ...), or `None`
    /// when runc cannot tell.
    pub async fn status(&self, id: &str) -> Option<String> {
        #[derive(serde::Deserialize)]
        struct State {
            status: String,
        }
        let query = ["state".to_owned(), id.to_owned()];
        let out = self.run(id, &query, Default::default(), None).await.ok()?;
        serde_json::from_str::<State>(&out.stdout)
            .ok()
            .map(|s| s.status)
    }

    /// Runs `runc --root ROOT ARGS...` for container `id`; fails with runc's error text when
    /// it exits non-zero. `log` is runc's `--log` file, read for the message when stderr went
    /// to the container.
    pub async fn run(
        &self,
        id: &str,
        args: &[String],
        stdio: CommandStdio,
        log: Option<&Path>,
    ) -> Result<RuncOutput> {
        self.run_within(id, args, stdio, log, None).await
    }

    /// [`RuncCli::run`] with a deadline: runc runs in its own process group, and when the
    /// deadline passes the whole group (runc and the CRIU it started) is killed, so nothing
    /// keeps working on the container after the caller gave up. Fails with
    /// [`ShimError::Timeout`] then.
    pub async fn run_within(
        &self,
        id: &str,
        args: &[String],
        stdio: CommandStdio,
        log: Option<&Path>,
        deadline: Option<Duration>,
    ) -> Result<RuncOutput> {
        let command_name = args.first().cloned().unwrap_or_default();
        let mut words = self.global_args(log);
        words.extend(args.iter().map(std::ffi::OsString::from));
        let output = self
            .spawner
            .run_to_end(CommandLine {
                binary: self.binary.clone(),
                args: words,
                stdio,
                deadline,
                private_files: command_name == PRIVATE_FILES_COMMAND,
            })
            .await
            .map_err(|e| ShimError::io(id, format!("run {}", self.binary.display()), e))?;
        if let (true, Some(deadline)) = (output.timed_out, deadline) {
            return Err(ShimError::Timeout {
                id: id.to_owned(),
                command: command_name,
                millis: u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX),
            });
        }
        if output.code != 0 {
            let mut text = output.stderr.trim().to_owned();
            if let Some(log) = log {
                let logged = last_log_error(log);
                if !logged.is_empty() {
                    text = if text.is_empty() {
                        logged
                    } else {
                        format!("{text}; {logged}")
                    };
                }
            }
            if text.is_empty() {
                text = format!("exit code {}", output.code);
            }
            if self.systemd_cgroup {
                text.push_str(
                    " (runc ran with --systemd-cgroup because the runtime option \
                     SystemdCgroup = true or a cgroupsPath of the form slice:prefix:name asks \
                     for systemd's cgroup driver; systemd must be the host's init)",
                );
            }
            return Err(ShimError::Runc {
                id: id.to_owned(),
                command: command_name,
                output: text,
            });
        }
        Ok(output)
    }
}

/// Spawns `cmd` and waits for its exit through the shim's exit monitor. Past `deadline`
/// the process group led by `cmd` is killed (the caller put it in a group of its own).
pub async fn execute(
    mut cmd: Command,
    capture_out: bool,
    capture_err: bool,
    deadline: Option<Duration>,
) -> std::io::Result<RuncOutput> {
    let subscription = monitor_subscribe(Topic::Pid)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let sub_id = subscription.id;
    let mut rx = subscription.rx;
    let spawned = cmd.spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            let _ = monitor_unsubscribe(sub_id).await;
            return Err(e);
        }
    };
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .unwrap_or_default();
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    drop(cmd);
    let read_out = async {
        let mut text = String::new();
        if let (true, Some(p)) = (capture_out, out_pipe.as_mut()) {
            let _ = p.read_to_string(&mut text).await;
        }
        text
    };
    let read_err = async {
        let mut text = String::new();
        if let (true, Some(p)) = (capture_err, err_pipe.as_mut()) {
            let _ = p.read_to_string(&mut text).await;
        }
        text
    };
    let exit = async {
        while let Some(event) = rx.recv().await {
            if matches!(event.subject, Subject::Pid(p) if p == pid) {
                return event.exit_code;
            }
        }
        -1
    };
    let wait = async {
        let Some(deadline) = deadline else {
            return (exit.await, false);
        };
        tokio::pin!(exit);
        match tokio::time::timeout(deadline, &mut exit).await {
            Ok(code) => (code, false),
            Err(_) => {
                if pid > 0 {
                    // SAFETY: kill(2) with a negative pid signals the process group `pid`
                    // leads; it touches no memory of ours.
                    unsafe {
                        libc::kill(-pid, libc::SIGKILL);
                    }
                }
                (exit.await, true)
            }
        }
    };
    let (stdout, stderr, (code, timed_out)) = tokio::join!(read_out, read_err, wait);
    let _ = monitor_unsubscribe(sub_id).await;
    // Reaped already by the shim's reaper; keep tokio from tracking it.
    drop(child);
    Ok(RuncOutput {
        code,
        stdout,
        stderr,
        timed_out,
    })
}

/// The last `"level":"error"` message in a runc JSON log, or its last line.
pub fn last_log_error(log: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(log) else {
        return String::new();
    };
    let mut last = String::new();
    for line in text.lines() {
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(line) {
            if value.get("level").and_then(|l| l.as_str()) == Some("error") {
                if let Some(msg) = value.get("msg").and_then(|m| m.as_str()) {
                    last = msg.to_owned();
                }
            }
        } else if !line.trim().is_empty() {
            last = line.trim().to_owned();
        }
    }
    last
}

/// Reads a pid file written by runc.
pub fn read_pid(id: &str, path: &Path) -> Result<i32> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ShimError::io(id, format!("read pid file {}", path.display()), e))?;
    text.trim().parse().map_err(|_| ShimError::Invalid {
        id: id.to_owned(),
        message: format!("pid file {} holds {:?}", path.display(), text.trim()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_log_error_takes_the_last_error_message() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log.json");
        std::fs::write(
            &log,
            "{\"level\":\"error\",\"msg\":\"first\"}\n{\"level\":\"info\",\"msg\":\"x\"}\n{\"level\":\"error\",\"msg\":\"container_linux.go: no such file\"}\n",
        )
        .unwrap();
        assert_eq!(last_log_error(&log), "container_linux.go: no such file");
        assert_eq!(last_log_error(&dir.path().join("missing")), "");
    }

    #[test]
    fn systemd_cgroup_is_a_global_flag_before_the_command() {
        let runc = RuncCli {
            root: "/run/r".into(),
            ..RuncCli::default()
        };
        let plain: Vec<String> = runc
            .global_args(Some(Path::new("/b/log.json")))
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            plain,
            [
                "--root",
                "/run/r",
                "--log",
                "/b/log.json",
                "--log-format",
                "json"
            ]
        );
        let systemd = runc.for_container(&crate::runtime_options::RuncOptions {
            systemd_cgroup: true,
            binary_name: Some("/opt/wrapper".into()),
            ..Default::default()
        });
        assert_eq!(systemd.binary, PathBuf::from("/opt/wrapper"));
        let args = systemd.global_args(None);
        assert_eq!(
            args.last().map(|a| a.to_string_lossy().into_owned()),
            Some("--systemd-cgroup".to_owned())
        );
        assert_eq!(systemd.root, runc.root);
        assert!(systemd.create_flags(false).is_empty());
    }

    #[test]
    fn root_criu_and_create_flags_follow_the_runtime_options() {
        let runc = RuncCli {
            root: "/run/kybernate/runc/k8s.io".into(),
            ..RuncCli::default()
        };
        let custom = runc.for_container(&crate::runtime_options::RuncOptions {
            root: Some("/var/run/other".into()),
            criu_path: Some("/opt/criu/bin/criu".into()),
            no_pivot_root: true,
            no_new_keyring: true,
            ..Default::default()
        });
        assert_eq!(custom.root, PathBuf::from("/var/run/other/k8s.io"));
        let args: Vec<String> = custom
            .global_args(None)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "--root",
                "/var/run/other/k8s.io",
                "--criu",
                "/opt/criu/bin/criu"
            ]
        );
        assert_eq!(
            custom.create_flags(false),
            ["--no-pivot", "--no-new-keyring"]
        );
        assert_eq!(custom.create_flags(true), ["--no-pivot"]);
    }

    #[test]
    fn read_pid_refuses_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pid");
        std::fs::write(&file, "123\n").unwrap();
        assert_eq!(read_pid("c", &file).unwrap(), 123);
        std::fs::write(&file, "abc").unwrap();
        let e = read_pid("c", &file).unwrap_err().to_string();
        assert!(e.contains("abc") && e.contains("container c"), "{e}");
    }
}
