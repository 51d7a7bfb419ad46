//! Real daemons: for containerd 1.6 (bookworm) and 2.1 (sid, from
//! scripts/install-containerd.sh) the installer patches the real default config, a private
//! containerd (own root, state, socket, namespace) starts with it, its CRI status lists the
//! runtime, `containerd config dump` shows it with `pod_annotations`, and
//! `ctr run --runtime io.containerd.kybernate.v1` runs a container through the installed
//! shim. Uninstall then restores the config and the runtime is gone.
//!
//! The Kybernate shim (issue 5) is not built yet: the stock `containerd-shim-runc-v2` of
//! each version is installed under the name `containerd-shim-kybernate-v1` with
//! `--shim-source`, which proves the installer's part end to end.

mod common;
mod cri;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{fixture, Host};
use kybernate_installer::probe::CriStatusProbe;
use kybernate_installer::restart::{ContainerdProbe, ProbeOutcome};

const IMAGE: &str = "docker.io/kybernate/busybox:installer-test";

struct Version {
    label: &'static str,
    bin_dir: PathBuf,
    fixture: &'static str,
    /// Config version 3 keeps NRI on by default with a fixed socket; tests turn it off.
    v3: bool,
}

fn containerd_16() -> Version {
    Version {
        label: "1.6",
        bin_dir: PathBuf::from("/usr/bin"),
        fixture: "containerd-1.6-default.toml",
        v3: false,
    }
}

fn containerd_21() -> Version {
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
    fn tool(&self, name: &str) -> PathBuf {
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
struct PrivateContainerd {
    host: Host,
    version: Version,
    config: PathBuf,
    socket: PathBuf,
    namespace: String,
    daemon: Option<Child>,
}

impl PrivateContainerd {
    fn new(version: Version) -> Self {
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

    fn installer(&self, extra: &[&str]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_kybernate-installer"))
            .arg("--host-root")
            .arg(self.host.root())
            .arg("--shim-source")
            .arg(self.version.tool("containerd-shim-runc-v2"))
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
    fn path_env(&self) -> String {
        format!(
            "{}:/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/sbin:/usr/local/bin",
            self.host.path("/usr/local/bin").display()
        )
    }

    fn start(&mut self) -> ProbeOutcome {
        self.spawn();
        self.wait_answering()
    }

    fn spawn(&mut self) {
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

    fn wait_answering(&mut self) -> ProbeOutcome {
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

    fn stop(&mut self) {
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

    fn log(&self) -> String {
        fs::read_to_string(self.host.dir.path().join("containerd.log")).unwrap_or_default()
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_in(&self.namespace, args)
    }

    fn ctr_in(&self, namespace: &str, args: &[&str]) -> Output {
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

    fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?}: {}{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn config_dump(&self) -> String {
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
    fn shim_pids(&self) -> Vec<u32> {
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

fn busybox_image(dir: &Path) -> PathBuf {
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

fn end_to_end(version: Version) {
    let mut ctd = PrivateContainerd::new(version);
    let pristine = fs::read(&ctd.config).unwrap();

    ctd.installer(&[]);
    let dump = ctd.config_dump();
    let table = dump
        .find("runtimes.kybernate]")
        .unwrap_or_else(|| panic!("config dump lacks the runtime:\n{dump}"));
    let entry = &dump[table
        ..dump[table..]
            .find("options]")
            .map_or(dump.len(), |e| table + e)];
    assert!(entry.contains("io.containerd.kybernate.v1"), "{entry}");
    assert!(
        entry.contains("pod_annotations = [\"kybernate.io/*\"]")
            || entry.contains("pod_annotations = ['kybernate.io/*']"),
        "{entry}"
    );

    assert_eq!(
        ctd.start(),
        ProbeOutcome::Answering {
            runtime_listed: true
        },
        "CRI status of the patched containerd"
    );

    let image = busybox_image(ctd.host.dir.path());
    ctd.ctr_ok(&["images", "import", image.to_str().unwrap()]);
    let out = ctd.ctr_ok(&[
        "run",
        "--rm",
        "--runtime",
        "io.containerd.kybernate.v1",
        IMAGE,
        "echo-once",
        "/bin/echo",
        "through-kybernate",
    ]);
    assert_eq!(out.trim(), "through-kybernate");

    // A long-running task: its shim process is the installed binary.
    ctd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        "io.containerd.kybernate.v1",
        IMAGE,
        "sleeper",
        "/bin/sleep",
        "300",
    ]);
    let info = ctd.ctr_ok(&["containers", "info", "sleeper"]);
    assert!(info.contains("io.containerd.kybernate.v1"), "{info}");
    let installed = ctd.host.path("/usr/local/bin/containerd-shim-kybernate-v1");
    let shims: Vec<PathBuf> = ctd
        .shim_pids()
        .iter()
        .filter_map(|pid| fs::read_link(format!("/proc/{pid}/exe")).ok())
        .collect();
    assert!(
        shims.contains(&installed),
        "no shim runs from {}: {shims:?}",
        installed.display()
    );
    ctd.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", "sleeper"]);
    for _ in 0..50 {
        if ctd.ctr(&["tasks", "delete", "sleeper"]).status.success() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ctd.ctr_ok(&["containers", "rm", "sleeper"]);

    // Uninstall: config back byte for byte, shim gone; after a restart the runtime is gone.
    ctd.installer(&["--uninstall"]);
    assert_eq!(
        fs::read(&ctd.config).unwrap(),
        pristine,
        "config after uninstall"
    );
    assert!(!installed.exists());
    ctd.stop();
    assert_eq!(
        ctd.start(),
        ProbeOutcome::Answering {
            runtime_listed: false
        },
        "CRI status after uninstall"
    );
    let out = ctd.ctr(&[
        "run",
        "--rm",
        "--runtime",
        "io.containerd.kybernate.v1",
        IMAGE,
        "after-uninstall",
        "/bin/true",
    ]);
    assert!(
        !out.status.success(),
        "the runtime still runs after uninstall"
    );
}

#[test]
fn containerd_16_runs_a_container_through_the_installed_runtime() {
    end_to_end(containerd_16());
}

#[test]
fn containerd_21_runs_a_container_through_the_installed_runtime() {
    end_to_end(containerd_21());
}

fn golden(name: &str) -> String {
    fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name),
    )
    .unwrap()
}

/// `containerd config dump` of `config`; asserts the kybernate runtime is in it and returns it.
fn dump_with_runtime(version: &Version, config: &Path) -> String {
    let out = Command::new(version.tool("containerd"))
        .arg("--config")
        .arg(config)
        .args(["config", "dump"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "containerd {} config dump {}: {}",
        version.label,
        config.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = String::from_utf8_lossy(&out.stdout).into_owned();
    let start = dump
        .find("runtimes.kybernate]")
        .unwrap_or_else(|| panic!("{}: no kybernate runtime in\n{dump}", config.display()));
    let entry = &dump[start..];
    let entry = &entry[..entry
        .find("runtimes.kybernate.options]")
        .unwrap_or(entry.len())];
    assert!(entry.contains("io.containerd.kybernate.v1"), "{entry}");
    assert!(
        entry.contains("[\"kybernate.io/*\"]") || entry.contains("['kybernate.io/*']"),
        "{entry}"
    );
    dump
}

#[test]
fn real_containerd_reads_every_installed_golden_config() {
    let dir = tempfile::tempdir().unwrap();
    let v16 = containerd_16();
    for name in [
        "containerd-1.6-default.installed",
        "microk8s-template.installed",
        "k3s-no-template.installed",
    ] {
        let path = dir.path().join(name);
        fs::write(&path, golden(name)).unwrap();
        dump_with_runtime(&v16, &path);
    }
    let v21 = containerd_21();
    let path = dir.path().join("containerd-2.1-default.installed");
    fs::write(&path, golden("containerd-2.1-default.installed")).unwrap();
    dump_with_runtime(&v21, &path);

    // The drop-in merges into the main config under containerd 2.1: the runtime appears and
    // the main config's runc settings stay.
    let conf_d = dir.path().join("conf.d");
    fs::create_dir(&conf_d).unwrap();
    fs::write(
        conf_d.join("kybernate.toml"),
        golden("containerd-2.1-imports.installed"),
    )
    .unwrap();
    let main = dir.path().join("config.toml");
    let text = fixture("containerd-2.1-imports.toml")
        .replace("/etc/containerd/conf.d", &conf_d.display().to_string());
    fs::write(&main, text).unwrap();
    let dump = dump_with_runtime(&v21, &main);
    let runc = &dump[dump
        .find("runtimes.runc.options]")
        .expect("runc options kept")..];
    assert!(
        runc[..runc.find("\n\n").unwrap_or(runc.len())].contains("SystemdCgroup = true"),
        "{dump}"
    );
    let ours = &dump[dump
        .find("runtimes.kybernate.options]")
        .expect("kybernate options")..];
    assert!(
        ours[..ours.find("\n\n").unwrap_or(ours.len())].contains("SystemdCgroup = true"),
        "{dump}"
    );
}

/// The fake init system of this machine (which has no systemd): `systemctl restart
/// containerd` stops the private containerd and spawns it again without waiting, so the
/// installer's own wait (with the real CRI probe) is what sees it come back.
struct FakeSystemd<'a> {
    ctd: &'a std::cell::RefCell<PrivateContainerd>,
    commands: std::cell::RefCell<Vec<String>>,
}

impl kybernate_installer::restart::HostCommand for FakeSystemd<'_> {
    fn run(&self, argv: &[&str]) -> kybernate_installer::Result<()> {
        self.commands.borrow_mut().push(argv.join(" "));
        assert_eq!(argv, ["systemctl", "restart", "containerd"]);
        let mut ctd = self.ctd.borrow_mut();
        ctd.stop();
        ctd.spawn();
        Ok(())
    }
}

#[test]
fn install_restarts_containerd_and_waits_until_it_lists_the_runtime() {
    use clap::Parser;
    use kybernate_installer::cli::{run_with, Args};

    let ctd = std::cell::RefCell::new(PrivateContainerd::new(containerd_16()));
    assert_eq!(
        ctd.borrow_mut().start(),
        ProbeOutcome::Answering {
            runtime_listed: false
        }
    );
    let (root, socket, shim) = {
        let c = ctd.borrow();
        (
            c.host.root(),
            c.socket.clone(),
            c.version.tool("containerd-shim-runc-v2"),
        )
    };
    // The config names the socket by its real path; the installer resolves it under the
    // host root, as it would in the DaemonSet. Make that path lead to the real socket.
    let mirrored = root.join(socket.parent().unwrap().strip_prefix("/").unwrap());
    fs::create_dir_all(mirrored.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(socket.parent().unwrap(), &mirrored).unwrap();

    // A workload that must survive the restart untouched.
    let image = busybox_image(ctd.borrow().host.dir.path());
    ctd.borrow()
        .ctr_ok(&["images", "import", image.to_str().unwrap()]);
    ctd.borrow()
        .ctr_ok(&["run", "-d", IMAGE, "workload", "/bin/sleep", "300"]);
    let workload = |c: &PrivateContainerd| -> String {
        let tasks = c.ctr_ok(&["tasks", "ls"]);
        tasks
            .lines()
            .find(|l| l.starts_with("workload"))
            .unwrap_or("workload missing")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    let before = workload(&ctd.borrow());
    assert!(before.ends_with("RUNNING"), "{before}");

    let fake = FakeSystemd {
        ctd: &ctd,
        commands: Default::default(),
    };
    let base = [
        "kybernate-installer",
        "--host-root",
        root.to_str().unwrap(),
        "--shim-source",
        shim.to_str().unwrap(),
        "--wait-seconds",
        "30",
    ];
    run_with(&Args::try_parse_from(base).unwrap(), &fake).unwrap();
    assert_eq!(*fake.commands.borrow(), ["systemctl restart containerd"]);
    assert_eq!(
        CriStatusProbe::new(&socket).probe(),
        ProbeOutcome::Answering {
            runtime_listed: true
        }
    );
    assert_eq!(
        workload(&ctd.borrow()),
        before,
        "the running workload (same pid) after the restart"
    );

    // Nothing changed: no restart.
    run_with(&Args::try_parse_from(base).unwrap(), &fake).unwrap();
    assert_eq!(
        fake.commands.borrow().len(),
        1,
        "an idempotent run restarted containerd"
    );

    let mut uninstall = base.to_vec();
    uninstall.push("--uninstall");
    run_with(&Args::try_parse_from(uninstall).unwrap(), &fake).unwrap();
    assert_eq!(fake.commands.borrow().len(), 2);
    assert_eq!(
        CriStatusProbe::new(&socket).probe(),
        ProbeOutcome::Answering {
            runtime_listed: false
        }
    );
}

/// What kubelet relies on: a pod sandbox run through CRI with runtime handler `kybernate`
/// uses the installed runtime, and of the pod's annotations exactly the `kybernate.io/*`
/// ones reach the OCI spec (restore reads `kybernate.io/restore-from` from there).
fn cri_passes_kybernate_annotations(version: Version) {
    let mut ctd = PrivateContainerd::new(version);
    let mut doc: toml_edit::DocumentMut = fs::read_to_string(&ctd.config).unwrap().parse().unwrap();
    // This machine refuses a negative oom_score_adj, which CRI gives sandboxes (-998)
    // unless told to stay at containerd's own.
    if ctd.version.v3 {
        doc["plugins"]["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"] =
            toml_edit::value(IMAGE);
        doc["plugins"]["io.containerd.cri.v1.runtime"]["restrict_oom_score_adj"] =
            toml_edit::value(true);
    } else {
        doc["plugins"]["io.containerd.grpc.v1.cri"]["sandbox_image"] = toml_edit::value(IMAGE);
        doc["plugins"]["io.containerd.grpc.v1.cri"]["restrict_oom_score_adj"] =
            toml_edit::value(true);
    }
    fs::write(&ctd.config, doc.to_string()).unwrap();
    ctd.installer(&[]);
    assert_eq!(
        ctd.start(),
        ProbeOutcome::Answering {
            runtime_listed: true
        }
    );
    let image = busybox_image(ctd.host.dir.path());
    let out = ctd.ctr_in("k8s.io", &["images", "import", image.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "import: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let annotations = [
        (
            "kybernate.io/restore-from".to_string(),
            "ckpt-42".to_string(),
        ),
        ("example.com/not-passed".to_string(), "x".to_string()),
    ];
    let request = cri::RunPodSandboxRequest {
        config: Some(cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "restore-me".into(),
                uid: format!("uid-{}", std::process::id()),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: String::new(),
            annotations: annotations.into_iter().collect(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: String::new(),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    // Host network: no CNI needed.
                    namespace_options: Some(cri::NamespaceOption {
                        network: 2,
                        pid: 0,
                        ipc: 0,
                    }),
                }),
            }),
            ..Default::default()
        }),
        runtime_handler: "kybernate".into(),
    };
    let sandbox: cri::RunPodSandboxResponse = cri::call(
        &ctd.socket,
        "/runtime.v1.RuntimeService/RunPodSandbox",
        request,
    )
    .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", ctd.log()));
    let id = sandbox.pod_sandbox_id;
    let out = ctd.ctr_in("k8s.io", &["containers", "info", &id]);
    assert!(
        out.status.success(),
        "containers info: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        info["Runtime"]["Name"], "io.containerd.kybernate.v1",
        "{info}"
    );
    let spec_annotations = &info["Spec"]["annotations"];
    assert_eq!(
        spec_annotations["kybernate.io/restore-from"], "ckpt-42",
        "{spec_annotations}"
    );
    assert!(
        spec_annotations.get("example.com/not-passed").is_none(),
        "{spec_annotations}"
    );

    // The sandbox's /bin/sh has exited by now; containerd 1.6 can race its own cleanup on
    // the first stop, so stop until it reports success.
    let mut stopped = Err(String::new());
    for _ in 0..20 {
        let stop = cri::PodSandboxIdRequest {
            pod_sandbox_id: id.clone(),
        };
        stopped = cri::call::<_, cri::Empty>(
            &ctd.socket,
            "/runtime.v1.RuntimeService/StopPodSandbox",
            stop,
        );
        if stopped.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stopped.unwrap();
    let remove = cri::PodSandboxIdRequest { pod_sandbox_id: id };
    let _: cri::Empty = cri::call(
        &ctd.socket,
        "/runtime.v1.RuntimeService/RemovePodSandbox",
        remove,
    )
    .unwrap();
}

#[test]
fn containerd_16_cri_passes_kybernate_pod_annotations() {
    cri_passes_kybernate_annotations(containerd_16());
}

#[test]
fn containerd_21_cri_passes_kybernate_pod_annotations() {
    cri_passes_kybernate_annotations(containerd_21());
}
