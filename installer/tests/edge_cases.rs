//! Config shapes beyond the golden files: where drop-ins are and are not used, which
//! runtime's options are copied, updating the installer's own entry, and layouts it refuses.

mod common;

use std::fs;

use common::{assert_refused, Host};
use kybernate_installer::install::plan_install;
use kybernate_installer::uninstall::plan_uninstall;

const CONFIG: &str = "/etc/containerd/config.toml";

#[test]
fn version_2_with_imports_is_edited_in_place_not_through_a_dropin() {
    // containerd 1.6 replaces a whole plugin table from an import (see dropin.rs).
    let host = Host::new();
    let text = "version = 2\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n";
    host.put(CONFIG, text);
    plan_install(&host.options()).unwrap().apply().unwrap();
    assert!(!host.path("/etc/containerd/conf.d/kybernate.toml").exists());
    assert!(fs::read_to_string(host.path(CONFIG))
        .unwrap()
        .contains("runtimes.kybernate]"));
}

#[test]
fn relative_import_puts_the_dropin_beside_the_config() {
    let host = Host::new();
    let text = "version = 3\nimports = ['conf.d/*.toml']\n";
    host.put(CONFIG, text);
    plan_install(&host.options()).unwrap().apply().unwrap();
    assert_eq!(
        fs::read_to_string(host.path(CONFIG)).unwrap(),
        text,
        "main config untouched"
    );
    let dropin = fs::read_to_string(host.path("/etc/containerd/conf.d/kybernate.toml")).unwrap();
    assert!(
        dropin.contains("[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.kybernate]"),
        "{dropin}"
    );
    assert!(
        !dropin.contains("options"),
        "no runc options to copy: {dropin}"
    );
}

#[test]
fn options_come_from_the_default_runtime() {
    let host = Host::new();
    host.put(
        CONFIG,
        r#"version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "crun"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = false
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.crun.options]
  BinaryName = "/usr/bin/crun"
  SystemdCgroup = true
  CriuPath = "/usr/sbin/criu"
"#,
    );
    plan_install(&host.options()).unwrap().apply().unwrap();
    let text = fs::read_to_string(host.path(CONFIG)).unwrap();
    let ours = &text[text.find("runtimes.kybernate.options]").unwrap()..];
    assert!(ours.contains("SystemdCgroup = true"), "{ours}");
    assert!(ours.contains("BinaryName = \"/usr/bin/crun\""), "{ours}");
    assert!(
        !ours.contains("CriuPath"),
        "CRIU paths are the agent's business: {ours}"
    );
}

#[test]
fn the_installers_own_outdated_entry_is_updated_and_uninstall_still_restores_the_original() {
    let host = Host::new();
    let original = "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n  SystemdCgroup = false\n";
    host.put(CONFIG, original);
    plan_install(&host.options()).unwrap().apply().unwrap();
    // The node switches to the systemd cgroup driver after the install.
    let installed = fs::read_to_string(host.path(CONFIG)).unwrap();
    let switched = installed.replacen("SystemdCgroup = false", "SystemdCgroup = true", 1);
    fs::write(host.path(CONFIG), &switched).unwrap();
    let out = host.run(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let updated = fs::read_to_string(host.path(CONFIG)).unwrap();
    assert_eq!(
        updated.matches("SystemdCgroup = true").count(),
        2,
        "{updated}"
    );
    assert_eq!(
        updated.matches("runtimes.kybernate]").count(),
        1,
        "{updated}"
    );
    assert_eq!(
        fs::read_to_string(host.path("/etc/containerd/config.toml.kybernate-backup")).unwrap(),
        original
    );
    plan_uninstall(&host.options()).unwrap().apply().unwrap();
    // The runc change made after the install stays; the backup is kept because it differs.
    let after = fs::read_to_string(host.path(CONFIG)).unwrap();
    assert_eq!(
        after,
        original.replace("SystemdCgroup = false", "SystemdCgroup = true")
    );
    assert!(host
        .path("/etc/containerd/config.toml.kybernate-backup")
        .exists());
}

#[test]
fn dotted_key_layout_is_refused_with_the_key_named() {
    let host = Host::new();
    host.put(CONFIG, "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  containerd.snapshotter = \"overlayfs\"\n");
    let before = host.snapshot();
    let out = host.run(&[]);
    assert_refused(&out, &["config.toml", "`containerd`", "dotted keys"]);
    assert_eq!(host.snapshot(), before);
}

#[test]
fn foreign_runtime_in_a_go_template_is_refused_even_with_force() {
    let host = Host::new();
    let dir = "/var/lib/rancher/k3s/agent/etc/containerd";
    host.put(&format!("{dir}/config.toml"), "version = 2\n");
    host.put(
        &format!("{dir}/config.toml.tmpl"),
        "{{ template \"base\" . }}\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kybernate]\n  runtime_type = \"io.containerd.runc.v2\"\n",
    );
    let before = host.snapshot();
    assert_refused(&host.run(&[]), &["config.toml.tmpl", "--force"]);
    assert_refused(
        &host.run(&["--force"]),
        &["config.toml.tmpl", "remove it by hand"],
    );
    assert_eq!(host.snapshot(), before);
}

#[test]
fn the_socket_comes_from_the_configs_grpc_address() {
    let host = Host::new();
    host.put(
        CONFIG,
        "version = 2\n[grpc]\n  address = \"/run/other/containerd.sock\"\n",
    );
    let plan = plan_install(&host.options()).unwrap();
    assert_eq!(
        plan.target.socket,
        std::path::Path::new("/run/other/containerd.sock")
    );
}
