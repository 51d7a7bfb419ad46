//! Real daemons: for containerd 1.6 (bookworm) and 2.1 (sid, from
//! scripts/install-containerd.sh) the installer patches the real default config, a private
//! containerd (own root, state, socket, namespace) starts with it, its CRI status lists the
//! runtime, `containerd config dump` shows it with `pod_annotations`, and
//! `ctr run --runtime io.containerd.kybernate.v1` runs a container through the installed
//! shim. Uninstall then restores the config and the runtime is gone. Through CRI, a pod
//! sandbox with runtime handler `kybernate` gets exactly its `kybernate.io/*` annotations in
//! the OCI spec. A fake systemd restarts a real daemon, and the installer waits for it with
//! the real CRI probe while a runc workload keeps running.
//!
//! The shim installed is the workspace's own `containerd-shim-kybernate-v1`, so `ctr run`
//! goes through the real Kybernate shim.

mod common;
mod cri;
mod daemon;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::fixture;
use daemon::{busybox_image, containerd_16, containerd_21, PrivateContainerd, Version, IMAGE};
use kybernate_installer::probe::CriStatusProbe;
use kybernate_installer::restart::{ContainerdProbe, ProbeOutcome};

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
fn install_restarts_containerd_when_the_running_one_lacks_the_runtime_and_waits_for_it() {
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
    // --no-restart patches the config only; the running containerd does not know it yet.
    let mut no_restart = base.to_vec();
    no_restart.push("--no-restart");
    run_with(&Args::try_parse_from(no_restart).unwrap(), &fake).unwrap();
    assert!(fake.commands.borrow().is_empty());
    assert_eq!(
        CriStatusProbe::new(&socket).probe(),
        ProbeOutcome::Answering {
            runtime_listed: false
        }
    );

    // The next run finds the config unchanged but not loaded, so it restarts and waits.
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
/// ones reach the OCI spec (restore reads `kybernate.io/restore-from` from there; a neutral
/// `kybernate.io/*` key is used here, since the real shim would act on `restore-from`).
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
            "kybernate.io/checkpoint-policy".to_string(),
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
        spec_annotations["kybernate.io/checkpoint-policy"], "ckpt-42",
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
