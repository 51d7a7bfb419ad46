//! What containerd learns without asking, compared with `io.containerd.runc.v2` on real
//! containerd 1.6 and 2.1: an OOM kill inside the container reaches containerd as a
//! `/tasks/oom` event, and a shim killed under a running container is cleaned up by
//! containerd through the shim's `delete` subcommand (the workload gone, runc's state gone,
//! the container removable).

mod harness;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use harness::{containerd_16, containerd_21, Node, Version, IMAGE, KYBERNATE, RUNC_V2};

/// Lines of `ctr events` as they arrive.
fn watch_events(node: &Node) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut child = Command::new(node.version.tool("ctr"))
        .arg("--address")
        .arg(&node.socket)
        .arg("events")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    (child, received)
}

/// Whether an event on `topic` about container `id` arrives within 30 s.
fn event_arrives(events: &mpsc::Receiver<String>, topic: &str, id: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match events.recv_timeout(left) {
            Ok(line) if line.contains(topic) && line.contains(id) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

/// A container over its 32 MiB memory limit gets OOM-killed; containerd must hear of it.
fn oom_reported(node: &Node, runtime: &str, id: &str) -> bool {
    let (mut watcher, events) = watch_events(node);
    node.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        runtime,
        "--memory-limit",
        "33554432",
        IMAGE,
        id,
        "sh",
        "-c",
        "a=$(head -c 134217728 /dev/zero | tr '\\0' x); sleep 100",
    ]);
    let heard = event_arrives(&events, "/tasks/oom", id);
    let _ = watcher.kill();
    let _ = watcher.wait();
    node.remove(id);
    heard
}

/// Pids of processes whose command line contains every one of `needles`.
fn pids_matching(needles: &[&str]) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let line = String::from_utf8_lossy(&c).replace('\0', " ");
                needles.iter().all(|n| line.contains(n))
            })
        })
        .collect()
}

/// What containerd's cleanup left after the shim of a running container was killed.
#[derive(Debug, PartialEq)]
struct AfterCrash {
    workload_gone: bool,
    task_listed: bool,
    container_removed: bool,
}

fn shim_crash(node: &Node, runtime: &str, shim_binary: &str, id: &str) -> AfterCrash {
    // A marker in the workload's command line finds its process from the host.
    let marker = format!("sleep 1000{}", id.len());
    node.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        runtime,
        IMAGE,
        id,
        "sh",
        "-c",
        &marker,
    ]);
    node.wait_status(id, "RUNNING");
    let workload = pids_matching(&[&marker]);
    assert!(!workload.is_empty(), "{id}: no workload process found");
    let shims = pids_matching(&[shim_binary, &node.namespace, &format!("-id {id}")]);
    assert_eq!(shims.len(), 1, "{id}: expected one shim, found {shims:?}");
    let killed = Command::new("kill")
        .args(["-KILL", &shims[0].to_string()])
        .status()
        .unwrap();
    assert!(killed.success());

    let deadline = Instant::now() + Duration::from_secs(30);
    let gone = |pids: &[i32]| {
        pids.iter()
            .all(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
    };
    while !(gone(&workload) && node.task_status(id).is_none()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = AfterCrash {
        workload_gone: gone(&workload),
        task_listed: node.task_status(id).is_some(),
        container_removed: node.ctr(&["containers", "rm", id]).status.success(),
    };
    node.remove(id);
    after
}

fn events_and_crashes(version: Version) {
    let node = Node::start(version);
    assert!(
        oom_reported(&node, RUNC_V2, "oom-stock"),
        "runc.v2 reported no OOM kill: the test's workload did not get OOM-killed"
    );
    assert!(
        oom_reported(&node, KYBERNATE, "oom-kyb"),
        "no /tasks/oom event from the kybernate shim; containerd log:\n{}",
        node.log()
    );

    let stock = shim_crash(&node, RUNC_V2, "containerd-shim-runc-v2", "crash-stock");
    let ours = shim_crash(
        &node,
        KYBERNATE,
        "containerd-shim-kybernate-v1",
        "crash-kyb",
    );
    assert_eq!(
        stock,
        AfterCrash {
            workload_gone: true,
            task_listed: false,
            container_removed: true
        },
        "runc.v2's crash cleanup is not what this test expects"
    );
    assert_eq!(ours, stock, "containerd log:\n{}", node.log());
    let runc_state = node.runc_root.join(&node.namespace).join("crash-kyb");
    assert!(
        !runc_state.exists(),
        "runc's state of the crashed shim's container stayed: {}",
        runc_state.display()
    );
}

#[test]
fn containerd_16_oom_events_and_shim_crash_cleanup_match_runc_v2() {
    events_and_crashes(containerd_16());
}

#[test]
fn containerd_21_oom_events_and_shim_crash_cleanup_match_runc_v2() {
    events_and_crashes(containerd_21());
}
