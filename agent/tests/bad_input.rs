//! Bad requests get clear errors, nothing is left frozen and the agent keeps serving.

mod support;

use std::os::unix::fs::PermissionsExt;

use support::{proc_state, TestAgent, Workload};

#[test]
fn bad_targets_and_names_are_refused() {
    let agent = TestAgent::start();
    let err = agent.ctl_err(&["checkpoint", "--pid", "999999999"]);
    assert!(err.contains("no process with PID 999999999"), "{err}");
    let err = agent.ctl_err(&["checkpoint", "--pid", "1"]);
    assert!(err.contains("refusing to checkpoint PID 1"), "{err}");
    let err = agent.ctl_err(&["checkpoint", "--pid=-3"]);
    assert!(err.contains("invalid PID -3"), "{err}");

    let workload = Workload::start(agent.dir.path(), 4, &[]);
    let err = agent.ctl_err(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "../escape",
    ]);
    assert!(
        err.contains("invalid checkpoint name \"../escape\""),
        "{err}"
    );
    assert!(!agent.state_dir().join("escape").exists());
    let err = agent.ctl_err(&["restore", "never-taken"]);
    assert!(err.contains("no checkpoint named never-taken"), "{err}");
    let err = agent.ctl_err(&["restore", "../../etc"]);
    assert!(err.contains("invalid checkpoint name"), "{err}");
    let err = agent.ctl_err(&["delete", "never-taken"]);
    assert!(err.contains("no checkpoint named never-taken"), "{err}");
    assert!(workload.is_alive());
    agent.assert_serving();
}

#[test]
fn deleted_or_corrupt_images_are_caught_before_criu() {
    let agent = TestAgent::start();
    let mut workload = Workload::start(agent.dir.path(), 16, &[]);
    agent.ctl_json(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "damaged",
    ]);
    workload.reap_dumped();

    let pages = |dir: std::path::PathBuf| {
        std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("pages-")
            })
            .unwrap()
    };
    let flip = |path: std::path::PathBuf| {
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
    };

    // A damaged RAM copy falls back to the intact NVMe copy.
    flip(pages(agent.ram_dir("damaged")));
    let restored = agent.ctl_json(&["restore", "damaged"]);
    assert_eq!(restored["source_tier"], "nvme");
    workload.restored_as(support::pid_of(&restored));
    workload.verify_memory();
    assert!(workload.read().unwrap().memory_ok);
    workload.kill();

    // Both copies damaged: a clear error that names each copy's problem, and no process.
    flip(agent.largest_nvme_chunk());
    let err = agent.ctl_err(&["restore", "damaged"]);
    assert!(
        err.contains("checkpoint damaged: no intact copy left"),
        "{err}"
    );
    assert!(
        err.contains("ram copy: image file pages-") && err.contains("content differs"),
        "{err}"
    );
    assert!(err.contains("nvme copy:") && err.contains("chunk"), "{err}");
    assert!(proc_state(workload.pid).is_none());

    // A deleted manifest (the NVMe commit point) and a deleted RAM copy: nothing to restore.
    std::fs::remove_file(agent.nvme_manifest("damaged")).unwrap();
    let err = agent.ctl_err(&["restore", "damaged", "--from", "nvme"]);
    assert!(
        err.contains("checkpoint damaged is in no tier any more (tiers: nvme)"),
        "{err}"
    );
    std::fs::remove_dir_all(agent.ram_dir("damaged")).unwrap();
    let err = agent.ctl_err(&["restore", "damaged"]);
    assert!(
        err.contains("checkpoint damaged is in no tier any more"),
        "{err}"
    );
    agent.assert_serving();
}

#[test]
fn criu_timeout_leaves_the_process_running() {
    let agent = TestAgent::start();
    let workload = Workload::start(agent.dir.path(), 64, &[]);
    let err = agent.ctl_err(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "too-slow",
        "--timeout-ms",
        "1",
    ]);
    assert!(err.contains("criu dump timed out after 1 ms"), "{err}");
    assert!(
        err.contains("the workload was resumed and keeps running"),
        "{err}"
    );
    let now = workload.read().unwrap().counter;
    workload.wait_for(|s| s.counter > now + 5);
    assert!(!matches!(
        proc_state(workload.pid),
        Some('T' | 't' | 'Z') | None
    ));
    assert!(
        agent.ctl_json(&["list"]).as_array().unwrap().is_empty(),
        "no checkpoint was recorded"
    );
    assert!(!agent.ram_dir("too-slow").exists());
    assert!(agent.metrics().contains("kybernate_failures_total{operation=\"checkpoint\",phase=\"criu_dump\",reason=\"timeout\"} 1"));

    // The same process checkpoints fine afterwards.
    agent.ctl_json(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "ok",
        "--leave-running",
    ]);
    agent.assert_serving();
}

#[test]
fn only_root_may_use_the_socket() {
    let agent = TestAgent::start();
    let as_nobody = |socket_mode: u32| {
        std::fs::set_permissions(&agent.socket, std::fs::Permissions::from_mode(socket_mode))
            .unwrap();
        // The test dir must be traversable for uid 65534 to reach the socket.
        std::fs::set_permissions(agent.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                support::CTL,
                "--socket",
            ])
            .arg(&agent.socket)
            .arg("list")
            .output()
            .expect("setpriv (util-linux) runs kybernatectl as nobody");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert_eq!(
        std::fs::metadata(&agent.socket)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let err = as_nobody(0o600);
    assert!(
        err.contains("cannot reach the Kybernate agent") || err.contains("ermission denied"),
        "{err}"
    );
    // Even when the file mode lets it connect, the peer check refuses it.
    let err = as_nobody(0o666);
    assert!(err.contains("uid 65534 is not authorised"), "{err}");
    agent.assert_serving();
}

/// A small tmpfs mounted for one test, unmounted on drop.
struct SmallMount(tempfile::TempDir);

impl SmallMount {
    fn new(size: &str) -> Self {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let status = std::process::Command::new("mount")
            // 0700: the agent refuses a tier directory others may write (a tmpfs root is 1777).
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mount a {size} tmpfs");
        Self(dir)
    }
}

impl Drop for SmallMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn full_nvme_tier_keeps_the_ram_copy() {
    let nvme = SmallMount::new("1m");
    let agent = TestAgent::start_with_config(&format!(
        "[tiers]\nnvme_path = \"{}\"\n",
        nvme.0.path().display()
    ));
    let mut workload = Workload::start(agent.dir.path(), 16, &[]);
    let err = agent.ctl_err(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "full",
    ]);
    assert!(
        err.contains("checkpoint full was taken and is kept in ram only"),
        "{err}"
    );
    assert!(
        err.contains("store_nvme") && err.contains("disk full"),
        "{err}"
    );
    workload.reap_dumped();
    let at_dump = workload.read().unwrap();

    let list = agent.ctl_json(&["list"]);
    assert_eq!(list[0]["name"], "full");
    assert_eq!(list[0]["tiers"], serde_json::json!(["ram"]));
    let restored = agent.ctl_json(&["restore", "full"]);
    workload.restored_as(support::pid_of(&restored));
    let after = workload.wait_for(|s| s.counter > at_dump.counter);
    assert_eq!(after.epoch, at_dump.epoch, "nothing was lost");
}
