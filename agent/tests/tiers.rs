//! Tiers through the real agent: S3 on a real S3 HTTP server over loopback, background drain,
//! prefetch, and LRU demotion under a RAM budget.

#[path = "support/containerd.rs"]
#[allow(dead_code)]
mod containerd;
mod support;

use std::path::Path;

use containerd::{Containerd, Release};
use kybernate_sample_workload::Status;
use serde_json::json;
use support::{eventually, pid_of, S3Server, TestAgent, Workload, CTL, S3_BUCKET};

fn tiers_of(agent: &TestAgent, name: &str) -> serde_json::Value {
    agent.ctl_json(&["inspect", name])["tiers"].clone()
}

#[test]
fn checkpoint_to_s3_and_restore_from_s3_alone() {
    let s3 = S3Server::start();
    let agent = TestAgent::start_with(&s3.agent_config(), &S3Server::credentials());
    let mut workload = Workload::start(agent.dir.path(), 32, &[]);
    let cp = agent.ctl_json(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "far",
        "--tier",
        "s3",
    ]);
    assert_eq!(cp["tiers"], json!(["ram", "nvme", "s3"]));
    assert!(
        cp["phases"].as_object().unwrap().contains_key("store_s3"),
        "{cp}"
    );
    workload.reap_dumped();
    let at_dump = workload.read().unwrap();

    // The node loses its local copies; S3 still has the checkpoint.
    std::fs::remove_dir_all(agent.ram_dir("far")).unwrap();
    std::fs::remove_file(agent.nvme_manifest("far")).unwrap();
    assert_eq!(tiers_of(&agent, "far"), json!(["s3"]));
    assert!(
        !agent.log().contains(support::S3_SECRET_KEY),
        "the secret is never logged"
    );

    let restored = agent.ctl_json(&["restore", "far"]);
    assert_eq!(restored["source_tier"], "s3");
    workload.restored_as(pid_of(&restored));
    let after = workload.wait_for(|s| s.counter > at_dump.counter);
    assert_eq!(after.epoch, at_dump.epoch);
    assert!(workload.verify_memory().memory_ok);
}

#[test]
fn background_drain_then_prefetch_back_to_ram() {
    let s3 = S3Server::start();
    let agent = TestAgent::start_with(&s3.agent_config(), &S3Server::credentials());
    let mut workload = Workload::start(agent.dir.path(), 16, &[]);
    let cp = agent.ctl_json(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "warm",
        "--tier",
        "ram",
    ]);
    assert_eq!(cp["tiers"], json!(["ram"]), "done as soon as RAM holds it");
    eventually("the background drain reaches S3", || {
        tiers_of(&agent, "warm") == json!(["ram", "nvme", "s3"])
    });
    workload.reap_dumped();

    std::fs::remove_dir_all(agent.ram_dir("warm")).unwrap();
    std::fs::remove_file(agent.nvme_manifest("warm")).unwrap();
    let to_nvme = agent.ctl_json(&["prefetch", "warm", "--to", "nvme"]);
    assert_eq!(to_nvme["from"], "s3");
    let to_ram = agent.ctl_json(&["prefetch", "warm", "--to", "ram"]);
    assert_eq!(to_ram["from"], "nvme");
    assert_eq!(
        agent.ctl_json(&["prefetch", "warm", "--to", "ram"])["from"],
        "",
        "already there"
    );
    assert_eq!(tiers_of(&agent, "warm"), json!(["ram", "nvme", "s3"]));

    let restored = agent.ctl_json(&["restore", "warm"]);
    assert_eq!(restored["source_tier"], "ram");
    workload.restored_as(pid_of(&restored));
    assert!(workload.verify_memory().memory_ok);
    let err = agent.ctl_err(&["prefetch", "warm", "--to", "tape"]);
    assert!(err.contains("unknown tier \"tape\""), "{err}");
}

#[test]
fn ram_budget_demotes_least_recently_used_and_loses_nothing() {
    // Each 16 MiB workload dumps to ~17 MiB; a 40 MiB budget holds two of them.
    let agent = TestAgent::start_with_config("[tiers]\nram_budget_bytes = 41943040\n");
    let mut epochs = Vec::new();
    for name in ["oldest", "middle", "newest"] {
        let mut workload = Workload::start(agent.dir.path(), 16, &[]);
        agent.ctl_json(&[
            "checkpoint",
            "--pid",
            &workload.pid.to_string(),
            "--name",
            name,
            "--tier",
            "ram",
        ]);
        workload.reap_dumped();
        epochs.push((name, workload.read().unwrap().epoch, workload));
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    eventually("the oldest checkpoint leaves RAM", || {
        tiers_of(&agent, "oldest") == json!(["nvme"])
    });
    assert_eq!(tiers_of(&agent, "newest"), json!(["ram", "nvme"]));
    assert_eq!(tiers_of(&agent, "middle"), json!(["ram", "nvme"]));
    for (name, epoch, workload) in &mut epochs {
        let restored = agent.ctl_json(&["restore", name]);
        workload.restored_as(pid_of(&restored));
        assert_eq!(
            workload.wait_for(|_| true).epoch,
            *epoch,
            "{name} restored intact"
        );
    }
}

#[test]
fn nvme_budget_demotes_least_recently_used_to_s3_and_each_still_restores() {
    // Each 16 MiB workload holds random (incompressible) memory, so its chunks take ~17 MiB on
    // NVMe; a 24 MiB budget holds one of them.
    let s3 = S3Server::start();
    let config = format!(
        "{}[tiers]\nnvme_budget_bytes = 25165824\n[policy]\nnvme_keep_recent = 0\n",
        s3.agent_config()
    );
    let agent = TestAgent::start_with(&config, &S3Server::credentials());
    let mut epochs = Vec::new();
    for name in ["older", "newer"] {
        let mut workload = Workload::start(agent.dir.path(), 16, &[]);
        agent.ctl_json(&[
            "checkpoint",
            "--pid",
            &workload.pid.to_string(),
            "--name",
            name,
            "--tier",
            "nvme",
        ]);
        workload.reap_dumped();
        epochs.push((name, workload.read().unwrap().epoch, workload));
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    eventually("the older checkpoint leaves NVMe for S3", || {
        tiers_of(&agent, "older") == json!(["ram", "s3"])
    });
    eventually("the newer checkpoint reaches S3 and stays on NVMe", || {
        tiers_of(&agent, "newer") == json!(["ram", "nvme", "s3"])
    });

    // Without their RAM copies, the demoted checkpoint restores from S3 and the other from NVMe.
    for (name, _, _) in &epochs {
        std::fs::remove_dir_all(agent.ram_dir(name)).unwrap();
    }
    assert_eq!(tiers_of(&agent, "older"), json!(["s3"]));
    for ((name, epoch, workload), tier) in epochs.iter_mut().zip(["s3", "nvme"]) {
        let restored = agent.ctl_json(&["restore", name]);
        assert_eq!(restored["source_tier"], tier, "{name}");
        workload.restored_as(pid_of(&restored));
        let state = workload.wait_for(|_| true);
        assert_eq!(state.epoch, *epoch, "{name} restored intact");
        assert!(workload.verify_memory().memory_ok, "{name} memory intact");
    }
}

#[test]
fn a_checkpoint_taken_on_one_node_restores_on_another_through_s3() {
    let s3 = S3Server::start();
    let node_a = TestAgent::start_with(&s3.agent_config(), &S3Server::credentials());
    let node_b = TestAgent::start_with(&s3.agent_config(), &S3Server::credentials());
    let shared_record = |name: &str| {
        s3.dir
            .path()
            .join(format!("{}/node-a/records/{name}.json", support::S3_BUCKET))
    };

    let mut workload = Workload::start(node_a.dir.path(), 16, &[]);
    node_a.ctl_json(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "moved",
        "--tier",
        "s3",
    ]);
    workload.reap_dumped();
    let at_dump = workload.read().unwrap();
    eventually("node A shares the record", || {
        shared_record("moved").exists()
    });

    // Node B never took it: it adopts the record from S3 and restores from the S3 copy.
    assert_eq!(node_b.ctl_json(&["list"]), json!([]));
    let restored = node_b.ctl_json(&["restore", "moved"]);
    assert_eq!(restored["source_tier"], "s3");
    assert_eq!(tiers_of(&node_b, "moved"), json!(["s3"]));
    workload.restored_as(pid_of(&restored));
    let after = workload.wait_for(|s| s.counter > at_dump.counter);
    assert_eq!(after.epoch, at_dump.epoch);
    assert!(workload.verify_memory().memory_ok);
    workload.kill();

    // A name no node has taken is not found anywhere.
    let err = node_b.ctl_err(&["restore", "nowhere"]);
    assert!(err.contains("no checkpoint named nowhere"), "{err}");

    // A damaged shared record is refused by name, and node B keeps serving.
    let mut second = Workload::start(node_a.dir.path(), 8, &[]);
    node_a.ctl_json(&[
        "checkpoint",
        "--pid",
        &second.pid.to_string(),
        "--name",
        "spoiled",
        "--tier",
        "s3",
    ]);
    second.reap_dumped();
    eventually("node A shares the second record", || {
        shared_record("spoiled").exists()
    });
    std::fs::write(
        shared_record("spoiled"),
        b"{\"name\": \"spoiled\", \"pid\": ",
    )
    .unwrap();
    let err = node_b.ctl_err(&["restore", "spoiled"]);
    assert!(
        err.contains("record of checkpoint spoiled in the s3 tier is corrupt"),
        "{err}"
    );
    node_b.assert_serving();

    // Deleting on node B removes the shared copy and its record; node A keeps its own copies.
    let out = node_b.ctl(&["delete", "moved"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!shared_record("moved").exists());
    let err = node_b.ctl_err(&["inspect", "moved"]);
    assert!(err.contains("no checkpoint named moved"), "{err}");
    assert_eq!(tiers_of(&node_a, "moved"), json!(["ram", "nvme"]));
}

/// An agent with the shared S3 tier and its own containerd (namespace `k8s.io`) whose shim
/// calls it back, under `dir`.
fn node_with_containerd(dir: &Path, s3: &S3Server, release: Release) -> (TestAgent, Containerd) {
    std::fs::create_dir_all(dir).unwrap();
    let socket = dir.join("containerd/containerd.sock");
    let config = format!(
        "containerd_socket = \"{}\"\n{}",
        socket.display(),
        s3.agent_config()
    );
    let agent = TestAgent::start_with(&config, &S3Server::credentials());
    let containerd = Containerd::start_release(dir, &agent.socket, release);
    assert_eq!(containerd.socket, socket);
    (agent, containerd)
}

fn status_where(path: &Path, what: &str, ready: impl Fn(&Status) -> bool) -> Status {
    eventually(what, || Status::read(path).is_some_and(|s| ready(&s)));
    Status::read(path).unwrap()
}

/// Tenant isolation holds for a record adopted from S3: a container of pod namespace
/// tenant-a is checkpointed into S3 on node A; node B, which never saw it, adopts the record
/// with its origin, refuses a tenant-b container that names it (both namespaces named, no
/// task started) and restores it into a tenant-a container, which continues the workload.
fn adopted_records_keep_their_tenant(release: Release) {
    let s3 = S3Server::start();
    let base = tempfile::Builder::new()
        .prefix("kybernate-tenancy-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let (node_a, containerd_a) = node_with_containerd(&base.path().join("a"), &s3, release);
    let (node_b, containerd_b) = node_with_containerd(&base.path().join("b"), &s3, release);
    let status = base.path().join("status").join("w");
    std::fs::create_dir_all(status.parent().unwrap()).unwrap();
    let ctl = Path::new(CTL);

    let out =
        containerd_a.run_workload_in_pod("owner", ctl, 16, &status, ("tenant-a", "owner"), None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    status_where(&status, "the workload counts", |s| s.counter >= 5);
    let reply = node_a.ctl_json(&[
        "checkpoint",
        "--container",
        "owner",
        "--namespace",
        containerd::NAMESPACE,
        "--tier",
        "s3",
    ]);
    let name = reply["name"].as_str().unwrap().to_owned();
    let epoch = Status::read(&status).unwrap().epoch;
    let shared = s3
        .dir
        .path()
        .join(format!("{S3_BUCKET}/node-a/records/{name}.json"));
    eventually("node A shares the record", || shared.exists());
    containerd_a.remove("owner");
    // Blank the status (same size: CRIU checks the size of files it restores), so only the
    // restored process can fill it again.
    std::fs::write(&status, [b' '; kybernate_sample_workload::STATUS_BYTES]).unwrap();

    assert_eq!(node_b.ctl_json(&["list"]), json!([]));
    let out = containerd_b.run_workload_in_pod(
        "thief",
        ctl,
        0,
        &status,
        ("tenant-b", "thief"),
        Some(&name),
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "tenant-b restored tenant-a's checkpoint on node B"
    );
    assert!(
        text.contains(&name) && text.contains("tenant-a") && text.contains("tenant-b"),
        "the refusal names the checkpoint and both namespaces: {text}"
    );
    let tasks = containerd_b.ctr(&["tasks", "ls", "-q"]);
    assert!(
        !String::from_utf8_lossy(&tasks.stdout).contains("thief"),
        "a task runs for tenant-b"
    );
    let _ = containerd_b.ctr(&["containers", "rm", "thief"]);
    let log = node_b.log();
    assert!(
        log.contains("adopted the record")
            && log.contains("refused a container restore across tenants"),
        "{log}"
    );

    let out = containerd_b.run_workload_in_pod(
        "heir",
        ctl,
        0,
        &status,
        ("tenant-a", "heir"),
        Some(&name),
    );
    assert!(
        out.status.success(),
        "tenant-a's restore on node B failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        node_b.log()
    );
    let restored = status_where(&status, "the restored workload counts", |s| s.counter > 0);
    assert_eq!(restored.epoch, epoch, "node B restored tenant-a's workload");
    containerd_b.remove("heir");
}

#[test]
fn containerd_16_records_adopted_from_s3_keep_their_tenant() {
    adopted_records_keep_their_tenant(Release::V16);
}

#[test]
fn containerd_21_records_adopted_from_s3_keep_their_tenant() {
    adopted_records_keep_their_tenant(Release::V21);
}
