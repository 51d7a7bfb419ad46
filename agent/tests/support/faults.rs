//! What the fault tests need beyond the common fixtures: crashing the agent for real,
//! restarting it with another environment, finding CRIU by its arguments, and small tmpfs
//! mounts that fill up.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{TestAgent, CTL};

impl TestAgent {
    /// SIGKILLs the agent, as a crash would, and reaps it.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the agent to end by itself (a failpoint killed it) and returns how it ended.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.process.take().expect("the agent was started");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not end: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the agent again on the same state, with `env` instead of the environment it
    /// was started with.
    pub fn relaunch_with_env(&mut self, env: &[(&str, &str)]) {
        self.kill_hard();
        self.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.launch();
    }

    /// Starts `kybernatectl args...` without waiting for it.
    pub fn ctl_spawn(&self, args: &[&str]) -> Child {
        Command::new(CTL)
            .arg("--socket")
            .arg(&self.socket)
            .args(["--output", "json"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kybernatectl")
    }

    /// The RAM tier's directory.
    pub fn ram_root(&self) -> PathBuf {
        self.state_dir().join("ram")
    }

    /// The entry `list` shows for `name`, if any.
    pub fn listed(&self, name: &str) -> Option<serde_json::Value> {
        self.ctl_json(&["list"])
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
    }
}

/// PIDs of the processes that have `arg` as one of their arguments.
pub fn processes_with_arg(arg: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.split(|b| *b == 0).any(|a| a == arg.as_bytes()) {
            found.push(pid);
        }
    }
    found
}

/// Polls (every 2 ms, CRIU phases are short) until some process has `arg` as an argument.
pub fn wait_for_process_with_arg(arg: &str, timeout: Duration) -> Vec<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let pids = processes_with_arg(arg);
        if !pids.is_empty() {
            return pids;
        }
        assert!(
            Instant::now() < deadline,
            "no process with argument {arg} appeared"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Sends `signal` to every PID.
pub fn signal_all(pids: &[i32], signal: i32) {
    for &pid in pids {
        // SAFETY: kill(2) with a valid signal.
        unsafe { libc::kill(pid, signal) };
    }
}

/// A small tmpfs, unmounted on drop.
pub struct SmallMount {
    pub path: PathBuf,
}

impl SmallMount {
    /// Mounts a tmpfs of `size` (e.g. `8m`) at `path`.
    pub fn new(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a {size} tmpfs at {} failed",
            path.display()
        );
        Self {
            path: path.to_owned(),
        }
    }
}

impl Drop for SmallMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
