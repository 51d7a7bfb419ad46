//! The workload state `list` and `inspect` show, on a real agent and real CRIU (root): it is
//! read from the workload's watch channel, so it answers while a checkpoint of the same
//! workload runs and shows where that checkpoint is; and the shim's path (Begin and End)
//! moves a container's state the same way.

mod support;

use std::collections::BTreeSet;

use kybernate_proto::agent::v1 as pb;
use support::{TestAgent, Workload};

fn state(agent: &TestAgent, name: &str) -> String {
    agent.ctl_json(&["inspect", name])["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn inspect_shows_a_running_checkpoints_state_without_waiting_for_it() {
    let agent = TestAgent::start();
    let workload = Workload::start(agent.dir.path(), 256, &[]);
    let pid = workload.pid.to_string();
    let first = [
        "checkpoint",
        "--pid",
        &pid,
        "--name",
        "first",
        "--leave-running",
        "--tier",
        "ram",
    ];
    agent.ctl_json(&first);
    assert_eq!(state(&agent, "first"), "Running");

    let seen = std::thread::scope(|scope| {
        let second = scope.spawn(|| {
            agent.ctl_json(&[
                "checkpoint",
                "--pid",
                &pid,
                "--name",
                "second",
                "--leave-running",
                "--tier",
                "nvme",
            ])
        });
        let mut seen = BTreeSet::new();
        while !second.is_finished() {
            seen.insert(state(&agent, "first"));
        }
        second.join().unwrap();
        seen
    });
    // Asked through the workload's mailbox, inspect would have waited for the second
    // checkpoint and only ever seen "Running".
    assert!(
        seen.contains("Freezing") || seen.contains("Dumped"),
        "inspect never saw the checkpoint under way: {seen:?}"
    );
    assert_eq!(state(&agent, "second"), "Running");
}

#[test]
fn the_shims_begin_and_end_move_the_containers_state() {
    let agent = TestAgent::start();
    let mut workload = Workload::start(agent.dir.path(), 16, &[]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let image_dir = runtime.block_on(async {
        let mut client = kybernate_client::connect_agent(&agent.socket)
            .await
            .unwrap();
        client
            .container_checkpoint_begin(pb::ContainerCheckpointBeginRequest {
                name: "boxed".into(),
                container_id: "box-1".into(),
                pids: vec![workload.pid],
                leave_running: false,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .image_dir
    });
    let dumped = std::process::Command::new("criu")
        .args(["dump", "--tree", &workload.pid.to_string(), "--images-dir"])
        .arg(&image_dir)
        .args(["--log-file", "dump.log"])
        .status()
        .unwrap();
    assert!(dumped.success(), "criu dump failed");
    workload.reap_dumped();
    runtime.block_on(async {
        let mut client = kybernate_client::connect_agent(&agent.socket)
            .await
            .unwrap();
        client
            .container_checkpoint_end(pb::ContainerCheckpointEndRequest {
                checkpoint_ref: "boxed".into(),
                dumped: true,
                ..Default::default()
            })
            .await
            .unwrap();
    });
    assert_eq!(state(&agent, "boxed"), "Stored");
    let journal = std::fs::read_to_string(agent.state_dir().join("journal")).unwrap();
    for transition in ["dump_intent", "dumped", "committed", "recorded"] {
        assert!(
            journal.contains(&format!("\"event\":\"{transition}\"")),
            "the journal lacks {transition}: {journal}"
        );
    }
}
