//! What the fault tests need beyond the common fixtures: crashing the agent for real,
//! restarting it with another environment, finding CRIU by its arguments, and small tmpfs
//! mounts that fill up.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{proc_state, S3Server, TestAgent, Workload, CTL};

/// Environment variable that arms the agent's test failpoints.
pub const FAILPOINTS: &str = "KYBERNATE_FAILPOINTS";

/// The workload runs: not stopped, and its counter moves.
pub fn assert_running(workload: &Workload) {
    let state = proc_state(workload.pid);
    assert!(
        matches!(state, Some('R' | 'S' | 'D')),
        "workload {} is in state {state:?}",
        workload.pid
    );
    let now = workload.read().unwrap().counter;
    workload.wait_for(|s| s.counter > now + 2);
}

/// Restores `name` (with `from`, e.g. `["--from", "nvme"]`), checks the workload continues
/// from its dump with its memory intact; returns the restore's reply.
pub fn restore_and_verify(
    agent: &TestAgent,
    workload: &mut Workload,
    name: &str,
    from: &[&str],
) -> serde_json::Value {
    let at_dump = workload.read().unwrap();
    let mut args = vec!["restore", name];
    args.extend_from_slice(from);
    let restored = agent.ctl_json(&args);
    workload.restored_as(super::pid_of(&restored));
    let after = workload.wait_for(|s| s.counter > at_dump.counter);
    assert_eq!(
        after.epoch, at_dump.epoch,
        "a restarted process has a new epoch"
    );
    assert!(
        workload.verify_memory().memory_ok,
        "memory intact after restore"
    );
    restored
}

/// The tiers `list` shows holding `name`, as a sorted list.
pub fn tiers_of(entry: &serde_json::Value) -> Vec<String> {
    let mut tiers: Vec<String> = entry["tiers"]
        .as_array()
        .unwrap_or_else(|| panic!("no tiers in {entry}"))
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect();
    tiers.sort();
    tiers
}

/// Every file under `dir` (recursively), none when it does not exist.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

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

    /// Replaces the agent's config file (read again at the next start, reloaded live).
    pub fn write_config(&self, config: &str) {
        std::fs::write(self.dir.path().join("agent.toml"), config).unwrap();
    }

    /// The NVMe tier's directory.
    pub fn nvme_root(&self) -> PathBuf {
        self.state_dir().join("nvme")
    }

    /// Chunk files the NVMe tier holds, half-written ones included.
    pub fn nvme_chunk_files(&self) -> Vec<PathBuf> {
        files_under(&self.nvme_root().join("chunks"))
    }

    /// Restore scratch copies (`.staging-*`) in the RAM tier.
    pub fn staging_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.ram_root())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".staging-"))
            .map(|e| e.path())
            .collect()
    }

    /// Waits until the agent's log contains `text`.
    pub fn wait_for_log(&self, text: &str) {
        super::eventually(&format!("the agent logs {text:?}"), || {
            self.log().contains(text)
        });
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

impl S3Server {
    /// Stops the server as an outage would: the process is killed, its data stays.
    pub fn stop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }

    /// Starts the server again on the same address and data.
    pub fn restart(&mut self) {
        self.stop();
        let addr = self.endpoint.trim_start_matches("http://").to_owned();
        let (process, ready) = super::spawn_s3(self.dir.path(), &addr);
        assert_eq!(ready, addr, "the S3 server came back elsewhere");
        self.process = process;
    }

    /// Multipart uploads the server holds unfinished. s3s-fs does not serve
    /// ListMultipartUploads; it keeps each open upload as `.upload-<id>.json` (and its parts as
    /// `.upload_id-<id>.part-<n>`) in its root, so those files are the list.
    pub fn unfinished_uploads(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".upload-") || n.starts_with(".upload_id-"))
            .collect()
    }

    /// This server's `[s3]` section with quick retries, so an outage fails in about a second.
    pub fn agent_config_failing_fast(&self) -> String {
        format!(
            "{}max_attempts = 2\nretry_base_ms = 50\nconnect_timeout_secs = 1\n",
            self.agent_config()
        )
    }
}
