//! A pod's containers under one shim, on real containerd 1.6 and 2.1. As the CRI does, a
//! "pause" container and two app containers carry one `io.kubernetes.cri.sandbox-id`; the
//! kybernate shim then runs them all in one process, as `io.containerd.runc.v2` does. While
//! one container of the pod checkpoints 1 GiB, an `exec` in another and that container's
//! exit event still arrive before the checkpoint ends: nothing of one container waits
//! behind another's checkpoint.

mod harness;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use harness::{containerd_16, containerd_21, Node, Version, IMAGE, KYBERNATE, RUNC_V2};

/// Generous bound for what must be prompt (an exec, an exit event).
const PROMPT: Duration = Duration::from_secs(20);

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

/// Runs container `id` of pod `sandbox` (`kind`: "sandbox" or "container"), detached.
/// `extra` are more `ctr run` flags (mounts).
fn run_in_pod(
    node: &Node,
    runtime: &str,
    sandbox: &str,
    kind: &str,
    id: &str,
    script: &str,
    extra: &[String],
) {
    let group = format!("io.kubernetes.cri.sandbox-id={sandbox}");
    let kind = format!("io.kubernetes.cri.container-type={kind}");
    let mut args: Vec<&str> = vec![
        "run",
        "-d",
        "--runtime",
        runtime,
        "--annotation",
        &group,
        "--annotation",
        &kind,
    ];
    args.extend(extra.iter().map(String::as_str));
    args.extend([IMAGE, id, "sh", "-c", script]);
    node.ctr_ok(&args);
    node.wait_status(id, "RUNNING");
}

/// Starts a pause container and two app containers of one pod; returns the app ids. The
/// first app runs `app_script` with `app_extra` flags.
fn start_pod(
    node: &Node,
    runtime: &str,
    tag: &str,
    app_script: &str,
    app_extra: &[String],
) -> (String, String) {
    let sandbox = format!("{tag}-pause");
    run_in_pod(
        node,
        runtime,
        &sandbox,
        "sandbox",
        &sandbox,
        "sleep 1000",
        &[],
    );
    let apps = (format!("{tag}-app1"), format!("{tag}-app2"));
    run_in_pod(
        node,
        runtime,
        &sandbox,
        "container",
        &apps.0,
        app_script,
        app_extra,
    );
    run_in_pod(
        node,
        runtime,
        &sandbox,
        "container",
        &apps.1,
        "sleep 1000",
        &[],
    );
    (apps.0, apps.1)
}

/// Bind mounts that let the busybox image run the workspace's `kybernatectl` (its sample
/// workload holds N MiB of patterned memory): the binary and the host's libraries (real
/// directories: CRIU cannot restore an external bind mount whose source is a symlink).
fn workload_mounts() -> Vec<String> {
    let mut mounts = Vec::new();
    for dir in ["/lib", "/lib64", "/usr/lib"] {
        if let Ok(real) = std::fs::canonicalize(dir) {
            mounts.push("--mount".to_owned());
            mounts.push(format!(
                "type=bind,src={},dst={dir},options=rbind:ro",
                real.display()
            ));
        }
    }
    mounts.push("--mount".to_owned());
    mounts.push(format!(
        "type=bind,src={},dst=/kybernatectl,options=rbind:ro",
        harness::workspace_bin("kybernatectl").display()
    ));
    mounts
}

/// The shim processes of `binary` serving this node's namespace.
fn shims(node: &Node, binary: &str) -> Vec<i32> {
    pids_matching(&[binary, "-namespace", &node.namespace])
}

/// The host pid of task `id` (`ctr tasks ls`).
fn task_pid(node: &Node, id: &str) -> i32 {
    node.ctr_ok(&["tasks", "ls"])
        .lines()
        .find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.first() == Some(&id)).then(|| cols.get(1)?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("task {id} is not listed"))
}

/// Resident memory of `pid` in MiB.
fn resident_mib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

/// Lines of `ctr events` as they arrive.
fn watch_events(node: &Node) -> (std::process::Child, mpsc::Receiver<(Instant, String)>) {
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
            if lines.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    (child, received)
}

/// When the first event on `topic` about container `id` arrived, within `PROMPT`.
fn event_at(events: &mpsc::Receiver<(Instant, String)>, topic: &str, id: &str) -> Option<Instant> {
    let deadline = Instant::now() + PROMPT;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match events.recv_timeout(left) {
            // The init's exit, not an exec's: its `id` is the container's.
            Ok((at, line))
                if line.contains(topic) && line.contains(&format!("\"id\":\"{id}\"")) =>
            {
                return Some(at)
            }
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

fn one_shim_per_pod(version: Version) {
    let node = Node::start(version);
    for (runtime, binary, tag) in [
        (RUNC_V2, "containerd-shim-runc-v2", "stock"),
        (KYBERNATE, "containerd-shim-kybernate-v1", "kyb"),
    ] {
        let (app1, app2) = start_pod(&node, runtime, tag, "sleep 1000", &[]);
        let serving = shims(&node, binary);
        assert_eq!(
            serving.len(),
            1,
            "{runtime}: a pod of 3 containers should run under one shim, found {serving:?}"
        );
        // Deleting one container leaves the pod's shim serving the others.
        node.remove(&app1);
        let exec = node.ctr_ok(&[
            "tasks",
            "exec",
            "--exec-id",
            "after-remove",
            &app2,
            "echo",
            "still-served",
        ]);
        assert!(exec.contains("still-served"), "{runtime}: {exec}");
        assert_eq!(
            shims(&node, binary),
            serving,
            "{runtime}: the pod's shim changed"
        );
        node.remove(&app2);
        node.remove(&format!("{tag}-pause"));
        let deadline = Instant::now() + PROMPT;
        while !shims(&node, binary).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            shims(&node, binary).is_empty(),
            "{runtime}: the pod's shim outlived its last container"
        );
    }
}

fn prompt_while_a_neighbour_checkpoints(version: Version) {
    let node = Node::start(version);
    // app1's init is the sample workload holding 1 GiB.
    let (app1, app2) = start_pod(
        &node,
        KYBERNATE,
        "busy",
        "exec /kybernatectl workload --mib 1024 --status /dev/shm/status",
        &workload_mounts(),
    );
    let pid = task_pid(&node, &app1);
    let filled = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(format!("/proc/{pid}/root/dev/shm/status"))
        .unwrap_or_default()
        .contains("counter=")
    {
        assert!(Instant::now() < filled, "{app1} never filled its 1 GiB");
        std::thread::sleep(Duration::from_millis(100));
    }
    let resident = resident_mib(pid);
    assert!(
        resident >= 1024,
        "{app1} holds {resident} MiB, not the 1 GiB the test checkpoints"
    );
    let (mut watcher, events) = watch_events(&node);
    let checkpoint = std::thread::scope(|scope| {
        let running = scope.spawn(|| {
            let out = node.ctl_checkpoint(&app1, &["--leave-running"]);
            (Instant::now(), out)
        });
        // Wait until runc checkpoint of app1 (and its CRIU) is at work.
        let started = Instant::now() + Duration::from_secs(60);
        while pids_matching(&["checkpoint", "--image-path", &app1]).is_empty() {
            assert!(
                !running.is_finished(),
                "the checkpoint ended before its dump was seen"
            );
            assert!(
                Instant::now() < started,
                "no runc checkpoint of {app1} seen"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let asked = Instant::now();
        let exec = node.ctr(&[
            "tasks",
            "exec",
            "--exec-id",
            "during",
            &app2,
            "echo",
            "served-during-checkpoint",
        ]);
        let exec_done = Instant::now();
        assert!(
            String::from_utf8_lossy(&exec.stdout).contains("served-during-checkpoint"),
            "exec in {app2} failed: {}",
            String::from_utf8_lossy(&exec.stderr)
        );
        node.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", &app2]);
        let exited = event_at(&events, "/tasks/exit", &app2);
        let (checkpoint_done, out) = running.join().unwrap();
        (asked, exec_done, exited, checkpoint_done, out)
    });
    let _ = watcher.kill();
    let _ = watcher.wait();
    let (asked, exec_done, exited, checkpoint_done, out) = checkpoint;
    eprintln!(
        "after the dump began: exec done in {:?}, exit event at {:?}, checkpoint done at {:?}",
        exec_done - asked,
        exited.map(|at| at - asked),
        checkpoint_done - asked
    );
    assert!(
        out.status.success(),
        "checkpoint of {app1} failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        exec_done - asked < PROMPT,
        "exec took {:?}",
        exec_done - asked
    );
    let exited = exited.expect("no exit event of the killed neighbour");
    assert!(
        exec_done < checkpoint_done && exited < checkpoint_done,
        "exec (done {:?} after asking) and exit event ({:?}) waited for the checkpoint \
         (done {:?}); shim log: {}",
        exec_done - asked,
        exited - asked,
        checkpoint_done - asked,
        node.log()
    );
    assert_eq!(
        shims(&node, "containerd-shim-kybernate-v1").len(),
        1,
        "the pod's containers should share one shim"
    );
}

#[test]
fn containerd_16_runs_a_pod_under_one_shim_like_runc_v2() {
    one_shim_per_pod(containerd_16());
}

#[test]
fn containerd_21_runs_a_pod_under_one_shim_like_runc_v2() {
    one_shim_per_pod(containerd_21());
}

#[test]
fn containerd_16_a_neighbour_stays_prompt_while_one_container_checkpoints_1_gib() {
    prompt_while_a_neighbour_checkpoints(containerd_16());
}

#[test]
fn containerd_21_a_neighbour_stays_prompt_while_one_container_checkpoints_1_gib() {
    prompt_while_a_neighbour_checkpoints(containerd_21());
}
