//! The CUDA session against the fake driver and real CRIU 4.2: the points 1–7
//! at the library level. Needs root and `criu` on PATH; each test runs in its own
//! process on its own fake node (see `kybernate_gpu_workload::harness`).

use kybernate_cuda::{CheckpointOptions, CudaError, CudaSession, Phase, ProcessState};
use kybernate_gpu_workload::harness::{
    criu_dump, criu_restore, on_node, Workload, GPU_A, GPU_B, MODEL,
};
use std::fs;
use std::path::Path;
use std::time::Duration;

const MIB: u64 = 1024 * 1024;

fn load() -> CudaSession {
    let session = CudaSession::load().expect("loading the fake driver");
    assert!(
        !session.is_cpu_only(),
        "the fake libcuda.so.1 was not found"
    );
    session
}

fn options() -> CheckpointOptions {
    CheckpointOptions {
        lock_timeout: Duration::from_secs(5),
        host_ram_margin: 64 * MIB,
    }
}

/// Bytes of memory pages in a CRIU image set.
fn image_pages(images: &Path) -> u64 {
    fs::read_dir(images)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("pages-"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

fn states(session: &CudaSession, w: &Workload) -> Vec<ProcessState> {
    session
        .cuda_processes(&w.pids())
        .into_iter()
        .map(|(_, s)| s)
        .collect()
}

#[test]
fn vram_survives_checkpoint_kill_restore() {
    on_node(
        "vram_survives_checkpoint_kill_restore",
        Some(GPU_A),
        |node| {
            let mut w = Workload::start(node, 256, 0);
            let session = load();
            let recorded = session.fingerprint().unwrap();
            assert_eq!(recorded.devices[0].uuid.to_string(), GPU_A);
            assert_eq!(recorded.devices[0].name, MODEL);

            let held = session.checkpoint(&w.pids(), &options()).unwrap();
            assert_eq!(held.pids(), w.pids());
            assert!(
                node.regions_on(GPU_A).is_empty(),
                "checkpoint frees the device region"
            );
            assert_eq!(states(&session, &w), [ProcessState::Checkpointed]);
            held.keep_checkpointed();

            let images = node.images("dump");
            criu_dump(w.root, &images).unwrap();
            assert!(
                image_pages(&images) >= 256 * MIB,
                "the VRAM contents travel inside the CRIU image ({} bytes of pages)",
                image_pages(&images)
            );
            w.reap_after_dump();
            criu_restore(&images).unwrap();

            let report = session.restore(&w.pids(), Some(&recorded)).unwrap();
            assert_eq!(report.processes.len(), 1);
            assert!(!report.remapped);
            assert_eq!(
                node.regions_on(GPU_A).len(),
                1,
                "VRAM is back on the device"
            );
            assert_eq!(states(&session, &w), [ProcessState::Running]);
            w.assert_keeps_verifying();
        },
    );
}

#[test]
fn vram_is_lost_when_criu_runs_without_cuda_checkpoint_first() {
    on_node(
        "vram_is_lost_when_criu_runs_without_cuda_checkpoint_first",
        Some(GPU_A),
        |node| {
            let mut w = Workload::start(node, 256, 0);
            let session = load();
            let recorded = session.fingerprint().unwrap();
            let images = node.images("dump");
            criu_dump(w.root, &images).unwrap();
            assert!(
                image_pages(&images) < 128 * MIB,
                "without a CUDA checkpoint the VRAM is not in the image"
            );
            w.reap_after_dump();
            // Any driver start frees the device memory of dead processes.
            let _ = load();
            assert!(
                node.regions_on(GPU_A).is_empty(),
                "the dead process's VRAM was freed"
            );
            match criu_restore(&images) {
                Err(e) => eprintln!("restore failed as it may: {e}"),
                Ok(()) => {
                    let report = session.restore(&w.pids(), Some(&recorded)).unwrap();
                    assert!(report.processes.is_empty(), "nothing was checkpointed");
                    w.wait_until("the workload notices its VRAM is gone", |w| {
                        w.all_progress()
                            .iter()
                            .any(|(_, p)| p.status.contains("CUDA_ERROR_CONTEXT_IS_DESTROYED"))
                    });
                }
            }
        },
    );
}

#[test]
fn criu_failure_after_cuda_checkpoint_leaves_workload_running() {
    on_node(
        "criu_failure_after_cuda_checkpoint_leaves_workload_running",
        Some(GPU_A),
        |node| {
            let w = Workload::start(node, 128, 0);
            let session = load();
            let held = session.checkpoint(&w.pids(), &options()).unwrap();
            // The host-side step in flight when the lock came may still report once.
            std::thread::sleep(Duration::from_millis(100));
            let frozen = w.all_progress()[0].1.iterations;
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(
                w.all_progress()[0].1.iterations,
                frozen,
                "a checkpointed process makes no GPU progress"
            );
            let not_a_dir = node.dir.join("not-a-directory");
            fs::write(&not_a_dir, b"").unwrap();
            let err = criu_dump(w.root, &not_a_dir).unwrap_err();
            eprintln!("CRIU failed as intended: {err}");
            assert_eq!(states(&session, &w), [ProcessState::Checkpointed]);

            let timings = held.resume().unwrap();
            assert!(timings.restore > Duration::ZERO && timings.unlock > Duration::ZERO);
            assert_eq!(states(&session, &w), [ProcessState::Running]);
            assert_eq!(node.regions_on(GPU_A).len(), 1);
            w.assert_keeps_verifying();
        },
    );
}

#[test]
fn lock_timeout_reports_clearly_and_workload_keeps_running() {
    on_node(
        "lock_timeout_reports_clearly_and_workload_keeps_running",
        Some(GPU_A),
        |node| {
            let w = Workload::start(node, 128, 0);
            let session = load();
            node.set_faults("lock hang\n");
            let opts = CheckpointOptions {
                lock_timeout: Duration::from_millis(300),
                ..options()
            };
            let err = session.checkpoint(&w.pids(), &opts).unwrap_err();
            assert_eq!((err.phase(), err.driver_code()), (Phase::Lock, Some(909)));
            let text = err.to_string();
            assert!(
                text.contains("CUDA_ERROR_TIMEOUT") && text.contains(&w.root.to_string()),
                "{text}"
            );
            node.set_faults("");
            assert_eq!(states(&session, &w), [ProcessState::Running]);
            assert!(!node.calls().iter().any(|c| c.starts_with("checkpoint ")));
            w.assert_keeps_verifying();
        },
    );
}

#[test]
fn two_processes_are_both_locked_before_either_is_checkpointed() {
    on_node(
        "two_processes_are_both_locked_before_either_is_checkpointed",
        Some(GPU_A),
        |node| {
            let mut w = Workload::start(node, 128, 1);
            let pids = w.pids();
            let session = load();
            let recorded = session.fingerprint().unwrap();
            let held = session.checkpoint(&pids, &options()).unwrap();
            assert_eq!(held.pids(), pids);
            let order: Vec<String> = node
                .calls()
                .into_iter()
                .filter(|c| c.starts_with("lock ") || c.starts_with("checkpoint "))
                .collect();
            assert_eq!(
                order,
                [
                    format!("lock {} 0", pids[0]),
                    format!("lock {} 0", pids[1]),
                    format!("checkpoint {} 0", pids[0]),
                    format!("checkpoint {} 0", pids[1]),
                ]
            );
            held.keep_checkpointed();
            let images = node.images("dump");
            criu_dump(w.root, &images).unwrap();
            w.reap_after_dump();
            criu_restore(&images).unwrap();
            let report = session.restore(&pids, Some(&recorded)).unwrap();
            assert_eq!(report.processes.len(), 2);
            w.assert_keeps_verifying();
        },
    );
}

#[test]
fn checkpoint_failure_in_one_process_rolls_back_both() {
    on_node(
        "checkpoint_failure_in_one_process_rolls_back_both",
        Some(GPU_A),
        |node| {
            let w = Workload::start(node, 64, 1);
            let pids = w.pids();
            let session = load();
            node.set_faults(&format!("checkpoint fail=2 pid={}\n", pids[1]));
            let err = session.checkpoint(&pids, &options()).unwrap_err();
            assert_eq!(
                (err.phase(), err.driver_code()),
                (Phase::Checkpoint, Some(2))
            );
            assert!(
                err.to_string().contains("CUDA_ERROR_OUT_OF_MEMORY"),
                "{err}"
            );
            let rollback: Vec<String> = node
                .calls()
                .into_iter()
                .filter(|c| c.starts_with("restore ") || c.starts_with("unlock "))
                .collect();
            assert_eq!(
                rollback,
                [
                    format!("unlock {} 0", pids[1]),
                    format!("restore {} 0", pids[0]),
                    format!("unlock {} 0", pids[0]),
                ]
            );
            assert_eq!(
                states(&session, &w),
                [ProcessState::Running, ProcessState::Running]
            );
            assert_eq!(node.regions_on(GPU_A).len(), 2);
            w.assert_keeps_verifying();
        },
    );
}

#[test]
fn restore_remaps_to_another_gpu_and_refuses_incompatible_nodes() {
    on_node(
        "restore_remaps_to_another_gpu_and_refuses_incompatible_nodes",
        Some(GPU_A),
        |node| {
            let mut w = Workload::start(node, 128, 0);
            let session = load();
            let recorded = session.fingerprint().unwrap();
            session
                .checkpoint(&w.pids(), &options())
                .unwrap()
                .keep_checkpointed();
            let images = node.images("dump");
            criu_dump(w.root, &images).unwrap();
            w.reap_after_dump();

            node.set_devices(&[(GPU_B, 16384, "Other Fake GPU")]);
            let err = load().check_restore(&recorded).unwrap_err();
            assert!(matches!(err, CudaError::Incompatible { .. }), "{err:?}");
            assert!(err.to_string().contains(MODEL), "{err}");

            node.set_devices(&[(GPU_B, 16384, MODEL)]);
            node.set_driver_version(12080);
            let err = load().check_restore(&recorded).unwrap_err();
            assert!(err.to_string().contains("older than 13000"), "{err}");

            node.set_driver_version(13000);
            let target = load();
            assert!(
                target.check_restore(&recorded).unwrap(),
                "a remap is planned"
            );
            criu_restore(&images).unwrap();
            let report = target.restore(&w.pids(), Some(&recorded)).unwrap();
            assert!(report.remapped);
            assert_eq!(node.regions_on(GPU_B).len(), 1, "VRAM now lives on GPU B");
            assert!(node.regions_on(GPU_A).is_empty());
            w.assert_keeps_verifying();
        },
    );
}

#[test]
fn insufficient_host_ram_is_refused_before_locking() {
    on_node(
        "insufficient_host_ram_is_refused_before_locking",
        Some(GPU_A),
        |node| {
            let w = Workload::start(node, 128, 0);
            let session = load();
            let available = kybernate_cuda::available_memory().unwrap();
            let opts = CheckpointOptions {
                host_ram_margin: available,
                ..options()
            };
            let err = session.checkpoint(&w.pids(), &opts).unwrap_err();
            let CudaError::InsufficientHostMemory { gpu_bytes, .. } = err else {
                panic!("expected InsufficientHostMemory, got {err:?}");
            };
            assert_eq!(gpu_bytes, 128 * MIB, "GPU memory of the process, from NVML");
            assert!(!node.calls().iter().any(|c| c.starts_with("lock ")));
            assert_eq!(states(&session, &w), [ProcessState::Running]);
            w.assert_keeps_verifying();
        },
    );
}

#[test]
fn node_without_libcuda_checkpoints_cpu_only_workloads() {
    on_node(
        "node_without_libcuda_checkpoints_cpu_only_workloads",
        None,
        |node| {
            let session = CudaSession::load().expect("loading without a driver");
            assert!(session.is_cpu_only());
            assert!(session.fingerprint().is_none());

            let mut w = Workload::start_cpu(node, 64);
            let held = session.checkpoint(&w.pids(), &options()).unwrap();
            assert!(held.pids().is_empty());
            held.keep_checkpointed();
            let images = node.images("dump");
            criu_dump(w.root, &images).unwrap();
            w.reap_after_dump();
            criu_restore(&images).unwrap();
            assert!(session
                .restore(&w.pids(), None)
                .unwrap()
                .processes
                .is_empty());
            w.assert_keeps_verifying();
        },
    );
}
