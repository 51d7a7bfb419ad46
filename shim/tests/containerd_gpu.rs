//! A GPU container through the `kybernate` shim on real containerd 1.6 and 2.1, with the fake
//! CUDA driver (`testing/fake-libcuda`, the test double of libcuda.so.1) and real CRIU: the
//! test workload holds known data in (fake) VRAM, `kybernatectl checkpoint --container` goes
//! agent → containerd → shim → agent (CUDA lock + checkpoint, `runc checkpoint`), the task is
//! killed, and a container created with `kybernate.io/restore-from` continues with its VRAM
//! contents intact and its progress counters carried on.
//!
//! Each test runs on its own fake GPU node ([`on_node`] re-runs it with the fake driver on
//! `LD_LIBRARY_PATH`), so the agent the harness starts loads the fake driver as it would the
//! real one. The container gets the workload, the fake driver, the host's libc, the node
//! directory and the host's procfs (the fake names processes by host pid) as bind mounts.

mod harness;

use std::path::Path;
use std::time::{Duration, Instant};

use harness::{containerd_16, containerd_21, Node, Version, IMAGE, KYBERNATE};
use kybernate_gpu_workload::harness::{
    fake_driver, on_node, read_progress, workload_binary, Node as GpuNode, Progress, GPU_A,
};

/// Where the fake node directory appears inside the container.
const NODE_IN_CONTAINER: &str = "/kyb/node";

fn bind(src: &Path, dst: &str, options: &str) -> String {
    format!(
        "type=bind,src={},dst={dst},options={options}",
        src.display()
    )
}

/// `ctr run` arguments for the workload container `id` (extra: e.g. the restore annotation).
fn run_gpu_container(node: &Node, gpu: &GpuNode, id: &str, extra: &[&str]) {
    let mounts = [
        bind(&gpu.dir, NODE_IN_CONTAINER, "rbind:rw"),
        bind(Path::new("/proc"), "/host/proc", "bind:ro"),
        bind(
            Path::new("/usr/lib/x86_64-linux-gnu"),
            "/lib/x86_64-linux-gnu",
            "rbind:ro",
        ),
        bind(Path::new("/usr/lib64"), "/lib64", "rbind:ro"),
        bind(&workload_binary(), "/kyb/gpu-workload", "bind:ro"),
        bind(&fake_driver(), "/kyb/lib/libcuda.so.1", "bind:ro"),
    ];
    let env = [
        "LD_LIBRARY_PATH=/kyb/lib".to_owned(),
        format!("KYBERNATE_FAKE_CUDA_DIR={NODE_IN_CONTAINER}"),
        "KYBERNATE_FAKE_CUDA_HOST_PROC=/host/proc".to_owned(),
        format!("NVIDIA_VISIBLE_DEVICES={GPU_A}"),
    ];
    let mut args: Vec<&str> = vec!["run", "-d", "--runtime", KYBERNATE];
    for m in &mounts {
        args.extend(["--mount", m.as_str()]);
    }
    for e in &env {
        args.extend(["--env", e.as_str()]);
    }
    args.extend_from_slice(extra);
    let state = format!("{NODE_IN_CONTAINER}/state");
    args.extend([
        IMAGE,
        id,
        "/kyb/gpu-workload",
        "--mib",
        "32",
        "--children",
        "0",
        "--state-dir",
        &state,
    ]);
    node.ctr_ok(&args);
    node.wait_status(id, "RUNNING");
}

/// The workload's one process (pid 1 in its container).
fn progress(gpu: &GpuNode) -> Option<Progress> {
    read_progress(&gpu.dir.join("state"))
        .into_iter()
        .find(|(pid, _)| *pid == 1)
        .map(|(_, p)| p)
}

fn wait_progress(gpu: &GpuNode, what: &str, done: impl Fn(&Progress) -> bool) -> Progress {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = progress(gpu);
        if let Some(p) = &now {
            assert!(
                p.status == "ok" || p.status.is_empty(),
                "the workload failed: {}",
                p.status
            );
            if done(p) {
                return p.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "the workload never reached: {what}; progress {now:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn vram_survives(gpu: &GpuNode, version: Version) {
    std::fs::create_dir_all(gpu.dir.join("state")).unwrap();
    let node = Node::start(version);
    run_gpu_container(&node, gpu, "gpu", &[]);
    let first = wait_progress(gpu, "one verified sweep", |p| {
        p.status == "ok" && p.sweeps >= 1
    });
    assert_eq!(
        gpu.regions_on(GPU_A).len(),
        1,
        "the container's VRAM is on the fake GPU"
    );

    let out = node.kybernatectl(&[
        "--output",
        "json",
        "checkpoint",
        "--container",
        "gpu",
        "--namespace",
        &node.namespace,
    ]);
    assert!(
        out.status.success(),
        "kybernatectl checkpoint --container failed: {}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.agent_log()
    );
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let name = reply["name"]
        .as_str()
        .unwrap_or_else(|| panic!("no checkpoint name in {reply}"))
        .to_owned();
    let phases = reply["phases"].as_object().cloned().unwrap_or_default();
    for phase in ["cuda_checkpoint", "criu_dump"] {
        assert!(phases.contains_key(phase), "phase {phase} missing: {reply}");
    }
    let calls = gpu.calls();
    for op in ["lock ", "checkpoint "] {
        assert!(
            calls.iter().any(|c| c.starts_with(op) && c.ends_with(" 0")),
            "the agent never called {op}on the container's process: {calls:?}"
        );
    }
    let at_checkpoint = progress(gpu).expect("progress at the checkpoint");
    assert!(at_checkpoint.iterations >= first.iterations);
    assert!(
        gpu.regions_on(GPU_A).is_empty(),
        "the checkpoint moved the VRAM into the (dumped) process"
    );
    node.remove("gpu");

    let annotation = format!("kybernate.io/restore-from={name}");
    run_gpu_container(&node, gpu, "gpu-restored", &["--annotation", &annotation]);
    let restored = wait_progress(gpu, "two more verified sweeps after the restore", |p| {
        p.status == "ok" && p.sweeps >= at_checkpoint.sweeps + 2
    });
    assert!(
        restored.iterations > at_checkpoint.iterations,
        "the workload restarted instead of continuing ({} after, {} at the checkpoint)",
        restored.iterations,
        at_checkpoint.iterations
    );
    assert_eq!(
        gpu.regions_on(GPU_A).len(),
        1,
        "the VRAM is back on the fake GPU"
    );
    let calls = gpu.calls();
    assert!(
        calls
            .iter()
            .any(|c| c.starts_with("restore ") && c.ends_with(" 0")),
        "the agent never ran the CUDA restore: {calls:?}"
    );
    node.remove("gpu-restored");
}

#[test]
fn containerd_16_gpu_container_keeps_vram_across_checkpoint_and_restore() {
    on_node(
        "containerd_16_gpu_container_keeps_vram_across_checkpoint_and_restore",
        Some(GPU_A),
        |gpu| vram_survives(gpu, containerd_16()),
    );
}

#[test]
fn containerd_21_gpu_container_keeps_vram_across_checkpoint_and_restore() {
    on_node(
        "containerd_21_gpu_container_keeps_vram_across_checkpoint_and_restore",
        Some(GPU_A),
        |gpu| vram_survives(gpu, containerd_21()),
    );
}
