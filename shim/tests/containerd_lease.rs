//! Leases on the shim's calls to the agent, on real containerd 1.6 and 2.1 with the
//! `kybernate` shim and a real agent whose lease is short: the shim is killed or hung
//! (failpoints, see `kybernate_shim::failpoints`) between Begin and End of a checkpoint, and
//! killed after the Stage of a restore. In every case the lease runs out, the agent gives
//! the GPUs back and frees the name; the workload runs on, or a stop-mode dump that had
//! completed is kept and restores.
//!
//! containerd cleans up after a dead shim by running its `delete`, which removes the
//! container (`runc delete --force`): a container whose shim was killed does not survive,
//! whatever the agent does. A hung shim keeps its container, and the agent's lease is what
//! gives it back.

mod harness;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::{
    containerd_16, containerd_21, workspace_bin, Node, NodeOptions, Version, IMAGE, KYBERNATE,
};

/// The agent's lease on the shim's operations in these tests.
const LEASE_MS: u64 = 6_000;

/// A shell loop counting in the container's /dev/shm (a tmpfs CRIU dumps with the images).
const COUNTER: &str = "i=0; while true; do i=$((i+1)); echo $i > /dev/shm/count; sleep 0.05; done";

/// Which container's shim does what.
fn failpoints() -> String {
    [
        "shim.checkpoint.after_begin@killed=kill",
        "shim.checkpoint.after_begin@hung=stop",
        "shim.checkpoint.after_dump@stopped=kill",
        "shim.restore.after_stage@restore-killed=kill",
    ]
    .join(",")
}

fn start(version: Version) -> Node {
    Node::start_with(
        version,
        NodeOptions {
            agent_config: format!("[timeouts]\nshim_lease_ms = {LEASE_MS}\n"),
            containerd_env: vec![("KYBERNATE_FAILPOINTS".into(), failpoints())],
            ..NodeOptions::default()
        },
    )
}

fn run_counter(node: &Node, id: &str, extra: &[&str]) {
    let mut args = vec!["run", "-d", "--runtime", KYBERNATE];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[IMAGE, id, "sh", "-c", COUNTER]);
    node.ctr_ok(&args);
    node.wait_status(id, "RUNNING");
}

fn read_count(node: &Node, id: &str) -> Option<u64> {
    let exec_id = format!(
        "read-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let out = node.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        &exec_id,
        id,
        "cat",
        "/dev/shm/count",
    ]);
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Waits until the counter of `id` reaches `at_least` and returns it.
fn wait_count(node: &Node, id: &str, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(n) = read_count(node, id).filter(|n| *n >= at_least) {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "the counter of {id} never reached {at_least} (last {:?})",
            read_count(node, id)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The task runs and counts on.
fn assert_counts_on(node: &Node, id: &str) {
    assert_eq!(node.task_status(id).as_deref(), Some("RUNNING"));
    let now = wait_count(node, id, 1);
    wait_count(node, id, now + 5);
}

/// Waits until the agent logged a line with both `what` and `name`.
fn wait_logged(node: &Node, name: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_millis(LEASE_MS) + Duration::from_secs(60);
    while !node
        .agent_log()
        .lines()
        .any(|l| l.contains(what) && l.contains(name))
    {
        assert!(
            Instant::now() < deadline,
            "the agent never logged {what:?} for {name}:\n{}",
            node.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `kybernatectl checkpoint --container`, retried while the name is still being released.
fn checkpoint_when_free(node: &Node, id: &str, extra: &[&str]) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = node.ctl_checkpoint(id, extra);
        if out.status.success() {
            return serde_json::from_slice(&out.stdout).unwrap();
        }
        let text = stderr(&out);
        assert!(
            text.contains("busy") && Instant::now() < deadline,
            "checkpoint of {id} failed: {text}\nagent log:\n{}",
            node.agent_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The listed checkpoint `name`, if any.
fn listed(node: &Node, name: &str) -> Option<serde_json::Value> {
    let out = node.kybernatectl(&["--output", "json", "list"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    list.as_array()?.iter().find(|c| c["name"] == name).cloned()
}

/// The shim SIGKILLed right after Begin: containerd removes the container with its dead
/// shim; the lease frees the name, and the next checkpoint under it succeeds.
fn shim_killed_after_begin(node: &Node) {
    run_counter(node, "killed", &[]);
    wait_count(node, "killed", 5);
    let out = node.ctl_checkpoint("killed", &["--leave-running", "--name", "killed-ckpt"]);
    assert!(
        !out.status.success(),
        "a checkpoint whose shim died succeeded"
    );
    wait_logged(node, "killed-ckpt", "lease expired");
    // The expiry is logged first; the dump directory goes once the agent has settled it.
    let partial = node.ram_tier.join(".partial-killed-ckpt");
    let deadline = Instant::now() + Duration::from_secs(30);
    while partial.exists() {
        assert!(
            Instant::now() < deadline,
            "the dump directory of the expired lease is still there:\n{}",
            node.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    run_counter(node, "killed-again", &[]);
    let reply = checkpoint_when_free(
        node,
        "killed-again",
        &["--leave-running", "--name", "killed-ckpt"],
    );
    assert_eq!(reply["name"], "killed-ckpt", "{reply}");
    assert_counts_on(node, "killed-again");
    node.remove("killed");
    node.remove("killed-again");
}

/// The shim hung (SIGSTOP) right after Begin: the lease runs out and the agent gives the
/// container back; continued, the shim does not dump it, and the container keeps running.
fn shim_hung_after_begin(node: &Node) {
    run_counter(node, "hung", &[]);
    wait_count(node, "hung", 5);
    let ctl = Command::new(workspace_bin("kybernatectl"))
        .arg("--socket")
        .arg(&node.agent_socket)
        .args(["checkpoint", "--container", "hung", "--namespace"])
        .arg(&node.namespace)
        .args(["--leave-running", "--name", "hung-ckpt"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_logged(node, "hung-ckpt", "lease expired");
    let shim = node.shim_pid("hung").expect("the hung shim still exists");
    assert!(Command::new("kill")
        .args(["-CONT", &shim.to_string()])
        .status()
        .unwrap()
        .success());
    let out = ctl.wait_with_output().unwrap();
    let text = stderr(&out);
    assert!(
        !out.status.success(),
        "a checkpoint past its lease succeeded"
    );
    assert!(text.contains("lease"), "{text}");
    assert_counts_on(node, "hung");
    assert!(listed(node, "hung-ckpt").is_none());
    // The shim's failpoint fired once; the name and the container are free.
    let reply = checkpoint_when_free(node, "hung", &["--leave-running", "--name", "hung-ckpt"]);
    assert_eq!(reply["name"], "hung-ckpt", "{reply}");
    assert_counts_on(node, "hung");
    node.remove("hung");
}

/// A stop-mode dump that completed, and the shim SIGKILLed before End: the lease keeps the
/// dump as a checkpoint. Then a restore whose shim is killed after the Stage: the lease
/// releases it, and the checkpoint restores into another container, its count continued.
fn stop_mode_dump_kept_and_restore_released(node: &Node) {
    run_counter(node, "stopped", &[]);
    let before = wait_count(node, "stopped", 10);
    // Whatever containerd answers (its shim died), the dump is the workload's only copy.
    let _ = node.ctl_checkpoint("stopped", &["--name", "stopped-ckpt"]);
    wait_logged(node, "stopped-ckpt", "lease expired");
    let deadline = Instant::now() + Duration::from_secs(60);
    let kept = loop {
        if let Some(kept) = listed(node, "stopped-ckpt") {
            break kept;
        }
        assert!(
            Instant::now() < deadline,
            "the completed dump was not kept:\n{}",
            node.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        kept["note"]
            .as_str()
            .unwrap_or_default()
            .contains("adopted"),
        "{kept}"
    );
    node.remove("stopped");

    let annotation = "kybernate.io/restore-from=stopped-ckpt";
    let out = node.ctr(&[
        "run",
        "-d",
        "--runtime",
        KYBERNATE,
        "--annotation",
        annotation,
        IMAGE,
        "restore-killed",
        "sh",
        "-c",
        COUNTER,
    ]);
    assert!(!out.status.success(), "a restore whose shim died started");
    wait_logged(node, "stopped-ckpt", "container restore lease expired");
    node.remove("restore-killed");

    run_counter(node, "restored", &["--annotation", annotation]);
    let restored = wait_count(node, "restored", 1);
    assert!(
        restored >= before,
        "the kept checkpoint restored a counter that restarted ({restored} < {before})"
    );
    assert_counts_on(node, "restored");
    node.remove("restored");
}

fn leases(version: Version) {
    let node = start(version);
    shim_killed_after_begin(&node);
    shim_hung_after_begin(&node);
    stop_mode_dump_kept_and_restore_released(&node);
}

#[test]
fn containerd_16_shim_killed_or_hung_between_its_calls_ends_its_lease() {
    leases(containerd_16());
}

#[test]
fn containerd_21_shim_killed_or_hung_between_its_calls_ends_its_lease() {
    leases(containerd_21());
}
