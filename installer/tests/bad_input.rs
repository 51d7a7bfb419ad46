//! Bad input through the real binary: each refusal is one line naming the problem, a
//! non-zero exit, and no file changed or half-written.

mod common;

use std::fs;
use std::process::Command;

use common::{assert_refused, fixture, Host};

const CONFIG: &str = "/etc/containerd/config.toml";

fn host_with(config: &str) -> Host {
    let host = Host::new();
    host.put(CONFIG, config);
    host
}

#[test]
fn unparseable_config_is_refused_and_nothing_changes() {
    let host = host_with("version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"\nfoo = 1\n");
    let before = host.snapshot();
    let out = host.run(&[]);
    assert_refused(&out, &["config.toml", "is not valid TOML"]);
    assert_eq!(
        host.snapshot(),
        before,
        "a refused install changed files (or installed the shim)"
    );
}

#[test]
fn config_versions_other_than_2_and_3_are_refused() {
    for (config, found) in [
        ("version = 1\n", "version 1"),
        ("oom_score = 0\n", "1 (no version key)"),
        ("version = 4\n", "version 4"),
    ] {
        let host = host_with(config);
        let before = host.snapshot();
        let out = host.run(&[]);
        assert_refused(&out, &["config.toml", found, "only version 2"]);
        assert_eq!(host.snapshot(), before);
    }
}

#[test]
fn missing_host_root_names_the_path() {
    let out = Command::new(env!("CARGO_BIN_EXE_kybernate-installer"))
        .args(["--host-root", "/nonexistent/kybernate-host", "--no-restart"])
        .output()
        .unwrap();
    assert_refused(&out, &["/nonexistent/kybernate-host", "does not exist"]);
}

#[test]
fn host_without_any_containerd_config_lists_what_was_tried() {
    let host = Host::new();
    let out = host.run(&[]);
    assert_refused(
        &out,
        &[
            "no containerd config found",
            "/etc/containerd/config.toml",
            "rancher/k3s",
            "microk8s",
        ],
    );
}

#[test]
fn missing_shim_directory_names_it() {
    let host = host_with(&fixture("containerd-1.6-default.toml"));
    fs::remove_dir(host.path("/usr/local/bin")).unwrap();
    let out = host.run(&[]);
    assert_refused(&out, &["usr/local/bin", "does not exist"]);
}

#[test]
fn missing_shim_source_names_it() {
    let host = host_with(&fixture("containerd-1.6-default.toml"));
    let out = Command::new(env!("CARGO_BIN_EXE_kybernate-installer"))
        .arg("--host-root")
        .arg(host.root())
        .args(["--shim-source", "/nonexistent/shim", "--no-restart"])
        .output()
        .unwrap();
    assert_refused(&out, &["shim source /nonexistent/shim"]);
}

#[test]
fn unknown_flavour_is_one_line() {
    let host = host_with(&fixture("containerd-1.6-default.toml"));
    let out = host.run(&["--flavour", "docker"]);
    assert_refused(&out, &["unknown flavour \"docker\""]);
}

const FOREIGN: &str = r#"version = 2

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kybernate]
  runtime_type = "io.containerd.runc.v2"
"#;

#[test]
fn foreign_kybernate_runtime_is_refused_unless_forced() {
    let host = host_with(FOREIGN);
    let before = host.snapshot();
    let out = host.run(&[]);
    assert_refused(
        &out,
        &[
            "config.toml",
            "already defines runtime `kybernate`",
            "--force",
        ],
    );
    assert_eq!(host.snapshot(), before);

    let out = host.run(&["--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = fs::read_to_string(host.path(CONFIG)).unwrap();
    assert!(
        text.contains("runtime_type = \"io.containerd.kybernate.v1\""),
        "{text}"
    );
    assert!(!text.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kybernate]\n  runtime_type = \"io.containerd.runc.v2\""));
    assert_eq!(
        fs::read_to_string(host.path("/etc/containerd/config.toml.kybernate-backup")).unwrap(),
        FOREIGN
    );

    // Now it is the installer's own: a plain rerun is idempotent and uninstall removes it.
    let settled = host.snapshot();
    assert!(host.run(&[]).status.success());
    assert_eq!(host.snapshot(), settled);
    let out = host.run(&["--uninstall"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = fs::read_to_string(host.path(CONFIG)).unwrap();
    assert!(!text.contains("kybernate"), "{text}");
    // The backup differs (it has the foreign entry), so it is kept.
    assert_eq!(
        fs::read_to_string(host.path("/etc/containerd/config.toml.kybernate-backup")).unwrap(),
        FOREIGN
    );
}

#[test]
fn an_identical_hand_written_runtime_is_accepted_and_not_removed() {
    let hand = "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kybernate]\n  runtime_type = \"io.containerd.kybernate.v1\"\n  pod_annotations = [\"kybernate.io/*\"]\n";
    let host = host_with(hand);
    assert!(host.run(&[]).status.success());
    assert_eq!(fs::read_to_string(host.path(CONFIG)).unwrap(), hand);
    let out = host.run(&["--uninstall"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not written by kybernate-installer"));
    assert_eq!(fs::read_to_string(host.path(CONFIG)).unwrap(), hand);
}

/// A read-only host mount: a tmpfs remounted read-only, unmounted again on drop.
struct ReadOnlyMount(std::path::PathBuf);

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn read_only_host_config_names_the_path_and_changes_nothing() {
    assert!(
        nix_is_root(),
        "this test needs root (mount); CI runs as root — run it as root"
    );
    let host = Host::new();
    let etc = host.path("/etc/containerd");
    fs::create_dir_all(&etc).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&etc)
        .status()
        .unwrap();
    assert!(status.success(), "mount tmpfs on {}", etc.display());
    let _mount = ReadOnlyMount(etc.clone());
    fs::write(
        etc.join("config.toml"),
        fixture("containerd-1.6-default.toml"),
    )
    .unwrap();
    let status = Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&etc)
        .status()
        .unwrap();
    assert!(status.success());
    let before = host.snapshot();
    let out = host.run(&[]);
    assert_refused(
        &out,
        &[
            "cannot write",
            "etc/containerd/config.toml",
            "Read-only file system",
        ],
    );
    // The shim was installed (it is a separate, writable mount), the config is untouched.
    let after = host.snapshot();
    for (path, bytes) in &before {
        assert_eq!(after.get(path), Some(bytes), "{} changed", path.display());
    }
}

fn nix_is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[test]
fn help_lists_every_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_kybernate-installer"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--host-root",
        "--no-restart",
        "--uninstall",
        "--dry-run",
        "--force",
        "--flavour",
        "--shim-source",
        "--help",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

#[test]
fn dry_run_prints_the_diff_and_writes_nothing() {
    let host = host_with(&fixture("containerd-2.1-default.toml"));
    let before = host.snapshot();
    let out = host.run(&["--dry-run"]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(
            "+        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.kybernate]"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("+          pod_annotations = [\"kybernate.io/*\"]"),
        "{stdout}"
    );
    assert_eq!(host.snapshot(), before);
}
