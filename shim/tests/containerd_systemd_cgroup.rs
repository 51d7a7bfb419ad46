//! The `kybernate` runtime's runc options reach runc through real containerd 1.6 and 2.1:
//! `SystemdCgroup` as `--systemd-cgroup`, `BinaryName` as the binary run, `Root` as runc's
//! state root, `NoPivotRoot` and `NoNewKeyring` as create flags, `CriuPath` as `--criu`; a
//! `CriuPath` that cannot run fails Create by name. The options travel as containerd's generic runtime
//! options (`runtimeoptions.v1.Options`), as CRI sends the installer's copied table; here
//! `ctr run --runtime-config-path` sends them as a file.
//!
//! On a host whose init is systemd the container runs in a systemd scope. On a host without
//! systemd (these VMs: PID 1 is not systemd) runc's systemd driver cannot work, and Create
//! must fail with an error naming the option and runc's reason, and leave no task behind.

mod harness;

use std::path::Path;

use harness::{containerd_16, containerd_21, Node, Version, IMAGE, KYBERNATE};

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
    std::fs::write(
        &plain,
        format!(
            "SystemdCgroup = false\nBinaryName = \"{}\"\nRoot = \"{}\"\nNoPivotRoot = true\n\
             NoNewKeyring = true\nCriuPath = \"{}\"\n",
            wrapper.display(),
            root.display(),
            criu.display()
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

    let broken = node.dir.path().join("broken.toml");
    std::fs::write(&broken, "CriuPath = \"/nonexistent/criu\"\n").unwrap();
    let out = node.ctr(&[
        "run",
        "-d",
        "--runtime",
        KYBERNATE,
        "--runtime-config-path",
        broken.to_str().unwrap(),
        IMAGE,
        "broken",
        "true",
    ]);
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "a CriuPath that does not exist was accepted"
    );
    assert!(
        text.contains("CriuPath") && text.contains("/nonexistent/criu"),
        "the refusal does not name the option: {text}"
    );
    assert!(node.task_status("broken").is_none());
    let _ = node.ctr(&["containers", "rm", "broken"]);
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
