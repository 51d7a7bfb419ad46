//! Fixtures for the agent's integration tests: a private agent per test (own state dir on
//! tmpfs, own socket, own metrics port) and sample workloads, all cleaned up on drop.

#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kybernate_sample_workload::Status;

pub mod faults;

pub const AGENT: &str = env!("CARGO_BIN_EXE_kybernate-agent");
pub const CTL: &str = env!("CARGO_BIN_EXE_kybernatectl");
const WAIT: Duration = Duration::from_secs(60);

/// Fails loudly when the test cannot run for real: never a silent pass.
pub fn require_root_and_criu() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests checkpoint real processes with CRIU and must run as root"
    );
    let out = Command::new("criu")
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("criu is not on PATH ({e}); run scripts/install-deps.sh first"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Version: 4."),
        "criu on PATH is not CRIU 4.x: {text}"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private agent process.
pub struct TestAgent {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub metrics_port: u16,
    process: Option<Child>,
    env: Vec<(String, String)>,
}

impl TestAgent {
    pub fn start() -> Self {
        Self::start_with_config("")
    }

    /// An agent with `config` (TOML) as its config file.
    pub fn start_with_config(config: &str) -> Self {
        Self::start_with(config, &[])
    }

    /// An agent with `config` as its config file and `env` in its environment.
    pub fn start_with(config: &str, env: &[(&str, &str)]) -> Self {
        require_root_and_criu();
        let dir = tempfile::Builder::new()
            .prefix("kybernate-test-")
            .tempdir_in("/dev/shm")
            .unwrap();
        let socket = dir.path().join("agent.sock");
        let mut agent = Self {
            dir,
            socket,
            metrics_port: free_port(),
            process: None,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        std::fs::write(agent.dir.path().join("agent.toml"), config).unwrap();
        agent.launch();
        agent
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The NVMe tier's manifest of checkpoint `name` (its commit point).
    pub fn nvme_manifest(&self, name: &str) -> PathBuf {
        self.state_dir().join("nvme").join("manifests").join(name)
    }

    /// The NVMe tier's largest chunk file.
    pub fn largest_nvme_chunk(&self) -> PathBuf {
        fn walk(dir: &Path, out: &mut Vec<(u64, PathBuf)>) {
            for entry in std::fs::read_dir(dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, out);
                } else {
                    out.push((entry.metadata().unwrap().len(), path));
                }
            }
        }
        let mut chunks = Vec::new();
        walk(&self.state_dir().join("nvme").join("chunks"), &mut chunks);
        chunks
            .into_iter()
            .max()
            .expect("the NVMe tier holds chunks")
            .1
    }

    pub fn ram_dir(&self, name: &str) -> PathBuf {
        self.state_dir().join("ram").join(name)
    }

    fn launch(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .unwrap();
        let child = Command::new(AGENT)
            .arg("--config")
            .arg(self.dir.path().join("agent.toml"))
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--socket")
            .arg(&self.socket)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start kybernate-agent");
        self.process = Some(child);
        // The agent binds its socket before start-up recovery, so a connect can succeed before
        // it serves (and before its config watch is in place); an answered request cannot.
        let deadline = Instant::now() + WAIT;
        while !self.ctl(&["list"]).status.success() {
            if let Some(status) = self.process.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "agent never answered on its socket: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Stops the agent gracefully and starts it again on the same state.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.process.take() {
            // SAFETY: kill(2) to our own child.
            unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs kybernatectl against this agent.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(CTL)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run kybernatectl")
    }

    /// Runs kybernatectl with JSON output and expects success.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut full = vec!["--output", "json"];
        full.extend_from_slice(args);
        let out = self.ctl(&full);
        assert!(
            out.status.success(),
            "kybernatectl {args:?} failed: {}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "bad JSON from kybernatectl {args:?}: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Runs kybernatectl and expects a failure; returns its stderr.
    pub fn ctl_err(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            !out.status.success(),
            "kybernatectl {args:?} should have failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// The agent still answers.
    pub fn assert_serving(&self) {
        self.ctl_json(&["list"]);
    }

    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).unwrap();
        body
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A sample workload. Restored copies are no longer our children, so it is tracked by PID.
pub struct Workload {
    pub pid: i32,
    pub status: PathBuf,
    child: Option<Child>,
}

impl Workload {
    pub fn start(dir: &Path, mib: usize, extra: &[&str]) -> Self {
        let status = dir.join(format!("status-{}", rand_suffix()));
        let mut command = Command::new(CTL);
        command
            .args(["workload", "--mib", &mib.to_string(), "--status"])
            .arg(&status)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: setsid() is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let child = command.spawn().expect("start workload");
        let workload = Self {
            pid: i32::try_from(child.id()).unwrap(),
            status,
            child: Some(child),
        };
        workload.wait_for(|s| s.counter >= 5);
        workload
    }

    pub fn read(&self) -> Option<Status> {
        Status::read(&self.status)
    }

    /// Waits until the status satisfies `ready`.
    pub fn wait_for(&self, ready: impl Fn(&Status) -> bool) -> Status {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.read() {
                if ready(&status) {
                    return status;
                }
            }
            assert!(
                Instant::now() < deadline,
                "workload {} made no progress: {:?}",
                self.pid,
                self.read()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asks the workload to verify its memory and returns the verified status.
    pub fn verify_memory(&self) -> Status {
        let before = self.wait_for(|_| true).verified;
        // SAFETY: kill(2) with a valid signal.
        unsafe { libc::kill(self.pid, libc::SIGUSR1) };
        self.wait_for(|s| s.verified > before)
    }

    /// Reaps our child after a dump stopped it; waits until the PID is gone.
    pub fn reap_dumped(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.wait().unwrap();
        }
        let deadline = Instant::now() + WAIT;
        while Path::new(&format!("/proc/{}", self.pid)).exists() {
            assert!(
                Instant::now() < deadline,
                "PID {} did not go away",
                self.pid
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn is_alive(&self) -> bool {
        proc_state(self.pid).is_some_and(|s| s != 'Z')
    }

    /// The process now runs under `pid` (after a restore).
    pub fn restored_as(&mut self, pid: i32) {
        self.pid = pid;
    }

    /// Kills the workload and waits until its PID is free.
    pub fn kill(&mut self) {
        // SAFETY: kill(2) with a valid signal.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        self.reap_dumped();
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        // SAFETY: kill(2) with a valid signal.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

/// One-letter state of a process.
pub fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

fn rand_suffix() -> u32 {
    rand::random()
}

/// The `pid` field of a JSON reply.
pub fn pid_of(reply: &serde_json::Value) -> i32 {
    i32::try_from(reply["pid"].as_i64().expect("reply has a pid")).expect("pid fits i32")
}

/// A real S3 HTTP server on loopback (s3s-fs, from the data-plane benchmark binary), stopped
/// on drop.
pub struct S3Server {
    pub endpoint: String,
    pub dir: tempfile::TempDir,
    process: Child,
}

/// Credentials and bucket the server accepts.
pub const S3_ACCESS_KEY: &str = "AKIABENCH";
pub const S3_SECRET_KEY: &str = "bench-secret";
pub const S3_BUCKET: &str = "bench";

impl S3Server {
    pub fn start() -> Self {
        let profile_dir = std::env::current_exe()
            .unwrap()
            .parent()
            .and_then(Path::parent)
            .unwrap()
            .to_owned();
        let binary = profile_dir.join("dataplane-bench");
        if !binary.exists() {
            let profile = if profile_dir.ends_with("release") {
                "release"
            } else {
                "dev"
            };
            let status = Command::new(env!("CARGO"))
                .args([
                    "build",
                    "--profile",
                    profile,
                    "-p",
                    "kybernate-dataplane-bench",
                    "--bin",
                    "dataplane-bench",
                ])
                .status()
                .expect("cargo build dataplane-bench");
            assert!(status.success(), "building the S3 test server failed");
        }
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let (process, addr) = spawn_s3(dir.path(), "127.0.0.1:0");
        Self {
            endpoint: format!("http://{addr}"),
            dir,
            process,
        }
    }

    /// The agent's `[s3]` config section for this server (credentials go in the environment).
    pub fn agent_config(&self) -> String {
        format!(
            "[s3]\nendpoint = \"{}\"\nbucket = \"{S3_BUCKET}\"\nprefix = \"node-a\"\nforce_path_style = true\n",
            self.endpoint
        )
    }

    pub fn credentials() -> [(&'static str, &'static str); 2] {
        [
            ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY),
        ]
    }
}

/// The S3 test server binary (built by [`S3Server::start`]).
fn s3_binary() -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("dataplane-bench")
}

/// Starts the S3 server on `root` at `addr`; returns it and the address it serves on.
fn spawn_s3(root: &Path, addr: &str) -> (Child, String) {
    let mut process = Command::new(s3_binary())
        .arg("serve-s3")
        .arg(root)
        .arg(addr)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the S3 server");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(process.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line
        .trim()
        .strip_prefix("ready ")
        .unwrap_or_else(|| panic!("S3 server said {line:?}"))
        .to_owned();
    (process, addr)
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Polls `check` for up to a minute.
pub fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
