//! Stateful round trips and bad input on real containerd 1.6 and 2.1 through the
//! `kybernate` shim and a real agent: checkpoint with `ctr c checkpoint --task`, restore with
//! `ctr c restore --live` and with the `kybernate.io/restore-from` annotation; the state
//! (a counter in the container's memory and /tmp) continues. Refusals name the problem and
//! leave the container running.

mod harness;

use std::time::{Duration, Instant};

use harness::kube_api::KubeApi;
use harness::{containerd_16, containerd_21, Node, NodeOptions, Version, IMAGE, KYBERNATE};

/// A shell loop counting in memory; it writes the count to /tmp/count every 50 ms.
const COUNTER: &str = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done";
/// The same counter writing into the container's /dev/shm, a tmpfs CRIU dumps with the
/// images: a restore into a fresh rootfs finds the file even when the dump caught it open.
const SHM_COUNTER: &str =
    "i=0; while true; do i=$((i+1)); echo $i > /dev/shm/count; sleep 0.05; done";

/// Containers whose id starts with this run [`SHM_COUNTER`].
const SHM: &str = "shm-";

fn run_counter(node: &Node, id: &str, extra: &[&str]) {
    let mut args = vec!["run", "-d", "--runtime", KYBERNATE];
    args.extend_from_slice(extra);
    let script = if id.starts_with(SHM) {
        SHM_COUNTER
    } else {
        COUNTER
    };
    args.extend_from_slice(&[IMAGE, id, "sh", "-c", script]);
    node.ctr_ok(&args);
    node.wait_status(id, "RUNNING");
}

fn count(node: &Node, id: &str) -> u64 {
    // The counter file is rewritten by `sh` every tick; a read can land between truncate and
    // write, so a few empty reads are retried before the test gives up.
    for _ in 0..50 {
        if let Some(n) = read_count(node, id) {
            return n;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("counter of {id} never became readable")
}

fn read_count(node: &Node, id: &str) -> Option<u64> {
    let exec_id = format!("read-{}", rand_suffix());
    let out = node.ctr_ok(&[
        "tasks",
        "exec",
        "--exec-id",
        &exec_id,
        id,
        "cat",
        if id.starts_with(SHM) {
            "/dev/shm/count"
        } else {
            "/tmp/count"
        },
    ]);
    out.trim().parse().ok()
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn wait_count(node: &Node, id: &str, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = count(node, id);
        if n >= at_least || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Names of the agent's checkpoints of container `id`.
fn agent_checkpoints(node: &Node, id: &str) -> Vec<String> {
    let out = node.kybernatectl(&["--output", "json", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .filter(|n| n.starts_with(&format!("{id}-")))
        .map(str::to_owned)
        .collect()
}

/// The one checkpoint of container `id` the agent keeps. After `ctr c checkpoint` it arrives
/// shortly after containerd's call: the shim hands the images over in the background.
fn wait_checkpoint(node: &Node, id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stored = agent_checkpoints(node, id);
        match stored.as_slice() {
            [one] => return one.clone(),
            [] if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => panic!(
                "expected one checkpoint of {id} in the agent, found {stored:?}; agent log:\n{}",
                node.agent_log()
            ),
        }
    }
}

/// Tiers that hold checkpoint `name`, as the agent lists them.
fn tiers_of(node: &Node, name: &str) -> Vec<String> {
    let out = node.kybernatectl(&["--output", "json", "list"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .map(|c| {
            c["tiers"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the agent's background drain has put checkpoint `name` on NVMe.
fn wait_drained(node: &Node, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !tiers_of(node, name).iter().any(|t| t == "nvme") {
        assert!(
            Instant::now() < deadline,
            "{name} never drained to NVMe; agent log:\n{}",
            node.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn round_trip(version: Version) {
    let node = Node::start(version);
    // `ctr c restore` without `--rw` starts from the image's pristine rootfs, as with runc.v2:
    // a dump that caught the shell between opening a file in its rootfs and closing it (the
    // few syscalls of `echo > /tmp/count`, wider under load) cannot be restored there, and
    // CRIU fails with "Unable to open fd=3". The counter keeps its file in /dev/shm, a tmpfs
    // that CRIU dumps with the images, so every dump restores.
    let id = "shm-counter";
    run_counter(&node, id, &[]);
    let before = wait_count(&node, id, 40);
    node.ctr_ok(&[
        "containers",
        "checkpoint",
        "--task",
        id,
        "kybernate/counter:ckpt",
    ]);
    // Leave-running is containerd's default: the task still counts.
    assert_eq!(node.task_status(id).as_deref(), Some("RUNNING"));
    assert!(wait_count(&node, id, before + 5) > before);
    let stored = wait_checkpoint(&node, id);
    // containerd holds the task paused until its checkpoint call returns, so the agent gets
    // the images after that call and commits them to RAM; NVMe follows in the background.
    assert!(tiers_of(&node, &stored).contains(&"ram".to_owned()));
    wait_drained(&node, &stored);
    // The same path through the agent: kybernatectl -> containerd -> shim -> agent.
    let via = "shm-via-agent";
    run_counter(&node, via, &[]);
    let early = wait_count(&node, via, 20);
    let content_before = node.ctr_ok(&["content", "ls", "-q"]);
    let out = node.ctl_checkpoint(via, &["--leave-running"]);
    assert!(
        out.status.success(),
        "kybernatectl checkpoint --container failed: {}\nagent log:\n{}",
        stderr(&out),
        node.agent_log()
    );
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let through_agent = reply["name"]
        .as_str()
        .unwrap_or_else(|| panic!("no checkpoint name in {reply}"))
        .to_owned();
    // kybernatectl waits for the tier it asked for (NVMe by default).
    assert_eq!(
        reply["tiers"],
        serde_json::json!(["ram", "nvme"]),
        "{reply}"
    );
    // The agent named its RAM tier as the image path, so the shim left containerd's own
    // checkpoint directory empty: containerd archived nothing of the container's memory.
    let raw_bytes = reply["raw_bytes"].as_u64().unwrap();
    let blobs = node
        .dir
        .path()
        .join("root/io.containerd.content.v1.content/blobs/sha256");
    for digest in node.ctr_ok(&["content", "ls", "-q"]).lines() {
        if content_before.lines().any(|d| d == digest) {
            continue;
        }
        let hex = digest.trim_start_matches("sha256:");
        let size = std::fs::metadata(blobs.join(hex)).map_or(0, |m| m.len());
        assert!(
            size < raw_bytes / 4,
            "containerd stored {size} bytes ({digest}) for a kybernatectl checkpoint of \
             {raw_bytes} bytes"
        );
    }
    assert!(
        agent_checkpoints(&node, via) == vec![through_agent.clone()],
        "the agent stored the checkpoint it reported"
    );
    assert_eq!(node.task_status(via).as_deref(), Some("RUNNING"));
    assert!(wait_count(&node, via, early + 5) > early);
    node.remove(via);

    node.remove(id);
    node.ctr_ok(&[
        "containers",
        "restore",
        "--live",
        id,
        "kybernate/counter:ckpt",
    ]);
    node.wait_status(id, "RUNNING");
    let restored = count(&node, id);
    assert!(
        restored >= before,
        "ctr restore: the counter restarted ({restored} < {before})"
    );
    node.remove(id);

    let annotation = format!("kybernate.io/restore-from={stored}");
    run_counter(&node, "shm-from-annotation", &["--annotation", &annotation]);
    let restored = count(&node, "shm-from-annotation");
    assert!(
        restored >= before,
        "annotation restore: the counter restarted ({restored} < {before})"
    );
    node.remove("shm-from-annotation");

    // The checkpoint taken through kybernatectl restores too, and continues from its count.
    let annotation = format!("kybernate.io/restore-from={through_agent}");
    run_counter(&node, "shm-from-ctl", &["--annotation", &annotation]);
    let restored = count(&node, "shm-from-ctl");
    assert!(
        restored >= early,
        "kybernatectl checkpoint: the counter did not continue ({restored}, taken at {early})"
    );
    node.remove("shm-from-ctl");
}

#[test]
fn containerd_16_round_trip_keeps_state() {
    round_trip(containerd_16());
}

#[test]
fn containerd_21_round_trip_keeps_state() {
    round_trip(containerd_21());
}

/// Five containers checkpointed one after the other through `kybernatectl checkpoint
/// --container`, then the first one a second time. containerd 1.6 archives the same empty
/// checkpoint directory every time (and, for the repeat, the same spec) and refuses a blob
/// it holds already; every checkpoint must still succeed, without containerd's garbage
/// collector running in between. Each checkpoint then restores through the annotation and
/// continues its count.
fn checkpoints_in_a_row(version: Version) {
    let node = Node::start(version);
    let ids: Vec<String> = (0..5).map(|i| format!("row{i}")).collect();
    for id in &ids {
        run_counter(&node, id, &[]);
    }
    let mut taken: Vec<(String, String, u64)> = Vec::new();
    for id in ids.iter().chain(std::iter::once(&ids[0])) {
        let before = wait_count(&node, id, 10);
        let out = node.ctl_checkpoint(id, &["--leave-running"]);
        assert!(
            out.status.success(),
            "checkpoint {} in a row (container {id}) failed: {}\nagent log:\n{}",
            taken.len() + 1,
            stderr(&out),
            node.agent_log()
        );
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let name = reply["name"]
            .as_str()
            .unwrap_or_else(|| panic!("no checkpoint name in {reply}"))
            .to_owned();
        assert_eq!(node.task_status(id).as_deref(), Some("RUNNING"));
        taken.push((id.clone(), name, before));
    }
    let names: std::collections::BTreeSet<&str> =
        taken.iter().map(|(_, name, _)| name.as_str()).collect();
    assert_eq!(names.len(), 6, "six distinct checkpoints: {taken:?}");
    for id in &ids {
        node.remove(id);
    }
    for (i, (id, name, before)) in taken.iter().enumerate() {
        let restored = format!("back{i}");
        let annotation = format!("kybernate.io/restore-from={name}");
        run_counter(&node, &restored, &["--annotation", &annotation]);
        let n = count(&node, &restored);
        assert!(
            n >= *before,
            "{name} (of {id}) restored a counter that restarted ({n} < {before})"
        );
        assert!(
            wait_count(&node, &restored, n + 3) > n,
            "{name} (of {id}) restored a counter that does not count"
        );
        node.remove(&restored);
    }
}

#[test]
fn containerd_16_checkpoints_many_containers_in_a_row() {
    checkpoints_in_a_row(containerd_16());
}

#[test]
fn containerd_21_checkpoints_many_containers_in_a_row() {
    checkpoints_in_a_row(containerd_21());
}

/// Names of everything under `dir`, two levels deep.
fn walkdir_names(dir: &std::path::Path) -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        names.push(entry.file_name().to_string_lossy().into_owned());
        for inner in std::fs::read_dir(entry.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            names.push(inner.file_name().to_string_lossy().into_owned());
        }
    }
    names
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn bad_input(version: Version) {
    let mut node = Node::start(version);

    let out = node.ctr(&["containers", "checkpoint", "--task", "no-such", "x:1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));

    node.ctr_ok(&["run", "-d", "--runtime", KYBERNATE, IMAGE, "quit", "true"]);
    node.wait_status("quit", "STOPPED");
    let out = node.ctr(&["containers", "checkpoint", "--task", "quit", "x:2"]);
    assert!(
        !out.status.success(),
        "checkpoint of a stopped task succeeded"
    );
    let out = node.ctl_checkpoint("quit", &[]);
    let text = stderr(&out);
    assert!(
        !out.status.success(),
        "kybernatectl checkpointed a stopped task"
    );
    assert!(text.contains("quit"), "{text}");
    node.remove("quit");
    let out = node.ctl_checkpoint("no-such", &[]);
    let text = stderr(&out);
    assert!(!out.status.success());
    assert!(
        text.contains("no-such") && text.contains("not found"),
        "{text}"
    );

    // A container under another runtime: its shim never reports to the agent, which says
    // so and keeps nothing of what that shim dumped.
    node.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        "io.containerd.runc.v2",
        IMAGE,
        "stock",
        "sh",
        "-c",
        COUNTER,
    ]);
    node.wait_status("stock", "RUNNING");
    let out = node.ctl_checkpoint("stock", &["--leave-running", "--name", "stock-ckpt"]);
    let text = stderr(&out);
    assert!(
        !out.status.success(),
        "a runc.v2 container was checkpointed"
    );
    assert!(text.contains("kybernate runtime"), "{text}");
    assert_eq!(node.task_status("stock").as_deref(), Some("RUNNING"));
    let left = walkdir_names(&node.ram_tier);
    assert!(
        !left.iter().any(|n| n.contains("stock-ckpt")),
        "the runc.v2 dump stayed in the RAM tier: {left:?}"
    );
    node.remove("stock");

    dump_past_deadline(&node);

    run_counter(&node, "gpu", &["--env", "NVIDIA_VISIBLE_DEVICES=7"]);
    let out = node.ctr(&["containers", "checkpoint", "--task", "gpu", "x:3"]);
    let text = stderr(&out);
    assert!(!out.status.success());
    assert!(
        text.contains("gpu_validate") && text.contains("GPU 7"),
        "{text}"
    );
    assert_eq!(node.task_status("gpu").as_deref(), Some("RUNNING"));
    node.remove("gpu");

    run_counter(&node, "lonely", &[]);
    let before = wait_count(&node, "lonely", 5);
    node.stop_agent();
    let out = node.ctr(&["containers", "checkpoint", "--task", "lonely", "x:4"]);
    let text = stderr(&out);
    assert!(!out.status.success());
    assert!(
        text.contains("agent_connect") && text.contains("cannot reach the Kybernate agent"),
        "{text}"
    );
    assert_eq!(node.task_status("lonely").as_deref(), Some("RUNNING"));
    assert!(
        wait_count(&node, "lonely", before + 5) > before,
        "the container stopped counting"
    );
    node.start_agent();

    let out = node.ctr(&[
        "run",
        "-d",
        "--runtime",
        KYBERNATE,
        "--annotation",
        "kybernate.io/restore-from=does-not-exist",
        IMAGE,
        "ghost",
        "sh",
        "-c",
        COUNTER,
    ]);
    let text = stderr(&out);
    assert!(
        !out.status.success(),
        "a missing reference started a container"
    );
    assert!(text.contains("does-not-exist"), "{text}");
    assert!(
        node.task_status("ghost").is_none(),
        "a task runs for a missing reference"
    );
    let _ = node.ctr(&["containers", "rm", "ghost"]);

    // A corrupt image set: every stored copy damaged.
    node.ctr_ok(&["containers", "checkpoint", "--task", "lonely", "x:5"]);
    let name = wait_checkpoint(&node, "lonely");
    wait_drained(&node, &name);
    let mut damaged = 0;
    damaged += damage(&node.ram_tier, &name, false);
    // The NVMe tier is a content-addressed chunk store: damage every chunk.
    damaged += damage(&node.dir.path().join("nvme").join("chunks"), &name, true);
    assert!(
        damaged > 0,
        "found no stored image file of {name} to damage"
    );
    let annotation = format!("kybernate.io/restore-from={name}");
    let out = node.ctr(&[
        "run",
        "-d",
        "--runtime",
        KYBERNATE,
        "--annotation",
        &annotation,
        IMAGE,
        "broken",
        "true",
    ]);
    let text = stderr(&out);
    assert!(
        !out.status.success(),
        "a corrupt checkpoint started a container"
    );
    assert!(text.contains(&name), "{text}");
    assert!(node.task_status("broken").is_none());
}

/// A dump past the shim's deadline (1 ms, so it always passes): runc and its CRIU are
/// killed, the agent rolls back, nothing is stored and the container keeps running.
fn dump_past_deadline(node: &Node) {
    let shim_toml = node.dir.path().join("shim.toml");
    let normal = std::fs::read_to_string(&shim_toml).unwrap();
    // Each container gets its own shim, which reads the file when it starts.
    std::fs::write(&shim_toml, format!("{normal}[timeouts]\ndump_ms = 1\n")).unwrap();
    run_counter(node, "slow", &[]);
    std::fs::write(&shim_toml, normal).unwrap();
    let before = wait_count(node, "slow", 5);
    let out = node.ctl_checkpoint("slow", &["--leave-running"]);
    let text = stderr(&out);
    assert!(!out.status.success(), "a dump past its deadline succeeded");
    assert!(
        text.contains("criu_dump") && text.contains("longer than 1 ms"),
        "{text}"
    );
    assert_eq!(node.task_status("slow").as_deref(), Some("RUNNING"));
    assert!(
        wait_count(node, "slow", before + 5) > before,
        "the container stopped counting after the killed dump"
    );
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("checkpoint") && c.contains(&node.runc_root.display().to_string()))
        .collect();
    assert!(left.is_empty(), "runc checkpoint still runs: {left:?}");
    assert!(
        agent_checkpoints(node, "slow").is_empty(),
        "a timed-out dump was stored"
    );
    node.remove("slow");
}

/// Flips bytes in every stored file of checkpoint `name` under a tier dir; returns how many.
fn damage(tier: &std::path::Path, name: &str, every_file: bool) -> usize {
    let mut hits = 0;
    let mut stack = vec![tier.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if every_file
                || (path.display().to_string().contains(name)
                    && path.extension().is_some_and(|e| e == "img"))
            {
                let mut bytes = std::fs::read(&path).unwrap();
                if bytes.is_empty() {
                    continue;
                }
                for b in bytes.iter_mut().take(64) {
                    *b ^= 0xff;
                }
                std::fs::write(&path, bytes).unwrap();
                hits += 1;
            }
        }
    }
    hits
}

#[test]
fn containerd_16_bad_input_is_refused_clearly() {
    bad_input(containerd_16());
}

#[test]
fn containerd_21_bad_input_is_refused_clearly() {
    bad_input(containerd_21());
}

/// CRI-style pod annotations (as containerd's CRI plugin writes them) for `ctr run`.
fn pod_annotations(namespace: &str, pod: &str) -> Vec<String> {
    [
        ("io.kubernetes.cri.sandbox-namespace", namespace.to_owned()),
        ("io.kubernetes.cri.sandbox-name", pod.to_owned()),
        (
            "io.kubernetes.cri.sandbox-uid",
            format!("uid-{namespace}-{pod}"),
        ),
    ]
    .into_iter()
    .flat_map(|(k, v)| ["--annotation".to_owned(), format!("{k}={v}")])
    .collect()
}

/// Every file and directory under `dir` with its permission bits, where they are not 0600
/// and 0700.
fn not_private(dir: &std::path::Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.path().symlink_metadata().unwrap();
        let mode = meta.permissions().mode() & 0o7777;
        let wanted = if meta.is_dir() { 0o700 } else { 0o600 };
        if meta.is_dir() {
            found.extend(not_private(&entry.path()));
        }
        if mode != wanted && !meta.file_type().is_symlink() {
            found.push(format!("{} {mode:o}", entry.path().display()));
        }
    }
    found
}

/// Runs a container of pod `pod` in `namespace` that restores checkpoint `name`.
fn run_restoring(node: &Node, id: &str, namespace: &str, name: &str) -> std::process::Output {
    let mut annotations = pod_annotations(namespace, id);
    annotations.extend([
        "--annotation".to_owned(),
        format!("kybernate.io/restore-from={name}"),
    ]);
    let mut args = vec!["run", "-d", "--runtime", KYBERNATE];
    args.extend(annotations.iter().map(String::as_str));
    args.extend([IMAGE, id, "sh", "-c", COUNTER]);
    node.ctr(&args)
}

/// Tenant isolation, with the agent as node worker of a scripted API server: a container of
/// namespace tenant-a is checkpointed (its images are root's alone; its origin records the
/// pod's service account from the API server); a container of tenant-b
/// that names the checkpoint is refused with both namespaces named, no process started and a
/// Warning Event on its pod; a container of tenant-a restores it and continues its count;
/// once a GpuCheckpointGrant lets tenant-b restore tenant-a's checkpoints, tenant-b's
/// restore succeeds too.
fn tenants(version: Version) {
    let api = KubeApi::start();
    api.add_pod("tenant-a", "owner", "uid-tenant-a-owner", "trainer");
    let kubeconfig = tempfile::NamedTempFile::new().unwrap();
    api.write_kubeconfig(kubeconfig.path());
    let options = NodeOptions {
        kubeconfig: Some(kubeconfig.path().to_owned()),
        ..NodeOptions::default()
    };
    let node = Node::start_with(version, options);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !api.state.lock().unwrap().watching() {
        assert!(
            Instant::now() < deadline,
            "the agent never watched GpuCheckpointGrants and its pods; agent log:\n{}",
            node.agent_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let owner = pod_annotations("tenant-a", "owner");
    let owner: Vec<&str> = owner.iter().map(String::as_str).collect();
    run_counter(&node, "secret-holder", &owner);
    let before = wait_count(&node, "secret-holder", 10);
    let out = node.ctl_checkpoint("secret-holder", &["--leave-running"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let name = reply["name"].as_str().unwrap().to_owned();
    let images = node.ram_tier.join(&name);
    assert!(images.is_dir(), "{} holds the images", images.display());
    let open = not_private(&images);
    assert!(
        open.is_empty(),
        "checkpoint files others may read: {open:?}"
    );

    let out = run_restoring(&node, "thief", "tenant-b", &name);
    let text = stderr(&out);
    assert!(
        !out.status.success(),
        "tenant-b restored tenant-a's checkpoint"
    );
    assert!(
        text.contains(&name) && text.contains("tenant-a") && text.contains("tenant-b"),
        "the refusal names the checkpoint and both namespaces: {text}"
    );
    assert!(
        text.contains("service account trainer"),
        "the origin records the pod's service account, looked up in the API: {text}"
    );
    assert!(
        node.task_status("thief").is_none(),
        "a task runs for tenant-b"
    );
    let _ = node.ctr(&["containers", "rm", "thief"]);
    assert!(
        node.agent_log()
            .contains("refused a container restore across tenants"),
        "the agent logs the refusal"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let event = loop {
        if let Some(event) = api.events("CheckpointRestoreRefused").pop() {
            break event;
        }
        assert!(
            Instant::now() < deadline,
            "no Event for the refusal; agent log:\n{}",
            node.agent_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(event["type"], "Warning", "{event}");
    assert_eq!(event["regarding"]["kind"], "Pod", "{event}");
    assert_eq!(event["regarding"]["namespace"], "tenant-b", "{event}");
    assert_eq!(event["regarding"]["name"], "thief", "{event}");
    let note = event["note"].as_str().unwrap();
    assert!(
        note.contains(&name) && note.contains("tenant-a") && note.contains("tenant-b"),
        "{note}"
    );

    let mut heir = pod_annotations("tenant-a", "heir");
    heir.extend([
        "--annotation".to_owned(),
        format!("kybernate.io/restore-from={name}"),
    ]);
    let heir: Vec<&str> = heir.iter().map(String::as_str).collect();
    run_counter(&node, "heir", &heir);
    assert!(
        count(&node, "heir") >= before,
        "tenant-a's restore continues the count"
    );
    node.remove("heir");

    // The administrator shares tenant-a's checkpoints with tenant-b.
    api.add_grant(serde_json::json!({
        "apiVersion": "kybernate.io/v1alpha1", "kind": "GpuCheckpointGrant",
        "metadata": {"name": "a-to-b", "uid": "uid-a-to-b", "resourceVersion": "7"},
        "spec": {"from": {"namespace": "tenant-a"}, "to": {"namespaces": ["tenant-b"]}},
    }));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !node.agent_log().contains("GpuCheckpointGrant in force") {
        assert!(Instant::now() < deadline, "the agent never saw the grant");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = run_restoring(&node, "guest", "tenant-b", &name);
    assert!(
        out.status.success(),
        "the granted restore failed: {}; agent log:\n{}",
        stderr(&out),
        node.agent_log()
    );
    node.wait_status("guest", "RUNNING");
    assert!(
        count(&node, "guest") >= before,
        "tenant-b's granted restore continues the count"
    );
    assert!(
        node.agent_log().contains("allowed by a GpuCheckpointGrant"),
        "the agent logs which grant allowed it"
    );
    node.remove("guest");
    node.remove("secret-holder");
    let unexpected = api.state.lock().unwrap().unexpected.clone();
    assert!(unexpected.is_empty(), "{unexpected:?}");
}

#[test]
fn containerd_16_checkpoints_stay_with_their_namespace() {
    tenants(containerd_16());
}

#[test]
fn containerd_21_checkpoints_stay_with_their_namespace() {
    tenants(containerd_21());
}
