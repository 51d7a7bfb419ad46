//! A private containerd (1.6 from bookworm or 2.1 from sid) with its own root, state, socket
//! and namespace, the `kybernate` shim built by this crate on its PATH, a Kybernate agent on
//! its own socket and tiers, and the busybox test image imported. Everything it started —
//! containers, shims, the daemon, the agent — is stopped and removed on drop, also when the
//! test fails. Modelled on the installer's real-containerd harness.
#![allow(dead_code)]

pub mod kube_api;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The image every test runs.
pub const IMAGE: &str = "docker.io/kybernate/busybox:shim-test";
/// This shim's runtime name for `ctr --runtime`.
pub const KYBERNATE: &str = "io.containerd.kybernate.v1";
/// The stock runc shim, the parity baseline.
pub const RUNC_V2: &str = "io.containerd.runc.v2";

/// One containerd version.
#[derive(Debug, Clone)]
pub struct Version {
    pub label: &'static str,
    pub bin_dir: PathBuf,
    pub fixture: &'static str,
    pub v3: bool,
}

pub fn containerd_16() -> Version {
    Version {
        label: "1.6",
        bin_dir: PathBuf::from("/usr/bin"),
        fixture: "containerd-1.6-default.toml",
        v3: false,
    }
}

pub fn containerd_21() -> Version {
    let prefix = std::env::var("KYBERNATE_CONTAINERD2_PREFIX")
        .unwrap_or_else(|_| "/opt/kybernate/containerd2".into());
    Version {
        label: "2.1",
        bin_dir: Path::new(&prefix).join("usr/bin"),
        fixture: "containerd-2.1-default.toml",
        v3: true,
    }
}

impl Version {
    pub fn tool(&self, name: &str) -> PathBuf {
        let path = self.bin_dir.join(name);
        assert!(
            path.is_file(),
            "containerd {}: {} is missing; run scripts/install-containerd.sh as root",
            self.label,
            path.display()
        );
        path
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The agent binary built from this workspace (`cargo build -p kybernate-agent`).
pub fn workspace_bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let path = target.join("debug").join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it first with `cargo build -p kybernate-agent`",
        path.display()
    );
    path
}

static NODES: AtomicU32 = AtomicU32::new(0);

/// What a test changes about a node.
#[derive(Debug, Default, Clone)]
pub struct NodeOptions {
    /// TOML appended to the agent's config file (after its `[tiers]` table).
    pub agent_config: String,
    /// Extra environment of containerd, which every shim inherits (e.g. failpoints).
    pub containerd_env: Vec<(String, String)>,
    /// A kubeconfig: the agent then runs as the worker of node `n1` against its API
    /// server (grants, Events).
    pub kubeconfig: Option<PathBuf>,
}

/// containerd + agent + shim for one test.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub version: Version,
    pub socket: PathBuf,
    pub namespace: String,
    pub agent_socket: PathBuf,
    pub ram_tier: PathBuf,
    pub runc_root: PathBuf,
    daemon: Option<Child>,
    agent: Option<Child>,
    options: NodeOptions,
}

impl Node {
    /// Starts everything and imports the image.
    pub fn start(version: Version) -> Self {
        Self::start_with(version, NodeOptions::default())
    }

    /// Starts everything with `options` and imports the image.
    pub fn start_with(version: Version, options: NodeOptions) -> Self {
        for tool in ["containerd", "ctr", "containerd-shim-runc-v2"] {
            version.tool(tool);
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let base = dir.path().to_path_buf();
        let n = NODES.fetch_add(1, Ordering::Relaxed);
        let namespace = format!(
            "kyb-shim-{}-{}-{n}",
            version.label.replace('.', ""),
            std::process::id()
        );
        let socket = base.join("containerd.sock");
        let ram_tier = PathBuf::from(format!("/dev/shm/{namespace}"));
        let runc_root = base.join("runc");
        let mut node = Node {
            agent_socket: base.join("agent.sock"),
            dir,
            version,
            socket,
            namespace,
            ram_tier,
            runc_root,
            daemon: None,
            agent: None,
            options,
        };
        node.write_configs();
        node.start_agent();
        node.start_containerd();
        let image = node.dir.path().join("busybox-oci.tar");
        let script = workspace().join("scripts/make-busybox-oci.sh");
        let status = Command::new("bash")
            .arg(&script)
            .arg(&image)
            .arg(IMAGE)
            .status()
            .unwrap();
        assert!(status.success(), "{} failed", script.display());
        node.ctr_ok(&["images", "import", image.to_str().unwrap()]);
        node
    }

    fn write_configs(&self) {
        let base = self.dir.path();
        let fixture = workspace()
            .join("installer/tests/fixtures")
            .join(self.version.fixture);
        let text =
            fs::read_to_string(&fixture).unwrap_or_else(|e| panic!("{}: {e}", fixture.display()));
        let mut doc: toml_edit::DocumentMut = text.parse().unwrap();
        doc["root"] = toml_edit::value(base.join("root").display().to_string());
        doc["state"] = toml_edit::value(base.join("state").display().to_string());
        doc["grpc"]["address"] = toml_edit::value(self.socket.display().to_string());
        if self.version.v3 {
            doc["plugins"]["io.containerd.nri.v1.nri"]["disable"] = toml_edit::value(true);
        }
        fs::write(base.join("containerd.toml"), doc.to_string()).unwrap();

        let bin = base.join("bin");
        fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(
            env!("CARGO_BIN_EXE_containerd-shim-kybernate-v1"),
            bin.join("containerd-shim-kybernate-v1"),
        )
        .unwrap();
        fs::write(
            base.join("shim.toml"),
            format!(
                "runc = \"/usr/bin/runc\"\nrunc_root = \"{}\"\nagent_socket = \"{}\"\n",
                self.runc_root.display(),
                self.agent_socket.display()
            ),
        )
        .unwrap();
        // The agent refuses configured tier directories that do not exist.
        fs::create_dir_all(&self.ram_tier).unwrap();
        fs::create_dir_all(base.join("nvme")).unwrap();
        fs::write(
            base.join("agent.toml"),
            format!(
                "socket = \"{}\"\ncontainerd_socket = \"{}\"\nstate_dir = \"{}\"\n\
                 metrics_addr = \"127.0.0.1:0\"\n\
                 [tiers]\nram_path = \"{}\"\nnvme_path = \"{}\"\n{}",
                self.agent_socket.display(),
                self.socket.display(),
                base.join("agent-state").display(),
                self.ram_tier.display(),
                base.join("nvme").display(),
                self.options.agent_config
            ),
        )
        .unwrap();
    }

    /// PATH for containerd and its shims: our shim, then bookworm's runc, then CRIU.
    pub fn path_env(&self) -> String {
        format!(
            "{}:{}:/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/sbin:/usr/local/bin",
            self.dir.path().join("bin").display(),
            self.version.bin_dir.display()
        )
    }

    fn start_containerd(&mut self) {
        let log = fs::File::create(self.dir.path().join("containerd.log")).unwrap();
        let child = Command::new(self.version.tool("containerd"))
            .arg("--config")
            .arg(self.dir.path().join("containerd.toml"))
            .env("PATH", self.path_env())
            .env("KYBERNATE_SHIM_CONFIG", self.dir.path().join("shim.toml"))
            // containerd makes each task checkpoint's work dir under XDG_RUNTIME_DIR (else
            // /tmp) and leaves it there: keep them inside this node's dir.
            .env("XDG_RUNTIME_DIR", self.dir.path())
            .envs(self.options.containerd_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.ctr(&["version"]).status.success() {
                return;
            }
            if let Some(status) = self.daemon.as_mut().unwrap().try_wait().unwrap() {
                panic!("containerd exited with {status}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "containerd {} did not answer:\n{}",
            self.version.label,
            self.log()
        );
    }

    /// Starts (or restarts) the agent and waits for its socket.
    pub fn start_agent(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .unwrap();
        let _ = fs::remove_file(&self.agent_socket);
        let mut command = Command::new(workspace_bin("kybernate-agent"));
        if let Some(kubeconfig) = &self.options.kubeconfig {
            command
                .args(["--node-name", "n1"])
                .env("KUBECONFIG", kubeconfig)
                .env_remove("KUBERNETES_SERVICE_HOST");
        }
        let child = command
            .arg("--config")
            .arg(self.dir.path().join("agent.toml"))
            .env("PATH", self.path_env())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.agent_socket.exists() {
                return;
            }
            if let Some(status) = self.agent.as_mut().unwrap().try_wait().unwrap() {
                panic!("kybernate-agent exited with {status}: {}", self.agent_log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("kybernate-agent did not listen:\n{}", self.agent_log());
    }

    /// Stops the agent (the "agent is down" case).
    pub fn stop_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_file(&self.agent_socket);
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    pub fn agent_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new(self.version.tool("ctr"))
            .arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(&self.namespace)
            .args(args)
            .env("PATH", self.path_env())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn kybernatectl(&self, args: &[&str]) -> Output {
        Command::new(workspace_bin("kybernatectl"))
            .arg("--socket")
            .arg(&self.agent_socket)
            .args(args)
            .output()
            .unwrap()
    }

    /// `kybernatectl checkpoint --container` in this node's namespace: agent -> containerd
    /// -> shim -> agent.
    pub fn ctl_checkpoint(&self, id: &str, extra: &[&str]) -> Output {
        let mut args = vec![
            "--output",
            "json",
            "checkpoint",
            "--container",
            id,
            "--namespace",
            &self.namespace,
        ];
        args.extend_from_slice(extra);
        self.kybernatectl(&args)
    }

    /// The task's status column in `ctr tasks ls` (RUNNING, PAUSED, STOPPED, ...).
    pub fn task_status(&self, id: &str) -> Option<String> {
        let out = self.ctr_ok(&["tasks", "ls"]);
        out.lines()
            .filter_map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                (cols.first() == Some(&id)).then(|| cols.last().unwrap_or(&"").to_string())
            })
            .next()
    }

    /// Waits until the task has `status`.
    pub fn wait_status(&self, id: &str, status: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = None;
        while Instant::now() < deadline {
            last = self.task_status(id);
            if last.as_deref() == Some(status) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("task {id} never became {status} (last {last:?})");
    }

    /// Kills and removes a task and its container, ignoring what is not there.
    pub fn remove(&self, id: &str) {
        let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
        for _ in 0..50 {
            let out = self.ctr(&["tasks", "delete", id]);
            let err = String::from_utf8_lossy(&out.stderr);
            if out.status.success() || err.contains("not found") {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.ctr(&["containers", "rm", id]);
    }

    /// PID of the long-lived shim process serving container `id` (one per container
    /// outside pods).
    pub fn shim_pid(&self, id: &str) -> Option<i32> {
        let wanted = format!(" -id {id} ");
        fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .find(|pid| {
                fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    let line = format!("{} ", String::from_utf8_lossy(&c).replace('\0', " "));
                    line.contains("containerd-shim-kybernate-v1")
                        && line.contains(&self.namespace)
                        && line.contains(&wanted)
                        && !line.contains(" delete")
                })
            })
    }

    fn kill_matching(&self, needle: &str) {
        let pids: Vec<u32> = fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| {
                        String::from_utf8_lossy(&c)
                            .replace('\0', " ")
                            .contains(needle)
                    })
                    .unwrap_or(false)
            })
            .collect();
        for pid in pids {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.daemon.is_some() {
            let tasks = self.ctr(&["tasks", "ls", "-q"]);
            for id in String::from_utf8_lossy(&tasks.stdout).lines() {
                let _ = self.ctr(&["tasks", "kill", "-a", "-s", "SIGKILL", id]);
                let _ = self.ctr(&["tasks", "delete", "-f", id]);
            }
            let containers = self.ctr(&["containers", "ls", "-q"]);
            for id in String::from_utf8_lossy(&containers.stdout).lines() {
                let _ = self.ctr(&["containers", "rm", id]);
            }
        }
        // Whatever containerd did not clean: containers of both runtimes' runc roots.
        for root in [
            self.runc_root.join(&self.namespace),
            PathBuf::from("/run/containerd/runc").join(&self.namespace),
        ] {
            let list = Command::new("/usr/bin/runc")
                .arg("--root")
                .arg(&root)
                .args(["list", "-q"])
                .output();
            if let Ok(list) = list {
                for id in String::from_utf8_lossy(&list.stdout).lines() {
                    let _ = Command::new("/usr/bin/runc")
                        .arg("--root")
                        .arg(&root)
                        .args(["kill", "--all", id, "KILL"])
                        .status();
                    let _ = Command::new("/usr/bin/runc")
                        .arg("--root")
                        .arg(&root)
                        .args(["delete", "--force", id])
                        .status();
                }
            }
            let _ = fs::remove_dir_all(&root);
        }
        if let Some(mut child) = self.daemon.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            for _ in 0..50 {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.kill_matching(&self.socket.display().to_string());
        self.stop_agent();
        let base = self.dir.path().display().to_string();
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<String> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .map(|p| p.replace("\\040", " "))
            .filter(|p| p.starts_with(&base))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for point in points {
            let _ = Command::new("umount").arg("-l").arg(&point).status();
        }
        let _ = fs::remove_dir_all(&self.ram_tier);
    }
}
