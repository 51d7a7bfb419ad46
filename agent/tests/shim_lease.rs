//! Leases on the shim's two-step operations, against a real agent and real CRIU (root): the
//! shim's calls are made directly over the agent's socket, and the End that a killed or hung
//! shim never sends is simply not sent. Each case checks what the README's reliability
//! section promises when a lease runs out: the workload runs on (or, for a stop-mode dump
//! that completed, is kept as a checkpoint and restores), nothing stays CUDA-held or busy,
//! the name is free again, and the journal, the log and `kybernatectl watch` say why.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kybernate_proto::agent::v1 as pb;
use pb::agent_client::AgentClient;
use support::{proc_state, TestAgent, Workload};
use tonic::transport::Channel;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn client(agent: &TestAgent) -> AgentClient<Channel> {
    kybernate_client::connect_agent(&agent.socket)
        .await
        .unwrap()
}

fn begin_request(name: &str, pid: i32, leave_running: bool) -> pb::ContainerCheckpointBeginRequest {
    pb::ContainerCheckpointBeginRequest {
        name: name.into(),
        container_id: format!("{name}-container"),
        pids: vec![pid],
        leave_running,
        ..Default::default()
    }
}

/// Waits for the `lease` event of `name` on `events` and returns it.
async fn lease_event(events: &mut tonic::Streaming<pb::Event>) -> pb::Event {
    let wait = async {
        loop {
            let event = events
                .message()
                .await
                .expect("the event stream works")
                .expect("the event stream stays open");
            if event.phase == "lease" {
                return event;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .expect("the lease expired within a minute")
}

/// Begins a container checkpoint of `name`, retrying while an expired lease of the same
/// name is still being settled.
async fn begin_when_free(
    client: &mut AgentClient<Channel>,
    request: pb::ContainerCheckpointBeginRequest,
) -> pb::ContainerCheckpointBeginReply {
    for _ in 0..600 {
        match client.container_checkpoint_begin(request.clone()).await {
            Ok(reply) => return reply.into_inner(),
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("Begin refused: {status}"),
        }
    }
    panic!("the name never became free");
}

/// The workload runs: not stopped, and its counter moves.
fn assert_running(workload: &Workload) {
    let state = proc_state(workload.pid);
    assert!(
        matches!(state, Some('R' | 'S' | 'D')),
        "workload {} is in state {state:?}",
        workload.pid
    );
    let now = workload.read().unwrap().counter;
    workload.wait_for(|s| s.counter > now + 2);
}

fn journal(agent: &TestAgent) -> String {
    std::fs::read_to_string(agent.state_dir().join("journal")).unwrap_or_default()
}

#[test]
fn a_begin_without_its_end_expires_gives_the_workload_back_and_frees_the_name() {
    let agent = TestAgent::start_with_config("[timeouts]\nshim_lease_ms = 1500\n");
    let workload = Workload::start(agent.dir.path(), 16, &[]);
    runtime().block_on(async {
        let mut client = client(&agent).await;
        let mut events = client
            .watch_events(pb::WatchEventsRequest {
                checkpoint_ref: "leased".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let begin = client
            .container_checkpoint_begin(begin_request("leased", workload.pid, true))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(begin.lease_ms, 1500, "the shim is told its lease");
        assert!(Path::new(&begin.image_dir).is_dir());
        let held = client
            .container_checkpoint_begin(begin_request("leased", workload.pid, true))
            .await
            .unwrap_err();
        assert!(held.message().contains("leased"), "{held}");

        // The shim never sends its End.
        let expired = lease_event(&mut events).await;
        assert_eq!(expired.status, "expired");
        assert_eq!(expired.operation, "checkpoint");
        assert!(
            expired
                .message
                .contains("got no End within its lease of 1500 ms"),
            "{expired:?}"
        );

        let again = begin_when_free(&mut client, begin_request("leased", workload.pid, true)).await;
        assert_eq!(again.checkpoint_ref, "leased", "the name is free again");
        let ended = client
            .container_checkpoint_end(pb::ContainerCheckpointEndRequest {
                checkpoint_ref: "leased".into(),
                dumped: false,
                failure: "test rolls back".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!ended.criu_done);

        let late = client
            .container_checkpoint_end(pb::ContainerCheckpointEndRequest {
                checkpoint_ref: "leased".into(),
                dumped: true,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(late.code(), tonic::Code::NotFound);
        assert!(late.message().contains("its lease ran out"), "{late}");
    });
    assert_running(&workload);
    assert!(
        !agent.state_dir().join("ram/.partial-leased").exists(),
        "the partial image directory is gone"
    );
    let listed = agent.ctl_json(&["list"]);
    assert!(
        !listed.to_string().contains("leased"),
        "nothing is listed: {listed}"
    );
    let journal = journal(&agent);
    assert!(
        journal.contains("got no End within its lease"),
        "the journal says why: {journal}"
    );
    assert!(
        agent.log().contains("lease expired"),
        "the log says why: {}",
        agent.log()
    );
}

#[test]
fn a_completed_stop_mode_dump_without_its_end_is_kept_as_a_checkpoint() {
    let agent = TestAgent::start_with_config("[timeouts]\nshim_lease_ms = 2000\n");
    let mut workload = Workload::start(agent.dir.path(), 32, &[]);
    let at_begin = workload.read().unwrap();
    runtime().block_on(async {
        let mut client = client(&agent).await;
        let mut events = client
            .watch_events(pb::WatchEventsRequest {
                checkpoint_ref: "kept".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let begin = client
            .container_checkpoint_begin(begin_request("kept", workload.pid, false))
            .await
            .unwrap()
            .into_inner();
        // What the shim's `runc checkpoint` does in stop mode: CRIU dumps and ends the
        // workload. Then the shim dies before its End.
        let dumped = Command::new("criu")
            .args(["dump", "--tree", &workload.pid.to_string(), "--images-dir"])
            .arg(&begin.image_dir)
            .args(["--log-file", "dump.log", "-v4"])
            .status()
            .unwrap();
        assert!(
            dumped.success(),
            "criu dump failed: {}",
            std::fs::read_to_string(Path::new(&begin.image_dir).join("dump.log"))
                .unwrap_or_default()
        );
        let expired = lease_event(&mut events).await;
        assert_eq!(expired.status, "expired");
    });
    workload.reap_dumped();
    support::eventually("the completed dump is listed as a checkpoint", || {
        agent.ctl_json(&["list"]).as_array().is_some_and(|all| {
            all.iter()
                .any(|c| c["name"] == "kept" && c["tiers"].to_string().contains("ram"))
        })
    });
    let inspected = agent.ctl_json(&["inspect", "kept"]);
    assert!(
        inspected["note"]
            .as_str()
            .unwrap()
            .contains("adopted: the shim's checkpoint got no End"),
        "{inspected}"
    );
    assert!(journal(&agent).contains("\"recorded\""));

    let restored = agent.ctl_json(&["restore", "kept"]);
    workload.restored_as(support::pid_of(&restored));
    let after = workload.wait_for(|s| s.counter > at_begin.counter);
    assert_eq!(after.epoch, at_begin.epoch, "the same workload runs on");
    assert!(workload.verify_memory().memory_ok, "memory intact");
}

#[test]
fn a_stage_without_its_end_expires_drops_the_staged_images_and_frees_the_checkpoint() {
    let agent = TestAgent::start_with_config("[timeouts]\nshim_lease_ms = 1500\n");
    let workload = Workload::start(agent.dir.path(), 16, &[]);
    let pid = workload.pid.to_string();
    agent.ctl_json(&[
        "checkpoint",
        "--pid",
        &pid,
        "--name",
        "staged",
        "--leave-running",
        "--tier",
        "nvme",
    ]);
    runtime().block_on(async {
        let mut client = client(&agent).await;
        let mut events = client
            .watch_events(pb::WatchEventsRequest {
                checkpoint_ref: "staged".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let stage = pb::ContainerRestoreStageRequest {
            checkpoint_ref: "staged".into(),
            container_id: "staged-container".into(),
            from_tier: "nvme".into(),
            target: None,
        };
        let staged = client
            .container_restore_stage(stage.clone())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(staged.lease_ms, 1500);
        assert_eq!(staged.source_tier, "nvme");
        let scratch = Path::new(&staged.image_dir).to_owned();
        assert!(scratch.join("inventory.img").is_file(), "{scratch:?}");

        let expired = lease_event(&mut events).await;
        assert_eq!(
            (expired.operation.as_str(), expired.status.as_str()),
            ("restore", "expired")
        );
        support::eventually("the staged copy is dropped", || !scratch.exists());

        // A late End without a restore is refused clearly; one that restored processes
        // still has them unlocked.
        let late = client
            .container_restore_end(pb::ContainerRestoreEndRequest {
                checkpoint_ref: "staged".into(),
                pids: Vec::new(),
                restored: false,
            })
            .await
            .unwrap_err();
        assert_eq!(late.code(), tonic::Code::NotFound);
        assert!(late.message().contains("its lease ran out"), "{late}");
        client
            .container_restore_end(pb::ContainerRestoreEndRequest {
                checkpoint_ref: "staged".into(),
                pids: vec![workload.pid],
                restored: true,
            })
            .await
            .expect("a late End of a restore still unlocks its processes");
        let again = client
            .container_restore_end(pb::ContainerRestoreEndRequest {
                checkpoint_ref: "staged".into(),
                pids: vec![workload.pid],
                restored: true,
            })
            .await
            .unwrap_err();
        assert_eq!(again.code(), tonic::Code::NotFound, "only once: {again}");

        // The checkpoint is free: it stages again.
        let again = client
            .container_restore_stage(stage)
            .await
            .unwrap()
            .into_inner();
        client
            .container_restore_end(pb::ContainerRestoreEndRequest {
                checkpoint_ref: "staged".into(),
                pids: Vec::new(),
                restored: false,
            })
            .await
            .unwrap();
        assert!(!Path::new(&again.image_dir).exists());
    });
    assert_running(&workload);
    assert!(agent.log().contains("container restore lease expired"));
}
