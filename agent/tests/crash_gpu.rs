//! Crash safety of GPU workloads on the fake libcuda.so.1 test double and real CRIU (root):
//! the agent killed after it locked and checkpointed a workload's CUDA processes, before CRIU
//! ran. Only that agent would have given the GPUs back; the next one must.

mod support;

use kybernate_gpu_workload::harness::{on_node, Workload, GPU_A};
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
