//! Checkpoints are private to root on disk: every directory the agent and CRIU create is 0700
//! and every file 0600, in every tier; a tier directory others could tamper with is refused
//! at start-up (real CRIU, root).

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use support::{TestAgent, Workload, AGENT};

/// Every directory and file under `root`, with its permission bits.
fn modes(root: &Path) -> Vec<(String, bool, u32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root).unwrap().flatten() {
        let meta = entry.path().symlink_metadata().unwrap();
        let mode = meta.permissions().mode() & 0o7777;
        out.push((entry.path().display().to_string(), meta.is_dir(), mode));
        if meta.is_dir() {
            out.extend(modes(&entry.path()));
        }
    }
    out
}

#[test]
fn checkpoint_data_is_0700_directories_and_0600_files_in_every_tier() {
    let agent = TestAgent::start();
    let mut workload = Workload::start(agent.dir.path(), 16, &[]);
    agent.ctl_json(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "private",
        "--leave-running",
    ]);
    // A stop-mode checkpoint too: it leaves a quarantined or partial directory on failure
    // paths, and its images stay in the RAM tier.
    agent.ctl_json(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "private-stop",
    ]);
    workload.reap_dumped();

    let state = agent.state_dir();
    let all = modes(&state);
    let images = all.iter().filter(|(p, ..)| p.ends_with(".img")).count();
    assert!(images > 0, "the RAM tier holds CRIU images: {all:?}");
    assert!(
        all.iter().any(|(p, ..)| p.contains("/nvme/chunks/")),
        "the NVMe tier holds chunks: {all:?}"
    );
    let open: Vec<_> = all
        .iter()
        .filter(|(_, is_dir, mode)| *mode != if *is_dir { 0o700 } else { 0o600 })
        .collect();
    assert!(open.is_empty(), "open to others: {open:?}");
    let top = std::fs::metadata(&state).unwrap().permissions().mode() & 0o7777;
    assert_eq!(top, 0o700, "the state directory");

    // Restored from NVMe, the staged images are private too.
    let restored = agent.ctl_json(&["restore", "private-stop", "--from", "nvme"]);
    workload.restored_as(support::pid_of(&restored));
    let open: Vec<_> = modes(&state)
        .into_iter()
        .filter(|(_, is_dir, mode)| *mode != if *is_dir { 0o700 } else { 0o600 })
        .collect();
    assert!(open.is_empty(), "open to others after a restore: {open:?}");
}

#[test]
fn a_tier_directory_others_may_write_is_refused_at_start_naming_it() {
    support::require_root_and_criu();
    let dir = tempfile::Builder::new()
        .prefix("kybernate-modes-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let ram = dir.path().join("ram");
    std::fs::create_dir(&ram).unwrap();
    std::fs::set_permissions(&ram, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::write(
        dir.path().join("agent.toml"),
        format!("[tiers]\nram_path = \"{}\"\n", ram.display()),
    )
    .unwrap();
    let out = Command::new(AGENT)
        .arg("--config")
        .arg(dir.path().join("agent.toml"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(dir.path().join("agent.sock"))
        .arg("--metrics-addr")
        .arg("127.0.0.1:0")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&ram.display().to_string())
            && text.contains("writable by others")
            && text.contains("mode 0777")
            && text.contains("owner uid 0"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
}
