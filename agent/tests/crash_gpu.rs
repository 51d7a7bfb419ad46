//! Crash safety of GPU workloads on the fake libcuda.so.1 test double and real CRIU (root):
//! the agent killed after it locked and checkpointed a workload's CUDA processes, before CRIU
//! ran. Only that agent would have given the GPUs back; the next one must. Also killed right
//! after the dump's intent is journaled (nothing may be locked yet), and after a restore
//! (the agent's CRIU or the shim's `runc restore`) brought the processes back but before
//! their GPU state was restored and unlocked.

mod support;

use kybernate_gpu_workload::harness::{criu_restore, on_node, Node, Workload, GPU_A};
use kybernate_proto::agent::v1 as pb;
use support::faults::FAILPOINTS;
use support::TestAgent;

#[test]
fn agent_killed_after_the_cuda_lock_leaves_the_workload_unlocked_after_restart() {
    on_node(
        "agent_killed_after_the_cuda_lock_leaves_the_workload_unlocked_after_restart",
        Some(GPU_A),
        |node| {
            let mut agent =
                TestAgent::start_with("", &[(FAILPOINTS, "checkpoint.before_criu=kill")]);
            let w = Workload::start(node, 64, 1);
            let root = w.root.to_string();
            let err = agent.ctl_err(&["checkpoint", "--pid", &root, "--name", "gl"]);
            assert!(err.contains("closed the connection"), "{err}");
            assert!(!agent.wait_exit().success());
            assert!(
                node.regions_on(GPU_A).is_empty(),
                "the agent died with the GPU memory checkpointed"
            );

            agent.relaunch_with_env(&[]);
            assert_eq!(
                node.regions_on(GPU_A).len(),
                2,
                "VRAM of both processes is back on the device"
            );
            let calls = node.calls();
            for pid in w.pids() {
                assert!(
                    calls
                        .iter()
                        .any(|c| c.starts_with(&format!("unlock {pid} "))),
                    "{pid} unlocked: {calls:?}"
                );
            }
            w.assert_keeps_verifying();
            assert!(agent.listed("gl").is_none());
            // The workload is whole again: a checkpoint of it works.
            agent.ctl_json(&[
                "checkpoint",
                "--pid",
                &root,
                "--name",
                "gl",
                "--leave-running",
            ]);
            w.assert_keeps_verifying();
        },
    );
}

/// Every `lock <pid>` call the fake driver saw.
fn locks(node: &Node) -> Vec<String> {
    node.calls()
        .into_iter()
        .filter(|c| c.starts_with("lock "))
        .collect()
}

/// Asserts that each process of `w` was unlocked and its VRAM is back on the device.
fn assert_unlocked(node: &Node, w: &Workload) {
    assert_eq!(
        node.regions_on(GPU_A).len(),
        2,
        "VRAM of both processes is back on the device"
    );
    let calls = node.calls();
    for pid in w.pids() {
        assert!(
            calls
                .iter()
                .any(|c| c.starts_with(&format!("unlock {pid} "))),
            "{pid} unlocked: {calls:?}"
        );
    }
    w.assert_keeps_verifying();
}

#[test]
fn agent_killed_after_the_dump_intent_had_locked_nothing_and_the_workload_runs_on() {
    on_node(
        "agent_killed_after_the_dump_intent_had_locked_nothing_and_the_workload_runs_on",
        Some(GPU_A),
        |node| {
            let mut agent =
                TestAgent::start_with("", &[(FAILPOINTS, "checkpoint.after_intent=kill")]);
            let w = Workload::start(node, 64, 1);
            let root = w.root.to_string();
            let err = agent.ctl_err(&["checkpoint", "--pid", &root, "--name", "gi"]);
            assert!(err.contains("closed the connection"), "{err}");
            assert!(!agent.wait_exit().success());
            let journal = std::fs::read_to_string(agent.state_dir().join("journal")).unwrap();
            assert!(
                journal.contains("\"dump_intent\"") && journal.contains("\"gi\""),
                "the intent is journaled: {journal}"
            );
            assert!(
                locks(node).is_empty(),
                "nothing is locked before the intent is journaled: {:?}",
                node.calls()
            );
            assert_eq!(node.regions_on(GPU_A).len(), 2);

            agent.relaunch_with_env(&[]);
            assert!(
                agent.log().contains("dropping an unfinished dump"),
                "{}",
                agent.log()
            );
            w.assert_keeps_verifying();
            assert!(agent.listed("gi").is_none());
            assert!(!agent.ram_root().join(".partial-gi").exists());
            agent.ctl_json(&[
                "checkpoint",
                "--pid",
                &root,
                "--name",
                "gi",
                "--leave-running",
            ]);
            w.assert_keeps_verifying();
        },
    );
}

#[test]
fn agent_killed_after_criu_restore_has_the_restored_workload_unlocked_after_restart() {
    on_node(
        "agent_killed_after_criu_restore_has_the_restored_workload_unlocked_after_restart",
        Some(GPU_A),
        |node| {
            let mut agent = TestAgent::start_with("", &[(FAILPOINTS, "restore.after_criu=kill")]);
            let mut w = Workload::start(node, 64, 1);
            let root = w.root.to_string();
            agent.ctl_json(&[
                "checkpoint",
                "--pid",
                &root,
                "--name",
                "gr",
                "--tier",
                "ram",
            ]);
            w.reap_after_dump();
            let err = agent.ctl_err(&["restore", "gr"]);
            assert!(err.contains("closed the connection"), "{err}");
            assert!(!agent.wait_exit().success());
            assert!(
                node.regions_on(GPU_A).is_empty(),
                "the agent died before it restored the GPU state"
            );

            agent.relaunch_with_env(&[]);
            assert_unlocked(node, &w);
            assert!(agent.listed("gr").is_some(), "the checkpoint stays");
        },
    );
}

#[test]
fn agent_killed_before_unlocking_a_shim_restore_unlocks_its_processes_after_restart() {
    on_node(
        "agent_killed_before_unlocking_a_shim_restore_unlocks_its_processes_after_restart",
        Some(GPU_A),
        |node| {
            let mut agent = TestAgent::start_with(
                "",
                &[(FAILPOINTS, "container_restore.before_cuda_restore=kill")],
            );
            let mut w = Workload::start(node, 64, 1);
            let root = w.root.to_string();
            agent.ctl_json(&[
                "checkpoint",
                "--pid",
                &root,
                "--name",
                "gs",
                "--tier",
                "ram",
            ]);
            w.reap_after_dump();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let mut client = kybernate_client::connect_agent(&agent.socket)
                    .await
                    .unwrap();
                let staged = client
                    .container_restore_stage(pb::ContainerRestoreStageRequest {
                        checkpoint_ref: "gs".into(),
                        container_id: "gs-container".into(),
                        from_tier: "ram".into(),
                        target: None,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let journal = std::fs::read_to_string(agent.state_dir().join("journal")).unwrap();
                assert!(
                    journal.contains("\"restore_staged\""),
                    "the Stage is journaled: {journal}"
                );
                // What the shim's `runc restore` does: CRIU brings the tree back, its CUDA
                // processes still checkpointed and locked.
                criu_restore(std::path::Path::new(&staged.image_dir)).unwrap();
                let pids = w
                    .pids()
                    .iter()
                    .map(|p| i32::try_from(*p).unwrap())
                    .collect();
                let ended = client
                    .container_restore_end(pb::ContainerRestoreEndRequest {
                        checkpoint_ref: "gs".into(),
                        pids,
                        restored: true,
                    })
                    .await;
                assert!(ended.is_err(), "the agent died before it replied");
            });
            assert!(!agent.wait_exit().success());
            let journal = std::fs::read_to_string(agent.state_dir().join("journal")).unwrap();
            assert!(
                journal.contains("\"restore_ran\""),
                "the restored pids are journaled before the unlock: {journal}"
            );
            assert!(node.regions_on(GPU_A).is_empty(), "still locked");

            agent.relaunch_with_env(&[]);
            assert_unlocked(node, &w);
            assert!(
                agent
                    .log()
                    .contains("restored and unlocked the GPUs of a restore"),
                "{}",
                agent.log()
            );
        },
    );
}

#[test]
fn agent_killed_between_a_shim_restore_stage_and_its_end_unlocks_on_the_late_end() {
    on_node(
        "agent_killed_between_a_shim_restore_stage_and_its_end_unlocks_on_the_late_end",
        Some(GPU_A),
        |node| {
            let mut agent = TestAgent::start();
            let mut w = Workload::start(node, 64, 1);
            let root = w.root.to_string();
            agent.ctl_json(&[
                "checkpoint",
                "--pid",
                &root,
                "--name",
                "gl",
                "--tier",
                "ram",
            ]);
            w.reap_after_dump();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let staged = runtime.block_on(async {
                let mut client = kybernate_client::connect_agent(&agent.socket)
                    .await
                    .unwrap();
                client
                    .container_restore_stage(pb::ContainerRestoreStageRequest {
                        checkpoint_ref: "gl".into(),
                        container_id: "gl-container".into(),
                        from_tier: "ram".into(),
                        target: None,
                    })
                    .await
                    .unwrap()
                    .into_inner()
            });
            // The agent dies while the shim restores; the shim's End reaches the next one.
            agent.kill_hard();
            criu_restore(std::path::Path::new(&staged.image_dir)).unwrap();
            assert!(node.regions_on(GPU_A).is_empty(), "restored still locked");
            agent.relaunch_with_env(&[]);
            let pids: Vec<i32> = w
                .pids()
                .iter()
                .map(|p| i32::try_from(*p).unwrap())
                .collect();
            runtime.block_on(async {
                let mut client = kybernate_client::connect_agent(&agent.socket)
                    .await
                    .unwrap();
                let end = pb::ContainerRestoreEndRequest {
                    checkpoint_ref: "gl".into(),
                    pids,
                    restored: true,
                };
                client
                    .container_restore_end(end.clone())
                    .await
                    .expect("the late End of a restore staged before the restart unlocks");
                let again = client.container_restore_end(end).await.unwrap_err();
                assert_eq!(again.code(), tonic::Code::NotFound, "only once: {again}");
            });
            assert_unlocked(node, &w);
        },
    );
}

#[test]
fn agent_killed_after_a_shim_begin_journaled_its_intent_locked_nothing() {
    on_node(
        "agent_killed_after_a_shim_begin_journaled_its_intent_locked_nothing",
        Some(GPU_A),
        |node| {
            let mut agent = TestAgent::start_with(
                "",
                &[(FAILPOINTS, "container_checkpoint.after_intent=kill")],
            );
            let w = Workload::start(node, 64, 1);
            let pids: Vec<i32> = w
                .pids()
                .iter()
                .map(|p| i32::try_from(*p).unwrap())
                .collect();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let begin = pb::ContainerCheckpointBeginRequest {
                name: "gb".into(),
                container_id: "gb-container".into(),
                pids,
                leave_running: true,
                ..Default::default()
            };
            runtime.block_on(async {
                let mut client = kybernate_client::connect_agent(&agent.socket)
                    .await
                    .unwrap();
                let begun = client.container_checkpoint_begin(begin.clone()).await;
                assert!(begun.is_err(), "the agent died before it replied");
            });
            assert!(!agent.wait_exit().success());
            let journal = std::fs::read_to_string(agent.state_dir().join("journal")).unwrap();
            assert!(
                journal.contains("\"dump_intent\"") && journal.contains("gb-container"),
                "the Begin's intent is journaled: {journal}"
            );
            assert!(
                locks(node).is_empty(),
                "nothing is locked before the intent is journaled: {:?}",
                node.calls()
            );

            agent.relaunch_with_env(&[]);
            w.assert_keeps_verifying();
            assert!(agent.listed("gb").is_none());
            assert!(!agent.ram_root().join(".partial-gb").exists());
            // The name is free and the container checkpoints again.
            runtime.block_on(async {
                let mut client = kybernate_client::connect_agent(&agent.socket)
                    .await
                    .unwrap();
                let reply = client
                    .container_checkpoint_begin(begin)
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(reply.cuda_pids.len(), 2, "{reply:?}");
                client
                    .container_checkpoint_end(pb::ContainerCheckpointEndRequest {
                        checkpoint_ref: "gb".into(),
                        dumped: false,
                        failure: "test rolls back".into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            });
            assert_unlocked(node, &w);
        },
    );
}
