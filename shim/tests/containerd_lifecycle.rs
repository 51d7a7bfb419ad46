//! Lifecycle parity with `io.containerd.runc.v2` on real containerd 1.6 and 2.1: the same
//! `ctr` commands through both runtimes give the same output, exit codes and states.

mod harness;

use harness::{containerd_16, containerd_21, Node, Version, IMAGE, KYBERNATE, RUNC_V2};

/// What one runtime did with the scenario, to compare across runtimes.
#[derive(Debug, PartialEq)]
struct Observed {
    run_stdout: String,
    run_code: Option<i32>,
    exec_stdout: String,
    exec_code: Option<i32>,
    paused: Option<String>,
    resumed: Option<String>,
    pids_listed: bool,
    metrics_ok: bool,
    killed: Option<String>,
    self_exit: Option<String>,
}

fn scenario(node: &Node, runtime: &str, tag: &str) -> Observed {
    let id = |s: &str| format!("{tag}-{s}");
    let run = node.ctr(&[
        "run",
        "--rm",
        "--runtime",
        runtime,
        IMAGE,
        &id("once"),
        "sh",
        "-c",
        "echo to-stdout; echo to-stderr >&2; exit 3",
    ]);
    let run_stdout = String::from_utf8_lossy(&run.stdout).replace("\r\n", "\n");

    let long = id("long");
    node.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        runtime,
        IMAGE,
        &long,
        "sleep",
        "300",
    ]);
    node.wait_status(&long, "RUNNING");
    let exec = node.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        "e1",
        &long,
        "sh",
        "-c",
        "echo from-exec; exit 5",
    ]);
    node.ctr_ok(&["tasks", "pause", &long]);
    let paused = node.task_status(&long);
    node.ctr_ok(&["tasks", "resume", &long]);
    let resumed = node.task_status(&long);
    let ps = node.ctr_ok(&["tasks", "ps", &long]);
    let metrics = node.ctr(&["tasks", "metrics", &long]);
    node.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", &long]);
    node.wait_status(&long, "STOPPED");
    let killed = node.task_status(&long);
    node.ctr_ok(&["tasks", "delete", &long]);
    node.ctr_ok(&["containers", "rm", &long]);

    let quits = id("quits");
    node.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        runtime,
        IMAGE,
        &quits,
        "sh",
        "-c",
        "sleep 0.5; exit 7",
    ]);
    node.wait_status(&quits, "STOPPED");
    let self_exit = node.task_status(&quits);
    node.ctr_ok(&["tasks", "delete", &quits]);
    node.ctr_ok(&["containers", "rm", &quits]);

    Observed {
        run_stdout,
        run_code: run.status.code(),
        exec_stdout: String::from_utf8_lossy(&exec.stdout).into_owned(),
        exec_code: exec.status.code(),
        paused,
        resumed,
        pids_listed: ps.lines().count() >= 2,
        metrics_ok: metrics.status.success(),
        killed,
        self_exit,
    }
}

fn parity(version: Version) {
    let node = Node::start(version);
    let stock = scenario(&node, RUNC_V2, "stock");
    let ours = scenario(&node, KYBERNATE, "kyb");
    assert_eq!(ours.run_stdout, "to-stdout\n", "{ours:?}");
    assert_eq!(ours.run_code, Some(3));
    assert_eq!(ours.exec_stdout, "from-exec\n");
    assert_eq!(ours.exec_code, Some(5));
    assert_eq!(ours.paused.as_deref(), Some("PAUSED"));
    assert_eq!(ours.resumed.as_deref(), Some("RUNNING"));
    assert!(ours.pids_listed && ours.metrics_ok, "{ours:?}");
    assert_eq!(ours.killed.as_deref(), Some("STOPPED"));
    assert_eq!(stock, ours, "kybernate differs from runc.v2");
}

#[test]
fn containerd_16_lifecycle_matches_runc_v2() {
    parity(containerd_16());
}

#[test]
fn containerd_21_lifecycle_matches_runc_v2() {
    parity(containerd_21());
}

/// The exit status containerd reports for a task that exited by itself.
fn exit_status(node: &Node, runtime: &str, id: &str) -> String {
    node.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        runtime,
        IMAGE,
        id,
        "sh",
        "-c",
        "exit 42",
    ]);
    node.wait_status(id, "STOPPED");
    let out = node.ctr_ok(&["tasks", "delete", id]);
    node.ctr_ok(&["containers", "rm", id]);
    out
}

#[test]
fn containerd_16_reports_the_same_exit_status_on_delete() {
    let node = Node::start(containerd_16());
    assert_eq!(
        exit_status(&node, KYBERNATE, "kyb-status"),
        exit_status(&node, RUNC_V2, "stock-status")
    );
}
