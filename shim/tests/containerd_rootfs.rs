//! The container's writable layer travels with a Kybernate checkpoint, on real containerd:
//! a workload appends to a file in its rootfs that it keeps open and deletes a file of the
//! image; `kybernatectl checkpoint --container --leave-running`; kill; a new container
//! created with `kybernate.io/restore-from` has the file with its content (and keeps
//! appending where it was), and the deleted file stays deleted. A container on the native
//! snapshotter (no overlay) checkpoints without a diff and the shim logs why.

mod harness;

use std::time::{Duration, Instant};

use harness::{containerd_16, containerd_21, Node, Version, IMAGE, KYBERNATE};

/// Deletes /etc/group (from the image), then appends a count to /data.log, held open on fd 3.
const WRITER: &str = "rm /etc/group; exec 3>>/data.log; i=0; \
                      while true; do i=$((i+1)); echo $i >&3; sleep 0.05; done";

fn exec(node: &Node, id: &str, args: &[&str]) -> std::process::Output {
    let exec_id = format!(
        "x{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let mut all = vec!["tasks", "exec", "--exec-id", &exec_id, id];
    all.extend_from_slice(args);
    node.ctr(&all)
}

/// The numbers in /data.log; asserts they run 1, 2, 3, ... without a gap or a restart.
fn log_lines(node: &Node, id: &str) -> u64 {
    let out = exec(node, id, &["cat", "/data.log"]);
    assert!(
        out.status.success(),
        "cat /data.log in {id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let numbers: Vec<u64> = text.lines().filter_map(|l| l.parse().ok()).collect();
    let expected: Vec<u64> = (1..=u64::try_from(numbers.len()).unwrap()).collect();
    assert_eq!(
        numbers, expected,
        "/data.log of {id} is not one continuous count"
    );
    expected.last().copied().unwrap_or(0)
}

fn wait_lines(node: &Node, id: &str, more_than: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = log_lines(node, id);
        if n > more_than || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn rootfs_round_trip(version: Version) {
    let node = Node::start(version);
    let id = "writer";
    node.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        KYBERNATE,
        IMAGE,
        id,
        "sh",
        "-c",
        WRITER,
    ]);
    node.wait_status(id, "RUNNING");
    let early = wait_lines(&node, id, 10);
    let out = node.ctl_checkpoint(id, &["--leave-running"]);
    assert!(
        out.status.success(),
        "kybernatectl checkpoint --container failed: {}\ncontainerd log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.log()
    );
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let name = reply["name"].as_str().expect("checkpoint name").to_owned();
    // The shim's pause around dump + diff was undone: the workload keeps counting.
    assert_eq!(node.task_status(id).as_deref(), Some("RUNNING"));
    assert!(wait_lines(&node, id, early + 5) > early + 5);
    let log = node.log();
    let measured = log
        .lines()
        .find(|l| l.contains("rootfs diff of"))
        .unwrap_or_else(|| panic!("the shim logged no rootfs diff:\n{log}"));
    eprintln!("{measured}");
    node.remove(id);

    let annotation = format!("kybernate.io/restore-from={name}");
    let restored = "restored";
    node.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        KYBERNATE,
        "--annotation",
        &annotation,
        IMAGE,
        restored,
        "sh",
        "-c",
        "sleep 1000",
    ]);
    node.wait_status(restored, "RUNNING");
    let at_restore = log_lines(&node, restored);
    assert!(
        at_restore >= early,
        "the restored /data.log lost lines ({at_restore} < {early})"
    );
    assert!(
        wait_lines(&node, restored, at_restore + 5) > at_restore + 5,
        "the restored workload does not keep appending to its open file"
    );
    let group = exec(&node, restored, &["cat", "/etc/group"]);
    assert!(
        !group.status.success(),
        "/etc/group, deleted before the checkpoint, is back"
    );
    let passwd = exec(&node, restored, &["cat", "/etc/passwd"]);
    assert!(
        passwd.status.success(),
        "the image's /etc/passwd is gone after the restore"
    );
    node.remove(restored);

    // A rootfs that is no overlay (the native snapshotter's bind mount): the checkpoint
    // still works, carries no diff, and the shim says why.
    let native = "native";
    node.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        KYBERNATE,
        "--snapshotter",
        "native",
        IMAGE,
        native,
        "sleep",
        "1000",
    ]);
    node.wait_status(native, "RUNNING");
    let out = node.ctl_checkpoint(native, &["--leave-running"]);
    assert!(
        out.status.success(),
        "checkpoint of a native-snapshotter container failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = node.log();
    assert!(
        log.lines()
            .any(|l| l.contains("container native: the rootfs")
                && l.contains("not an overlay with an upper dir")),
        "no log line about the missing rootfs diff:\n{log}"
    );
    node.remove(native);
}

#[test]
fn containerd_16_restore_carries_the_rootfs_diff() {
    rootfs_round_trip(containerd_16());
}

#[test]
fn containerd_21_restore_carries_the_rootfs_diff() {
    rootfs_round_trip(containerd_21());
}
