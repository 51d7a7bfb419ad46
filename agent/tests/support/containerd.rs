//! A private containerd (1.6 from bookworm or 2.1 from sid; its own root, state and socket)
//! whose `kybernate` runtime is the shim built from this workspace, with the busybox test image imported into namespace
//! `k8s.io`, where the kubelet's pods run. Everything it started (containers, shims, the
//! daemon) is stopped and removed on drop, also when the test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The image the containers run.
pub const IMAGE: &str = "docker.io/kybernate/busybox:worker-test";
/// The runtime type of the kybernate shim.
pub const KYBERNATE: &str = "io.containerd.kybernate.v1";
/// The CRI plugin's namespace.
pub const NAMESPACE: &str = "k8s.io";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The shim binary of this workspace (`cargo build -p containerd-shim-kybernate-v1`).
fn shim_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let path = target.join("debug").join("containerd-shim-kybernate-v1");
    assert!(
        path.is_file(),
        "{} is missing: build it first with `cargo build -p containerd-shim-kybernate-v1`",
        path.display()
    );
    path
}

/// Which containerd to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(dead_code)]
pub enum Release {
    /// Bookworm's containerd 1.6, in /usr/bin.
    V16,
    /// containerd 2.1 from sid, in the private prefix `scripts/install-containerd.sh` made.
    V21,
}

impl Release {
    fn bin_dir(self) -> PathBuf {
        match self {
            Release::V16 => PathBuf::from("/usr/bin"),
            Release::V21 => Path::new(
                &std::env::var("KYBERNATE_CONTAINERD2_PREFIX")
                    .unwrap_or_else(|_| "/opt/kybernate/containerd2".into()),
            )
            .join("usr/bin"),
        }
    }

    fn fixture(self) -> &'static str {
        match self {
            Release::V16 => "containerd-1.6-default.toml",
            Release::V21 => "containerd-2.1-default.toml",
        }
    }
}

/// containerd with the kybernate shim, calling back the agent at `agent_socket`.
pub struct Containerd {
    dir: PathBuf,
    bin_dir: PathBuf,
    pub socket: PathBuf,
    runc_root: PathBuf,
    path_env: String,
    daemon: Option<Child>,
}

impl Containerd {
    /// Starts containerd 1.6 under `dir` and imports [`IMAGE`].
    pub fn start(dir: &Path, agent_socket: &Path) -> Self {
        Self::start_release(dir, agent_socket, Release::V16)
    }

    /// Starts containerd `release` under `dir` and imports [`IMAGE`].
    pub fn start_release(dir: &Path, agent_socket: &Path, release: Release) -> Self {
        let bin_dir = release.bin_dir();
        for tool in [
            bin_dir.join("containerd"),
            bin_dir.join("ctr"),
            PathBuf::from("/usr/bin/runc"),
        ] {
            assert!(
                tool.is_file(),
                "{} is missing; run scripts/install-containerd.sh as root",
                tool.display()
            );
        }
        let dir = dir.join("containerd");
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(shim_binary(), bin.join("containerd-shim-kybernate-v1"))
            .unwrap();
        let socket = dir.join("containerd.sock");
        let runc_root = dir.join("runc");
        let fixture = workspace()
            .join("installer/tests/fixtures")
            .join(release.fixture());
        let text = std::fs::read_to_string(&fixture)
            .unwrap_or_else(|e| panic!("{}: {e}", fixture.display()));
        let mut section = String::new();
        let config: Vec<String> = text
            .lines()
            .map(|line| {
                let trimmed = line.trim();
                if trimmed.starts_with('[') {
                    section = trimmed.to_owned();
                }
                if section.is_empty() && trimmed.starts_with("root =") {
                    format!("root = \"{}\"", dir.join("root").display())
                } else if section.is_empty() && trimmed.starts_with("state =") {
                    format!("state = \"{}\"", dir.join("state").display())
                } else if section == "[grpc]" && trimmed.starts_with("address =") {
                    format!("  address = \"{}\"", socket.display())
                } else if section.contains("io.containerd.nri.v1.nri")
                    && trimmed.starts_with("disable =")
                {
                    "    disable = true".to_owned()
                } else {
                    line.to_owned()
                }
            })
            .collect();
        std::fs::write(dir.join("containerd.toml"), config.join("\n") + "\n").unwrap();
        std::fs::write(
            dir.join("shim.toml"),
            format!(
                "runc = \"/usr/bin/runc\"\nrunc_root = \"{}\"\nagent_socket = \"{}\"\n",
                runc_root.display(),
                agent_socket.display()
            ),
        )
        .unwrap();
        let path_env = format!(
            "{}:{}:/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/sbin:/usr/local/bin",
            bin.display(),
            bin_dir.display()
        );
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let daemon = Command::new(bin_dir.join("containerd"))
            .arg("--config")
            .arg(dir.join("containerd.toml"))
            .env("PATH", &path_env)
            .env("KYBERNATE_SHIM_CONFIG", dir.join("shim.toml"))
            // containerd leaves each task checkpoint's work dir under XDG_RUNTIME_DIR (else
            // /tmp): keep them inside this fixture's dir.
            .env("XDG_RUNTIME_DIR", &dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let mut containerd = Self {
            dir,
            bin_dir,
            socket,
            runc_root,
            path_env,
            daemon: Some(daemon),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !containerd.ctr(&["version"]).status.success() {
            if let Some(status) = containerd.daemon.as_mut().unwrap().try_wait().unwrap() {
                panic!("containerd exited with {status}: {}", containerd.log());
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not answer: {}",
                containerd.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let image = containerd.dir.join("busybox-oci.tar");
        let script = workspace().join("scripts/make-busybox-oci.sh");
        let status = Command::new("bash")
            .arg(&script)
            .arg(&image)
            .arg(IMAGE)
            .status()
            .unwrap();
        assert!(status.success(), "{} failed", script.display());
        containerd.ctr_ok(&["images", "import", image.to_str().unwrap()]);
        containerd
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new(self.bin_dir.join("ctr"))
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE])
            .args(args)
            .env("PATH", &self.path_env)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Kills and removes task and container `id`.
    #[allow(dead_code)]
    pub fn remove(&self, id: &str) {
        let _ = self.ctr(&["tasks", "kill", "-a", "-s", "SIGKILL", id]);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.ctr(&["tasks", "delete", id]);
            let err = String::from_utf8_lossy(&out.stderr);
            if out.status.success() || err.contains("not found") || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.ctr_ok(&["containers", "rm", id]);
    }

    /// Runs `kybernatectl workload --mib MIB --status STATUS` as container `id` under the
    /// kybernate runtime; the host's libraries, kybernatectl and the status file's directory
    /// are bind-mounted in (directories, never symlinks: CRIU restores bind mounts by path).
    pub fn run_workload(&self, id: &str, ctl: &Path, mib: usize, status: &Path) {
        self.run_workload_with(id, ctl, mib, status, &[]);
    }

    /// The same container restored from checkpoint `name` through the shim's annotation.
    #[allow(dead_code)]
    pub fn run_restored_workload(&self, id: &str, ctl: &Path, status: &Path, name: &str) {
        let annotation = format!("kybernate.io/restore-from={name}");
        self.run_workload_with(id, ctl, 0, status, &["--annotation", &annotation]);
    }

    /// [`Containerd::run_workload`] as a container of pod `pod` in Kubernetes namespace
    /// `namespace` (the CRI annotations the CRI plugin writes), restoring checkpoint
    /// `restore_from` when given; the output of `ctr run`, which may fail.
    #[allow(dead_code)]
    pub fn run_workload_in_pod(
        &self,
        id: &str,
        ctl: &Path,
        mib: usize,
        status: &Path,
        (namespace, pod): (&str, &str),
        restore_from: Option<&str>,
    ) -> Output {
        let mut extra = vec![
            format!("io.kubernetes.cri.sandbox-namespace={namespace}"),
            format!("io.kubernetes.cri.sandbox-name={pod}"),
            format!("io.kubernetes.cri.sandbox-uid=uid-{namespace}-{pod}"),
        ];
        extra.extend(restore_from.map(|name| format!("kybernate.io/restore-from={name}")));
        let extra: Vec<&str> = extra
            .iter()
            .flat_map(|a| ["--annotation", a.as_str()])
            .collect();
        let args = self.workload_args(id, ctl, mib, status, &extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ctr(&args)
    }

    fn run_workload_with(&self, id: &str, ctl: &Path, mib: usize, status: &Path, extra: &[&str]) {
        let args = self.workload_args(id, ctl, mib, status, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ctr_ok(&args);
    }

    /// `ctr run` arguments of the workload container.
    fn workload_args(
        &self,
        id: &str,
        ctl: &Path,
        mib: usize,
        status: &Path,
        extra: &[&str],
    ) -> Vec<String> {
        let status_dir = status.parent().unwrap();
        let mounts = [
            ("/usr/lib".into(), "/lib".into()),
            ("/usr/lib64".into(), "/lib64".into()),
            ("/usr/lib".into(), "/usr/lib".into()),
            (ctl.to_path_buf(), "/kybernatectl".into()),
            (status_dir.to_path_buf(), status_dir.to_path_buf()),
        ]
        .map(|(src, dst): (PathBuf, PathBuf)| {
            format!(
                "type=bind,src={},dst={},options=rbind:rw",
                src.display(),
                dst.display()
            )
        });
        let mib = mib.to_string();
        let mut args = vec!["run", "-d", "--runtime", KYBERNATE];
        for m in &mounts {
            args.extend(["--mount", m.as_str()]);
        }
        args.extend_from_slice(extra);
        args.extend([
            IMAGE,
            id,
            "/kybernatectl",
            "workload",
            "--mib",
            &mib,
            "--status",
            status.to_str().unwrap(),
        ]);
        args.into_iter().map(str::to_owned).collect()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let tasks = self.ctr(&["tasks", "ls", "-q"]);
        for id in String::from_utf8_lossy(&tasks.stdout).lines() {
            let _ = self.ctr(&["tasks", "kill", "-a", "-s", "SIGKILL", id]);
            let _ = self.ctr(&["tasks", "delete", "-f", id]);
        }
        let containers = self.ctr(&["containers", "ls", "-q"]);
        for id in String::from_utf8_lossy(&containers.stdout).lines() {
            let _ = self.ctr(&["containers", "rm", id]);
        }
        let root = self.runc_root.join(NAMESPACE);
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
                    .args(["delete", "--force", id])
                    .status();
            }
        }
        if let Some(mut daemon) = self.daemon.take() {
            // SAFETY: kill(2) to our own child.
            unsafe { libc::kill(i32::try_from(daemon.id()).unwrap(), libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && daemon.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        // Shims outlive containerd; each names our socket on its command line.
        let needle = self.socket.display().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                // SAFETY: kill(2) of a shim this fixture's containerd started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let base = self.dir.display().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .filter(|p| p.starts_with(&base))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for point in points {
            let _ = Command::new("umount").arg("-l").arg(point).status();
        }
    }
}
