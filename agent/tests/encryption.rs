//! Encryption at rest through the real agent and CRIU: a checkpoint sealed on NVMe restores,
//! a new key and `kybernatectl reencrypt` move it to that key, and a flipped byte in a chunk
//! fails the restore by name.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use support::{pid_of, TestAgent, Workload};

fn add_key(dir: &Path, id: &str, byte: u8) {
    fs::create_dir_all(dir).unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).unwrap();
    let path = dir.join(id);
    fs::write(&path, format!("{byte:02x}").repeat(32)).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
}

fn manifest_version(agent: &TestAgent, name: &str) -> u32 {
    let bytes = fs::read(agent.nvme_manifest(name)).unwrap();
    u32::from_le_bytes(bytes[8..12].try_into().unwrap())
}

#[test]
fn a_sealed_checkpoint_restores_is_reencrypted_under_a_new_key_and_tampering_is_named() {
    let keys_root = tempfile::tempdir().unwrap();
    let keys = keys_root.path().join("keys");
    add_key(&keys, "2026-01-01", 1);
    let mut agent = TestAgent::start_with_config(&format!("[encryption]\nkey_file = {:?}\n", keys));
    let mut workload = Workload::start(agent.dir.path(), 32, &[]);
    agent.ctl_json(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "sealed",
        "--tier",
        "nvme",
    ]);
    workload.reap_dumped();
    let at_dump = workload.read().unwrap();
    assert_eq!(manifest_version(&agent, "sealed"), 2);
    fs::remove_dir_all(agent.ram_dir("sealed")).unwrap();
    let restored = agent.ctl_json(&["restore", "sealed"]);
    assert_eq!(restored["source_tier"], "nvme");
    workload.restored_as(pid_of(&restored));
    let after = workload.wait_for(|s| s.counter > at_dump.counter);
    assert_eq!(after.epoch, at_dump.epoch);
    assert!(workload.verify_memory().memory_ok);
    assert!(
        !agent.log().contains(&"01".repeat(32)),
        "key material logged"
    );

    // Rotation: a new key, then the checkpoint is moved to it.
    add_key(&keys, "2026-06-01", 2);
    agent.restart();
    let done = agent.ctl_json(&["reencrypt", "sealed"]);
    assert_eq!(done["from_key"], "2026-01-01", "{done}");
    assert_eq!(done["to_key"], "2026-06-01", "{done}");
    let again = agent.ctl_json(&["reencrypt", "sealed"]);
    assert_eq!(again["unchanged"], true, "{again}");
    workload.kill();
    let _ = fs::remove_dir_all(agent.ram_dir("sealed"));
    let restored = agent.ctl_json(&["restore", "sealed"]);
    assert_eq!(restored["source_tier"], "nvme");
    workload.restored_as(pid_of(&restored));
    // The same dump again: its counters start where they were at the dump.
    let again = workload.wait_for(|s| s.counter > at_dump.counter);
    assert_eq!(again.epoch, at_dump.epoch);
    assert!(again.memory_ok);
    workload.kill();

    // A flipped byte in a chunk: the restore fails and names checkpoint and chunk.
    let _ = fs::remove_dir_all(agent.ram_dir("sealed"));
    let chunk = agent.largest_nvme_chunk();
    let mut bytes = fs::read(&chunk).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    fs::write(&chunk, &bytes).unwrap();
    let err = agent.ctl_err(&["restore", "sealed"]);
    assert!(
        err.contains("sealed") && err.contains("chunk") && err.contains("authentication failed"),
        "{err}"
    );
}
