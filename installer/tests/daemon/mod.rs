//! A private containerd for tests: its own root, state, socket and namespace, started with
//! a real default config; everything it started is stopped, unmounted and removed on drop,
//! also when the test fails.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use kybernate_installer::probe::CriStatusProbe;
use kybernate_installer::restart::{ContainerdProbe, ProbeOutcome};

use crate::common::{fixture, Host};

pub const IMAGE: &str = "docker.io/kybernate/busybox:installer-test";

pub struct Version {
    pub label: &'static str,
    pub bin_dir: PathBuf,
    pub fixture: &'static str,
    /// Config version 3 keeps NRI on by default with a fixed socket; tests turn it off.
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

/// A private containerd and everything it started; all of it is stopped and removed on
/// drop, also when the test fails.
pub struct PrivateContainerd {
    pub host: Host,
    pub version: Version,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub namespace: String,
    pub daemon: Option<Child>,
}

impl PrivateContainerd {
    pub fn new(version: Version) -> Self {
        let host = Host::new();
        let base = host.dir.path().to_path_buf();
        let socket = base.join("run/containerd.sock");
        let mut doc: toml_edit::DocumentMut = fixture(version.fixture).parse().unwrap();
        doc["root"] = toml_edit::value(base.join("var/lib/containerd").display().to_string());
        doc["state"] = toml_edit::value(base.join("run/containerd").display().to_string());
        doc["grpc"]["address"] = toml_edit::value(socket.display().to_string());
        if version.v3 {
            doc["plugins"]["io.containerd.nri.v1.nri"]["disable"] = toml_edit::value(true);
        }
        let config = host.put("/etc/containerd/config.toml", &doc.to_string());
        let namespace = format!(
            "kybernate-installer-{}-{}",
            version.label.replace('.', ""),
            std::process::id()
        );
        Self {
            host,
            version,
            config,
            socket,
            namespace,
            daemon: None,
        }
    }

    pub fn installer(&self, extra: &[&str]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_kybernate-installer"))
            .arg("--host-root")
            .arg(self.host.root())
            .arg("--shim-source")
            .arg(kybernate_shim())
            .arg("--no-restart")
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "installer {extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// containerd finds shims on its PATH: the host's shim dir first, then bookworm's
    /// /usr/bin runc (see scripts/install-containerd.sh), then CRIU's wrapper dir.
    pub fn path_env(&self) -> String {
        format!(
            "{}:/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/sbin:/usr/local/bin",
            self.host.path("/usr/local/bin").display()
        )
    }

    pub fn start(&mut self) -> ProbeOutcome {
        self.spawn();
        self.wait_answering()
    }

    pub fn spawn(&mut self) {
        let log = fs::File::create(self.host.dir.path().join("containerd.log")).unwrap();
        let child = Command::new(self.version.tool("containerd"))
            .arg("--config")
            .arg(&self.config)
            .env("PATH", self.path_env())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(child);
    }

    pub fn wait_answering(&mut self) -> ProbeOutcome {
        let probe = CriStatusProbe::new(&self.socket);
        let mut last = ProbeOutcome::Unreachable("not probed".into());
        for _ in 0..100 {
            last = probe.probe();
            if matches!(last, ProbeOutcome::Answering { .. }) {
                return last;
            }
            if let Some(status) = self.daemon.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "containerd {} exited with {status}: {}",
                    self.version.label,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "containerd {} did not answer: {last:?}\n{}",
            self.version.label,
            self.log()
        )
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            for _ in 0..50 {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.host.dir.path().join("containerd.log")).unwrap_or_default()
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_in(&self.namespace, args)
    }

    pub fn ctr_in(&self, namespace: &str, args: &[&str]) -> Output {
        Command::new(self.version.tool("ctr"))
            .arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(namespace)
            .args(args)
            .env("PATH", self.path_env())
            .output()
            .unwrap()
    }

    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?}: {}{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn config_dump(&self) -> String {
        let out = Command::new(self.version.tool("containerd"))
            .arg("--config")
            .arg(&self.config)
            .args(["config", "dump"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "config dump: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Pids of processes whose command line mentions this daemon's socket (its shims).
    pub fn shim_pids(&self) -> Vec<u32> {
        let needle = self.socket.display().to_string();
        fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| {
                        String::from_utf8_lossy(&c)
                            .replace('\0', " ")
                            .contains(&needle)
                    })
                    .unwrap_or(false)
            })
            .collect()
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        if self.daemon.is_some() {
            // The test's own namespace, and CRI's for pod sandboxes.
            for namespace in [self.namespace.clone(), "k8s.io".to_string()] {
                let tasks = self.ctr_in(&namespace, &["tasks", "ls", "-q"]);
                for id in String::from_utf8_lossy(&tasks.stdout).lines() {
                    let _ = self.ctr_in(&namespace, &["tasks", "kill", "-s", "SIGKILL", id]);
                    let _ = self.ctr_in(&namespace, &["tasks", "delete", "-f", id]);
                }
                let containers = self.ctr_in(&namespace, &["containers", "ls", "-q"]);
                for id in String::from_utf8_lossy(&containers.stdout).lines() {
                    let _ = self.ctr_in(&namespace, &["containers", "rm", id]);
                }
            }
        }
        self.stop();
        for pid in self.shim_pids() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
        let base = self.host.dir.path().display().to_string();
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
    }
}

pub fn busybox_image(dir: &Path) -> PathBuf {
    let out = dir.join("busybox-oci.tar");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-busybox-oci.sh");
    let status = Command::new("bash")
        .arg(&script)
        .arg(&out)
        .arg(IMAGE)
        .status()
        .unwrap();
    assert!(status.success(), "{} failed", script.display());
    out
}

/// The workspace's own shim binary, built next to the installer (built on demand when a
/// single-package test run did not build it).
pub fn kybernate_shim() -> std::path::PathBuf {
    let shim = std::path::Path::new(env!("CARGO_BIN_EXE_kybernate-installer"))
        .with_file_name("containerd-shim-kybernate-v1");
    if !shim.exists() {
        let dir = shim.parent().unwrap();
        let profile = if dir.ends_with("release") {
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
                "containerd-shim-kybernate-v1",
            ])
            .status()
            .expect("cargo build the shim");
        assert!(
            status.success(),
            "building containerd-shim-kybernate-v1 failed"
        );
    }
    shim
}
