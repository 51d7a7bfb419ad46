//! CUDA workloads through the agent, on the fake libcuda.so.1 test double and real CRIU.
//! Each test runs on its own fake node (`on_node` re-runs it with LD_LIBRARY_PATH set), and
//! the agent it starts loads the fake driver exactly as it would load the real one.

mod support;

use kybernate_gpu_workload::harness::{on_node, Workload, GPU_A, GPU_B, MODEL};
use support::TestAgent;

fn checkpoint(agent: &TestAgent, w: &Workload, name: &str) -> serde_json::Value {
    agent.ctl_json(&["checkpoint", "--pid", &w.root.to_string(), "--name", name])
}

#[test]
fn vram_survives_checkpoint_kill_restore_through_the_agent() {
    on_node(
        "vram_survives_checkpoint_kill_restore_through_the_agent",
        Some(GPU_A),
        |node| {
            let agent = TestAgent::start();
            let mut w = Workload::start(node, 128, 1);
            let cp = checkpoint(&agent, &w, "gpu");
            let phases = cp["phases"].as_object().unwrap();
            for phase in ["cuda_checkpoint", "cuda_lock", "criu_dump", "store_nvme"] {
                assert!(phases.contains_key(phase), "{cp}");
            }
            assert!(
                node.regions_on(GPU_A).is_empty(),
                "the checkpoint moved VRAM into host memory"
            );
            let order: Vec<String> = node
                .calls()
                .into_iter()
                .filter(|c| c.starts_with("lock ") || c.starts_with("checkpoint "))
                .collect();
            assert_eq!(order.len(), 4, "{order:?}");
            assert!(
                order[0].starts_with("lock ") && order[1].starts_with("lock "),
                "both locked first: {order:?}"
            );
            w.reap_after_dump();

            let restored = agent.ctl_json(&["restore", "gpu", "--from", "nvme"]);
            assert_eq!(support::pid_of(&restored), i32::try_from(w.root).unwrap());
            assert!(
                restored["phases"]
                    .as_object()
                    .unwrap()
                    .contains_key("cuda_restore"),
                "{restored}"
            );
            assert_eq!(
                node.regions_on(GPU_A).len(),
                2,
                "VRAM of both processes is back on the device"
            );
            w.assert_keeps_verifying();
            let info = agent.ctl_json(&["inspect", "gpu"]);
            assert_eq!(info["name"], "gpu");
        },
    );
}

#[test]
fn lock_timeout_and_criu_failure_leave_the_workload_running() {
    on_node(
        "lock_timeout_and_criu_failure_leave_the_workload_running",
        Some(GPU_A),
        |node| {
            let agent = TestAgent::start_with_config("[timeouts]\ncuda_ms = 300\n");
            let w = Workload::start(node, 64, 0);
            node.set_faults("lock hang\n");
            let err =
                agent.ctl_err(&["checkpoint", "--pid", &w.root.to_string(), "--name", "hung"]);
            assert!(
                err.contains("CUDA lock of pid") && err.contains("CUDA_ERROR_TIMEOUT (909)"),
                "{err}"
            );
            node.set_faults("");
            w.assert_keeps_verifying();

            // CRIU fails after the CUDA checkpoint: the agent restores and unlocks the GPU state.
            let err = agent.ctl_err(&[
                "checkpoint",
                "--pid",
                &w.root.to_string(),
                "--name",
                "criu-fails",
                "--timeout-ms",
                "1",
            ]);
            assert!(err.contains("criu dump timed out"), "{err}");
            assert_eq!(
                node.regions_on(GPU_A).len(),
                1,
                "VRAM is back on the device"
            );
            w.assert_keeps_verifying();
            assert!(agent.ctl_json(&["list"]).as_array().unwrap().is_empty());
            let metrics = agent.metrics();
            assert!(
            metrics.contains("kybernate_failures_total{operation=\"checkpoint\",phase=\"cuda_checkpoint\",reason=\"driver_call\"} 1"),
            "{metrics}"
        );
        },
    );
}

#[test]
fn restore_remaps_gpus_and_refuses_incompatible_nodes() {
    on_node(
        "restore_remaps_gpus_and_refuses_incompatible_nodes",
        Some(GPU_A),
        |node| {
            let mut agent = TestAgent::start();
            let mut w = Workload::start(node, 64, 0);
            checkpoint(&agent, &w, "moving");
            w.reap_after_dump();

            node.set_devices(&[(GPU_B, 16384, "Other Fake GPU")]);
            agent.restart();
            let err = agent.ctl_err(&["restore", "moving"]);
            assert!(
                err.contains("restore refused before anything was locked")
                    && err.contains("GPU model")
                    && err.contains(MODEL),
                "{err}"
            );
            assert!(
                !std::path::Path::new(&format!("/proc/{}", w.root)).exists(),
                "CRIU never ran"
            );

            node.set_devices(&[(GPU_B, 16384, MODEL)]);
            node.set_driver_version(13000);
            agent.restart();
            agent.ctl_json(&["restore", "moving"]);
            assert_eq!(node.regions_on(GPU_B).len(), 1, "VRAM now lives on GPU B");
            assert!(node.regions_on(GPU_A).is_empty());
            w.assert_keeps_verifying();
        },
    );
}
