//! Fixtures for tests of the CUDA path: a simulated GPU node (the fake `libcuda.so.1`
//! in a private library directory, a node directory with devices and faults), the
//! test workload, and CRIU driven directly.
//!
//! The dynamic loader reads `LD_LIBRARY_PATH` only at process start, so each test
//! re-runs itself in a child process of its test binary with the fake on that path
//! and its own node directory ([`on_node`]). The parent builds the fake driver and the
//! workload with `cargo build -p kybernate-fake-libcuda -p kybernate-gpu-workload`
//! (a no-op when they are fresh) into the test binary's own target directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "KYBERNATE_TEST_NODE_CHILD";
const NODE_ENV: &str = "KYBERNATE_FAKE_CUDA_DIR";
/// The one GPU of a fresh fake node.
pub const GPU_A: &str = "GPU-11111111-2222-3333-4444-555555555555";
/// Another GPU of the same model, on "another node".
pub const GPU_B: &str = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
/// The fake GPU model.
pub const MODEL: &str = "Kybernate Fake GPU 16GB";

/// A simulated GPU node, as the test body sees it.
#[derive(Debug)]
pub struct Node {
    /// The node directory (`KYBERNATE_FAKE_CUDA_DIR` of the fake driver).
    pub dir: PathBuf,
}

fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// Builds the fake driver and the workload (cheap when fresh) into this test binary's
/// target directory and returns the path of the fake driver's shared object.
fn build_artifacts() -> PathBuf {
    let target = target_dir();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let mut build = Command::new(cargo);
    build
        .args([
            "build",
            "--quiet",
            "-p",
            "kybernate-fake-libcuda",
            "-p",
            "kybernate-gpu-workload",
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target.parent().expect("target dir"));
    // target/debug holds the `dev` profile; every other profile has its own dir.
    let profile = match target.file_name().and_then(|p| p.to_str()) {
        Some("debug") | None => "dev",
        Some(other) => other,
    };
    build.args(["--profile", profile]);
    let status = build
        .status()
        .expect("running cargo to build the fake libcuda and gpu-workload");
    assert!(
        status.success(),
        "cargo build -p kybernate-fake-libcuda -p kybernate-gpu-workload failed"
    );
    let lib = target.join("libkybernate_fake_libcuda.so");
    assert!(lib.exists(), "fake driver not found at {}", lib.display());
    lib
}

/// The fake driver's shared object built by [`on_node`] (for mounting into a container).
pub fn fake_driver() -> PathBuf {
    let lib = target_dir().join("libkybernate_fake_libcuda.so");
    assert!(lib.exists(), "fake driver not found at {}", lib.display());
    lib
}

/// The workload binary built by [`on_node`].
pub fn workload_binary() -> PathBuf {
    let bin = target_dir().join("gpu-workload");
    assert!(bin.exists(), "gpu-workload not found at {}", bin.display());
    bin
}

fn require_root_and_criu() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "these tests drive CRIU and must run as root");
    let found = Command::new("criu")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "criu (4.2 or newer) not on PATH; run scripts/install-deps.sh"
    );
}

/// Runs `body` in a child of this test binary on a fresh fake node with one GPU of
/// UUID `gpu` and model [`MODEL`] (`None`: a node without any libcuda). `test` is the
/// calling test's full name as libtest knows it (e.g. `module::test_fn`). Needs root
/// and `criu` on PATH; fails loudly without them.
pub fn on_node(test: &str, gpu: Option<&str>, body: fn(&Node)) {
    if std::env::var_os(CHILD_ENV).is_some() {
        let dir = std::env::var_os(NODE_ENV).map_or_else(
            || PathBuf::from(std::env::var_os("KYBERNATE_TEST_NODE").expect("node dir")),
            PathBuf::from,
        );
        body(&Node { dir });
        return;
    }
    require_root_and_criu();
    let root = tempfile::Builder::new()
        .prefix("kyb-fake-node.")
        .tempdir_in("/dev/shm")
        .expect("node dir");
    let lib_dir = root.path().join("lib");
    fs::create_dir_all(&lib_dir).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap());
    child
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .env("KYBERNATE_TEST_NODE", root.path())
        .env("LD_LIBRARY_PATH", &lib_dir)
        .env_remove(NODE_ENV);
    let lib = build_artifacts();
    if let Some(uuid) = gpu {
        std::os::unix::fs::symlink(&lib, lib_dir.join("libcuda.so.1")).unwrap();
        std::os::unix::fs::symlink(&lib, lib_dir.join("libnvidia-ml.so.1")).unwrap();
        fs::write(
            root.path().join("devices"),
            format!("{uuid} 16384 {MODEL}\n"),
        )
        .unwrap();
        child.env(NODE_ENV, root.path());
    }
    let output = child.output().expect("re-running the test in a child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    // Shown by the harness on failure or with --nocapture.
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "test {test} failed in its node process:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Node {
    /// Replaces the node's GPUs: `(uuid, MiB, model)`.
    pub fn set_devices(&self, devices: &[(&str, u64, &str)]) {
        let text: String = devices
            .iter()
            .map(|(u, m, n)| format!("{u} {m} {n}\n"))
            .collect();
        fs::write(self.dir.join("devices"), text).unwrap();
    }

    /// Sets the driver version the fake reports.
    pub fn set_driver_version(&self, version: i32) {
        fs::write(self.dir.join("driver_version"), version.to_string()).unwrap();
    }

    /// Sets the driver release NVML reports (e.g. `615.20.04`).
    pub fn set_driver_release(&self, release: &str) {
        fs::write(self.dir.join("driver_release"), release).unwrap();
    }

    /// Makes GPU memory look held by others: `(uuid, MiB)` per device.
    pub fn set_occupied(&self, occupied: &[(&str, u64)]) {
        let text: String = occupied.iter().map(|(u, m)| format!("{u} {m}\n")).collect();
        fs::write(self.dir.join("occupied"), text).unwrap();
    }

    /// Replaces the fault list (see the fake's `node` module).
    pub fn set_faults(&self, faults: &str) {
        fs::write(self.dir.join("faults"), faults).unwrap();
    }

    /// Checkpoint-API calls so far: `<op> <pid> <code>`.
    pub fn calls(&self) -> Vec<String> {
        fs::read_to_string(self.dir.join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The device regions (simulated VRAM) on `gpu`.
    pub fn regions_on(&self, gpu: &str) -> Vec<PathBuf> {
        fs::read_dir(self.dir.join("vram").join(gpu))
            .map(|e| e.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    /// A fresh CRIU images directory.
    pub fn images(&self, name: &str) -> PathBuf {
        let dir = self.dir.join("images").join(name);
        fs::create_dir_all(&dir).unwrap();
        dir
    }
}

/// Progress a workload process reported in its state file.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Chunks verified and rewritten.
    pub iterations: u64,
    /// Full passes over all of its (V)RAM.
    pub sweeps: u64,
    /// `ok`, or `error: ...` once it failed.
    pub status: String,
}

/// Progress of every workload process that reported into `state_dir`, by pid (as the
/// process knows it: inside a container, its pid there).
pub fn read_progress(state_dir: &Path) -> Vec<(u32, Progress)> {
    let mut out = Vec::new();
    for entry in fs::read_dir(state_dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_suffix(".state").and_then(|p| p.parse().ok()) else {
            continue;
        };
        let text = fs::read_to_string(entry.path()).unwrap_or_default();
        let mut p = Progress::default();
        for line in text.lines() {
            match line.split_once('=') {
                Some(("iterations", v)) => p.iterations = v.parse().unwrap_or(0),
                Some(("sweeps", v)) => p.sweeps = v.parse().unwrap_or(0),
                Some(("status", v)) => p.status = v.to_string(),
                _ => {}
            }
        }
        out.push((pid, p));
    }
    out.sort_by_key(|(pid, _)| *pid);
    out
}

/// The test GPU workload: `children + 1` processes, each holding `mib` MiB.
/// Killed (the whole tree) on drop.
#[derive(Debug)]
pub struct Workload {
    /// The first process; CRIU dumps the tree from here.
    pub root: u32,
    child: Option<Child>,
    /// Where each process writes `<pid>.state`.
    pub state_dir: PathBuf,
    /// How many processes the workload has.
    pub processes: usize,
    pids: Vec<u32>,
}

impl Workload {
    /// Starts the workload in its own session, stdio on files, and waits until every
    /// process holds its data in VRAM.
    pub fn start(node: &Node, mib: usize, children: usize) -> Workload {
        Workload::start_with(node, mib, children, &[])
    }

    /// One more workload on GPU `device` (ordinal), with its own state directory and
    /// log, so several workloads can share a node.
    pub fn start_on(node: &Node, mib: usize, device: u32) -> Workload {
        let device = device.to_string();
        Workload::start_named(
            node,
            &format!("gpu{device}"),
            mib,
            0,
            &["--device", &device],
        )
    }

    /// The same workload keeping its data in host memory (no driver needed).
    pub fn start_cpu(node: &Node, mib: usize) -> Workload {
        Workload::start_with(node, mib, 0, &["--cpu"])
    }

    fn start_with(node: &Node, mib: usize, children: usize, extra: &[&str]) -> Workload {
        Workload::start_named(node, "", mib, children, extra)
    }

    fn start_named(
        node: &Node,
        name: &str,
        mib: usize,
        children: usize,
        extra: &[&str],
    ) -> Workload {
        let suffix = if name.is_empty() {
            String::new()
        } else {
            format!("-{name}")
        };
        let state_dir = node.dir.join(format!("state{suffix}"));
        // An earlier workload of the same test leaves its state files behind.
        let _ = fs::remove_dir_all(&state_dir);
        fs::create_dir_all(&state_dir).unwrap();
        let log = fs::File::create(node.dir.join(format!("workload{suffix}.log"))).unwrap();
        let mut cmd = Command::new(workload_binary());
        cmd.args([
            "--mib",
            &mib.to_string(),
            "--children",
            &children.to_string(),
        ])
        .arg("--state-dir")
        .arg(&state_dir)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd.spawn().expect("starting gpu-workload");
        let mut workload = Workload {
            root: child.id(),
            child: Some(child),
            state_dir,
            processes: children + 1,
            pids: Vec::new(),
        };
        workload.wait_until("every process holds its VRAM", |w| {
            let states = w.all_progress();
            states.len() == w.processes && states.iter().all(|(_, p)| p.status == "ok")
        });
        workload.pids = kybernate_cuda::process_tree(workload.root).expect("process tree");
        assert_eq!(
            workload.pids.len(),
            workload.processes,
            "{:?}",
            workload.pids
        );
        workload
    }

    /// The pids of the workload (root first).
    pub fn pids(&self) -> Vec<u32> {
        self.pids.clone()
    }

    /// Progress of every process that has reported, by pid.
    pub fn all_progress(&self) -> Vec<(u32, Progress)> {
        read_progress(&self.state_dir)
    }

    /// Waits (up to a minute, a guard against hangs) until `done` holds.
    pub fn wait_until(&self, what: &str, done: impl Fn(&Workload) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "workload never reached: {what}; progress {:?}",
                self.all_progress()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until every process has verified all of its VRAM twice more from now,
    /// with status ok throughout: the data is intact and the work goes on.
    pub fn assert_keeps_verifying(&self) {
        let start: Vec<(u32, Progress)> = self.all_progress();
        self.wait_until("two more full verified sweeps in every process", |w| {
            let now = w.all_progress();
            for (pid, p) in &now {
                assert_eq!(p.status, "ok", "pid {pid} reports a failure");
            }
            start.iter().all(|(pid, before)| {
                now.iter()
                    .any(|(p, after)| p == pid && after.sweeps >= before.sweeps + 2)
            })
        });
    }

    /// Reaps the root after CRIU dumped (and so killed) the tree, and waits until
    /// every pid is gone, so a restore can reuse them.
    pub fn reap_after_dump(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.wait().expect("reaping the dumped workload root");
        }
        wait_gone(&self.pids);
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        for &pid in &self.pids {
            if let Ok(pid) = i32::try_from(pid) {
                // SAFETY: kill has no memory preconditions; these pids are ours.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        wait_gone(&self.pids);
    }
}

/// Waits until none of `pids` exists (PID 1 may reap restored processes late).
pub fn wait_gone(pids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while pids
        .iter()
        .any(|p| Path::new(&format!("/proc/{p}")).exists())
    {
        if Instant::now() > deadline {
            panic!("processes {pids:?} did not go away");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `criu dump -t <pid> -D <images>`; `Err` carries CRIU's log tail.
pub fn criu_dump(pid: u32, images: &Path) -> Result<(), String> {
    criu(&["dump", "-t", &pid.to_string()], images, "dump.log")
}

/// `criu restore -d -D <images>`.
pub fn criu_restore(images: &Path) -> Result<(), String> {
    criu(&["restore", "-d"], images, "restore.log")
}

fn criu(args: &[&str], images: &Path, log: &str) -> Result<(), String> {
    let status = Command::new("criu")
        .args(args)
        .arg("-D")
        .arg(images)
        .args(["-o", log, "-v4"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run criu: {e}"))?;
    if status.success() {
        return Ok(());
    }
    let text = fs::read_to_string(images.join(log)).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(15).collect();
    Err(format!(
        "criu {} failed ({status}):\n{}",
        args[0],
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    ))
}
