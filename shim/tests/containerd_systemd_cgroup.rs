//! The `kybernate` runtime's runc options reach runc through real containerd 1.6 and 2.1:
//! `SystemdCgroup` as `--systemd-cgroup`, `BinaryName` as the binary run, `Root` as runc's
//! state root, `NoPivotRoot` and `NoNewKeyring` as create flags, `CriuPath` as `--criu`,
//! `ShimCgroup` as the shim's cgroup, `IoUid`/`IoGid` as the owner of the container's stdio
//! pipes; a `CriuPath` that cannot run or a `ShimCgroup` that does not exist fails Create by
//! name. The options travel as containerd's generic runtime
//! options (`runtimeoptions.v1.Options`), as CRI sends the installer's copied table; here
//! `ctr run --runtime-config-path` sends them as a file.
//!
//! On a host whose init is systemd the container runs in a systemd scope. On a host without
//! systemd (these VMs: PID 1 is not systemd) runc's systemd driver cannot work, and Create
//! must fail with an error naming the option and runc's reason, and leave no task behind.

mod harness;

use std::path::Path;

use harness::{containerd_16, containerd_21, Node, Version, IMAGE, KYBERNATE};

/// A cgroup made for the test in every hierarchy (cgroup v1) or the one tree (v2), removed
/// on drop.
struct TestCgroup {
    name: String,
    dirs: Vec<std::path::PathBuf>,
}

impl TestCgroup {
    fn new(name: &str) -> Self {
        let root = Path::new("/sys/fs/cgroup");
        let hierarchies: Vec<std::path::PathBuf> = if root.join("cgroup.controllers").is_file() {
            vec![root.to_owned()]
        } else {
            std::fs::read_dir(root)
                .unwrap()
                .filter_map(|e| Some(e.ok()?.path()))
                .filter(|p| p.join("cgroup.procs").is_file())
                .collect()
        };
        let dirs: Vec<_> = hierarchies.iter().map(|h| h.join(name)).collect();
        for dir in &dirs {
            std::fs::create_dir_all(dir).unwrap();
            // A v1 cpuset cgroup takes no process until it has CPUs and memory nodes.
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(parent) = std::fs::read_to_string(dir.parent().unwrap().join(file)) {
                    std::fs::write(dir.join(file), parent.trim()).unwrap();
                }
            }
        }
        Self {
            name: name.to_owned(),
            dirs,
        }
    }

    fn members(&self) -> Vec<String> {
        self.dirs
            .iter()
            .flat_map(|d| {
                std::fs::read_to_string(d.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for dir in &self.dirs {
            // A shim still inside (a failed test) goes back to the root cgroup first.
            let root = dir.parent().unwrap().join("cgroup.procs");
            for pid in std::fs::read_to_string(dir.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
            {
                let _ = std::fs::write(&root, pid);
            }
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

/// A container whose runtime option `key` is `value` (which cannot work) fails Create with
/// an error naming both, and leaves no task.
fn refused_by_name(node: &Node, key: &str, value: &str) {
    let config = node.dir.path().join("broken.toml");
    std::fs::write(&config, format!("{key} = \"{value}\"\n")).unwrap();
    let out = node.ctr(&[
        "run",
        "-d",
        "--runtime",
        KYBERNATE,
        "--runtime-config-path",
        config.to_str().unwrap(),
        IMAGE,
        "broken",
        "true",
    ]);
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{key} = {value:?} was accepted");
    assert!(
        text.contains(key) && text.contains(value),
        "the refusal does not name {key} and its value: {text}"
    );
    assert!(node.task_status("broken").is_none());
    let _ = node.ctr(&["containers", "rm", "broken"]);
}

/// `name` as found on PATH.
fn which(name: &str) -> std::path::PathBuf {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not on PATH"))
}

fn systemd_is_init() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

fn systemd_option_reaches_runc(version: Version) {
    let node = Node::start(version);
    let plain = node.dir.path().join("plain.toml");
    let systemd = node.dir.path().join("systemd.toml");
    // BinaryName is honoured too: a wrapper that records each call, then runs runc.
    let wrapper = node.dir.path().join("runc-wrapper");
    let calls = node.dir.path().join("wrapper-calls");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$*\" >> {}\nexec /usr/bin/runc \"$@\"\n",
            calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let root = node.dir.path().join("other-runc-root");
    let criu = which("criu");
    let shim_cgroup = TestCgroup::new(&format!("kybernate-shim-test-{}", node.namespace));
    std::fs::write(
        &plain,
        format!(
            "SystemdCgroup = false\nBinaryName = \"{}\"\nRoot = \"{}\"\nNoPivotRoot = true\n\
             NoNewKeyring = true\nCriuPath = \"{}\"\nShimCgroup = \"/{}\"\nIoUid = 4321\n\
             IoGid = 4322\n",
            wrapper.display(),
            root.display(),
            criu.display(),
            shim_cgroup.name
        ),
    )
    .unwrap();
    std::fs::write(&systemd, "BinaryName = \"runc\"\nSystemdCgroup = true\n").unwrap();

    node.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        KYBERNATE,
        "--runtime-config-path",
        plain.to_str().unwrap(),
        IMAGE,
        "plain",
        "sleep",
        "300",
    ]);
    node.wait_status("plain", "RUNNING");
    let state = root.join(&node.namespace).join("plain").join("state.json");
    assert!(
        state.is_file(),
        "runc's state is not under Root: {} is missing",
        state.display()
    );
    let init = node
        .ctr_ok(&["tasks", "ls"])
        .lines()
        .find_map(|l| l.strip_prefix("plain "))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u32>().ok())
        .expect("the pid of plain");
    // runc's init gives its stdio to the process's user (root here) and keeps the group, so
    // IoGid is what stays visible.
    let stdout = std::fs::metadata(format!("/proc/{init}/fd/1")).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::gid(&stdout),
        4322,
        "the container's stdout pipe does not belong to IoGid"
    );
    let shims = shim_cgroup.members();
    assert!(
        shims.iter().any(
            |pid| std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.contains("containerd-shim-kybernate-v1"))
        ),
        "the shim is not in ShimCgroup: members {shims:?}"
    );
    node.remove("plain");
    let recorded = std::fs::read_to_string(&calls).unwrap_or_default();
    let create = recorded
        .lines()
        .find(|l| l.split_whitespace().any(|w| w == "create"))
        .unwrap_or_else(|| panic!("no runc create recorded: {recorded}"));
    let root_flag = format!("--root {}/{}", root.display(), node.namespace);
    let criu_flag = format!("--criu {}", criu.display());
    for flag in ["--no-pivot", "--no-new-keyring", &root_flag, &criu_flag] {
        assert!(
            create.contains(flag),
            "{flag} missing from runc create: {create}"
        );
    }
    assert!(
        !root.join(&node.namespace).join("plain").exists(),
        "runc's state under Root stayed after delete"
    );

    refused_by_name(&node, "CriuPath", "/nonexistent/criu");
    refused_by_name(&node, "ShimCgroup", "/kybernate-no-such-cgroup");
    for command in ["create", "start", "kill", "delete"] {
        assert!(
            recorded
                .lines()
                .any(|l| l.split_whitespace().any(|w| w == command)
                    && !l.contains("--systemd-cgroup")),
            "BinaryName's wrapper never ran `{command}` (cgroupfs): {recorded}"
        );
    }

    let cgroup = format!("system.slice:kybernate-test:{}", node.namespace);
    let out = node.ctr(&[
        "run",
        "-d",
        "--runtime",
        KYBERNATE,
        "--runtime-config-path",
        systemd.to_str().unwrap(),
        "--cgroup",
        &cgroup,
        IMAGE,
        "scoped",
        "sleep",
        "300",
    ]);
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    if systemd_is_init() {
        assert!(out.status.success(), "SystemdCgroup = true failed: {text}");
        node.wait_status("scoped", "RUNNING");
        let pids = node.ctr_ok(&["tasks", "ps", "scoped"]);
        let pid = pids
            .lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().next())
            .expect("a pid of scoped");
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert!(
            cgroup.contains(&format!("kybernate-test-{}.scope", node.namespace)),
            "the container is not in a systemd scope: {cgroup}"
        );
        node.remove("scoped");
    } else {
        assert!(
            !out.status.success(),
            "SystemdCgroup = true started a container on a host without systemd"
        );
        assert!(
            text.contains("SystemdCgroup = true")
                && text.contains("--systemd-cgroup")
                && text.contains("systemd not running on this host"),
            "the refusal does not name the option and runc's reason: {text}"
        );
        assert!(
            node.task_status("scoped").is_none(),
            "a task is left after the refused Create"
        );
        let _ = node.ctr(&["containers", "rm", "scoped"]);
        // No options at all (containerd 1.x's CRI passes none to a non-runc shim): the
        // kubelet's systemd-style cgroupsPath alone selects the systemd driver.
        let out = node.ctr(&[
            "run",
            "-d",
            "--runtime",
            KYBERNATE,
            "--cgroup",
            &cgroup,
            IMAGE,
            "by-path",
            "true",
        ]);
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success() && text.contains("systemd not running on this host"),
            "a slice:prefix:name cgroupsPath did not select the systemd driver: {text}"
        );
        let _ = node.ctr(&["containers", "rm", "by-path"]);
    }
}

#[test]
fn containerd_16_runtime_options_reach_runc() {
    systemd_option_reaches_runc(containerd_16());
}

#[test]
fn containerd_21_runtime_options_reach_runc() {
    systemd_option_reaches_runc(containerd_21());
}
