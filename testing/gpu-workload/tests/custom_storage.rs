//! Custom-storage checkpoints (CUDA 13.4, driver 615) against the fake driver and real
//! CRIU 4.2: VRAM goes from the driver's mappings into a VRAM store, never through the
//! target's memory; every failure rolls back; the restore gate refuses what does not
//! fit before anything is locked. Needs root and `criu` on PATH; each test runs in its
//! own process on its own fake node (see `kybernate_gpu_workload::harness`).

use kybernate_cuda::{
    CheckpointMode, CheckpointOptions, CudaDriver, CudaError, CudaSession, CustomCheckpointOptions,
    CustomStorageSetting, DirVramStore, GatePolicy, LibCuda, Phase, ProcessState, VramStore,
};
use kybernate_gpu_workload::harness::{
    criu_dump, criu_restore, on_node, wait_gone, Node, Workload, GPU_A, GPU_B, MODEL,
};
use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1024 * 1024;
/// Driver API and release with custom storage.
const CUSTOM_DRIVER: i32 = 13040;
const CUSTOM_RELEASE: &str = "615.20.04";

/// Two GPUs of 16 GiB and a driver that offers custom storage.
fn custom_node(node: &Node) {
    node.set_devices(&[(GPU_A, 16384, MODEL), (GPU_B, 16384, MODEL)]);
    node.set_driver_version(CUSTOM_DRIVER);
    node.set_driver_release(CUSTOM_RELEASE);
}

fn load(setting: CustomStorageSetting) -> CudaSession {
    let session = CudaSession::load_with(setting).expect("loading the fake driver");
    assert!(
        !session.is_cpu_only(),
        "the fake libcuda.so.1 was not found"
    );
    session
}

fn options() -> CustomCheckpointOptions {
    CustomCheckpointOptions {
        lock_timeout: Duration::from_secs(5),
        chunk_size: 4 * MIB,
    }
}

fn store(node: &Node, name: &str) -> Arc<DirVramStore> {
    Arc::new(DirVramStore::create(node.dir.join("vram-store").join(name)).unwrap())
}

fn image_pages(images: &Path) -> u64 {
    fs::read_dir(images)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("pages-"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

fn states(session: &CudaSession, pids: &[u32]) -> Vec<ProcessState> {
    session
        .cuda_processes(pids)
        .into_iter()
        .map(|(_, s)| s)
        .collect()
}

/// Resident host memory of `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kib * 1024
}

#[test]
fn two_processes_on_two_gpus_round_trip_through_custom_storage() {
    on_node(
        "two_processes_on_two_gpus_round_trip_through_custom_storage",
        Some(GPU_A),
        |node| {
            custom_node(node);
            let mut a = Workload::start_on(node, 256, 0);
            let mut b = Workload::start_on(node, 256, 1);
            let session = load(CustomStorageSetting::Auto);
            assert_eq!(session.mode().mode, CheckpointMode::CustomStorage);
            let pids = [a.pids(), b.pids()].concat();
            let recorded = session
                .record(&pids, CheckpointMode::CustomStorage)
                .unwrap();
            assert_eq!(recorded.used, vec![256 * MIB, 256 * MIB]);
            assert_eq!(recorded.driver_release.as_deref(), Some(CUSTOM_RELEASE));
            let vram = store(node, "ckpt");

            let held = session
                .checkpoint_custom(&pids, &options(), vram.clone())
                .unwrap();
            assert_eq!(held.mode(), CheckpointMode::CustomStorage);
            assert_eq!(held.vram_bytes(), 512 * MIB);
            assert!(node.regions_on(GPU_A).is_empty() && node.regions_on(GPU_B).is_empty());
            assert_eq!(
                states(&session, &pids),
                [ProcessState::Checkpointed, ProcessState::Checkpointed]
            );
            let images = held.vram_images().to_vec();
            assert!(images.iter().all(|i| i.stored_bytes() == 256 * MIB));
            held.keep_checkpointed();

            let (dump_a, dump_b) = (node.images("a"), node.images("b"));
            criu_dump(a.root, &dump_a).unwrap();
            criu_dump(b.root, &dump_b).unwrap();
            for dump in [&dump_a, &dump_b] {
                assert!(
                    image_pages(dump) < 64 * MIB,
                    "CRIU's images hold host state only ({} bytes of pages)",
                    image_pages(dump)
                );
            }
            a.reap_after_dump();
            b.reap_after_dump();
            criu_restore(&dump_a).unwrap();
            criu_restore(&dump_b).unwrap();

            let gate = session
                .check_gate(&recorded, &GatePolicy::default())
                .unwrap();
            assert!(gate.is_empty(), "same GPUs: no remapping");
            let report = session
                .restore_custom(&pids, Some(&recorded.fingerprint), &images, vram.as_ref())
                .unwrap();
            assert_eq!(report.processes.len(), 2);
            assert_eq!(node.regions_on(GPU_A).len(), 1);
            assert_eq!(node.regions_on(GPU_B).len(), 1);
            assert_eq!(
                states(&session, &pids),
                [ProcessState::Running, ProcessState::Running]
            );
            a.assert_keeps_verifying();
            b.assert_keeps_verifying();
        },
    );
}

#[test]
fn custom_storage_keeps_vram_out_of_the_target_and_classic_does_not() {
    on_node(
        "custom_storage_keeps_vram_out_of_the_target_and_classic_does_not",
        Some(GPU_A),
        |node| {
            custom_node(node);
            let w = Workload::start(node, 256, 0);
            let session = load(CustomStorageSetting::On);
            let pid = w.root;

            let before = rss(pid);
            let held = session
                .checkpoint_custom(&w.pids(), &options(), store(node, "rss"))
                .unwrap();
            let custom_growth = rss(pid).saturating_sub(before);
            held.resume().unwrap();
            w.assert_keeps_verifying();

            let before = rss(pid);
            let classic = CheckpointOptions {
                lock_timeout: Duration::from_secs(5),
                host_ram_margin: 64 * MIB,
            };
            let held = session.checkpoint(&w.pids(), &classic).unwrap();
            let classic_growth = rss(pid).saturating_sub(before);
            held.resume().unwrap();
            eprintln!(
                "target RSS growth: custom storage {} MiB, classic {} MiB",
                custom_growth / MIB,
                classic_growth / MIB
            );
            assert!(custom_growth < 32 * MIB, "custom: {custom_growth}");
            assert!(classic_growth >= 200 * MIB, "classic: {classic_growth}");
            w.assert_keeps_verifying();
        },
    );
}

/// A checkpoint with `fault` injected fails, names `phase`, and leaves the workload
/// running, unlocked, with its VRAM intact.
fn checkpoint_fails_and_rolls_back(node: &Node, fault: &str, phase: Phase) {
    let w = Workload::start(node, 64, 0);
    let session = load(CustomStorageSetting::On);
    node.set_faults(fault);
    let err = session
        .checkpoint_custom(&w.pids(), &options(), store(node, "fault"))
        .unwrap_err();
    node.set_faults("");
    eprintln!("{fault:?} → {err}");
    assert_eq!(err.phase(), phase, "{fault:?}: {err}");
    assert!(
        !matches!(err, CudaError::RollbackIncomplete { .. }),
        "{fault:?}: {err}"
    );
    assert_eq!(
        states(&session, &w.pids()),
        [ProcessState::Running],
        "{fault:?}"
    );
    assert_eq!(
        node.regions_on(GPU_A).len(),
        1,
        "{fault:?}: VRAM back on the GPU"
    );
    w.assert_keeps_verifying();
}

#[test]
fn failure_at_each_checkpoint_call_rolls_back() {
    on_node(
        "failure_at_each_checkpoint_call_rolls_back",
        Some(GPU_A),
        |node| {
            custom_node(node);
            for (fault, phase) in [
                ("lock fail=999\n", Phase::Lock),
                ("checkpoint_custom fail=2\n", Phase::Checkpoint),
                ("copy fail=700 nth=3\n", Phase::Copy),
                ("complete fail=999\n", Phase::Complete),
            ] {
                checkpoint_fails_and_rolls_back(node, fault, phase);
            }
        },
    );
}

/// A store that fails after `ok` chunks: storage breaks in the middle of a checkpoint.
#[derive(Debug)]
struct FailingStore {
    inner: DirVramStore,
    ok: std::sync::atomic::AtomicU32,
}

impl VramStore for FailingStore {
    fn put(&self, key: &kybernate_cuda::VramKey, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        let left = self.ok.load(std::sync::atomic::Ordering::SeqCst);
        if left == 0 {
            return Err(std::io::Error::other("disk full (injected)"));
        }
        self.ok.store(left - 1, std::sync::atomic::Ordering::SeqCst);
        self.inner.put(key, offset, bytes)
    }

    fn get(
        &self,
        key: &kybernate_cuda::VramKey,
        offset: u64,
        buf: &mut [u8],
    ) -> std::io::Result<()> {
        self.inner.get(key, offset, buf)
    }
}

#[test]
fn storage_failure_mid_copy_gives_the_vram_back() {
    on_node(
        "storage_failure_mid_copy_gives_the_vram_back",
        Some(GPU_A),
        |node| {
            custom_node(node);
            let a = Workload::start_on(node, 64, 0);
            let b = Workload::start_on(node, 64, 1);
            let session = load(CustomStorageSetting::On);
            let pids = [a.pids(), b.pids()].concat();
            let failing = Arc::new(FailingStore {
                inner: DirVramStore::create(node.dir.join("vram-store").join("failing")).unwrap(),
                ok: std::sync::atomic::AtomicU32::new(20),
            });
            let err = session
                .checkpoint_custom(&pids, &options(), failing)
                .unwrap_err();
            eprintln!("{err}");
            assert!(err.to_string().contains("disk full"), "{err}");
            assert_eq!(
                states(&session, &pids),
                [ProcessState::Running, ProcessState::Running]
            );
            a.assert_keeps_verifying();
            b.assert_keeps_verifying();
        },
    );
}

#[test]
fn unpinnable_buffers_fall_back_to_pageable_copies() {
    on_node(
        "unpinnable_buffers_fall_back_to_pageable_copies",
        Some(GPU_A),
        |node| {
            custom_node(node);
            let mut w = Workload::start(node, 64, 0);
            let session = load(CustomStorageSetting::On);
            let recorded = session
                .record(&w.pids(), CheckpointMode::CustomStorage)
                .unwrap();
            let vram = store(node, "pageable");
            node.set_faults("host_register fail=2\n");
            let held = session
                .checkpoint_custom(&w.pids(), &options(), vram.clone())
                .unwrap();
            let images = held.vram_images().to_vec();
            held.keep_checkpointed();
            let dump = node.images("dump");
            criu_dump(w.root, &dump).unwrap();
            w.reap_after_dump();
            criu_restore(&dump).unwrap();
            session
                .restore_custom(
                    &w.pids(),
                    Some(&recorded.fingerprint),
                    &images,
                    vram.as_ref(),
                )
                .unwrap();
            node.set_faults("");
            w.assert_keeps_verifying();
        },
    );
}

#[test]
fn complete_hang_blocks_until_lifted_then_finishes() {
    on_node(
        "complete_hang_blocks_until_lifted_then_finishes",
        Some(GPU_A),
        |node| {
            custom_node(node);
            let w = Workload::start(node, 64, 0);
            let session = load(CustomStorageSetting::On);
            node.set_faults("complete hang\n");
            let lifter = {
                let faults = node.dir.join("faults");
                let log = node.dir.join("calls.log");
                std::thread::spawn(move || {
                    // The copy is done once the checkpoint call was answered.
                    while !fs::read_to_string(&log)
                        .unwrap_or_default()
                        .contains("checkpoint_custom")
                    {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                    fs::write(faults, "").unwrap();
                })
            };
            let held = session
                .checkpoint_custom(&w.pids(), &options(), store(node, "hang"))
                .unwrap();
            lifter.join().unwrap();
            held.resume().unwrap();
            assert_eq!(states(&session, &w.pids()), [ProcessState::Running]);
            w.assert_keeps_verifying();
        },
    );
}

#[test]
fn misuse_of_the_operation_gets_real_error_codes() {
    on_node(
        "misuse_of_the_operation_gets_real_error_codes",
        Some(GPU_A),
        |node| {
            custom_node(node);
            let w = Workload::start(node, 16, 0);
            let driver = LibCuda::load().unwrap().expect("the fake driver");
            let pid = w.root;
            driver.lock(pid, Duration::from_secs(5)).unwrap();
            let op = driver.checkpoint_custom(pid).unwrap();
            assert_eq!(op.gpus.len(), 1);
            let gpu = op.gpus[0];
            assert_eq!(gpu.size, 16 * MIB);
            let mut saved = vec![0u8; usize::try_from(gpu.size).unwrap()];
            // SAFETY: `saved` outlives the synchronisation below.
            unsafe { driver.copy_from_gpu(&mut saved, gpu.ptr, gpu.stream) }.unwrap();
            driver.synchronize(gpu.stream).unwrap();
            assert!(
                saved.iter().any(|&b| b != 0),
                "the workload's pattern was copied"
            );
            let code = |r: Result<(), kybernate_cuda::DriverCallError>| r.unwrap_err().code;
            // A copy past the end of the mapping.
            let mut one = [0u8; 1];
            // SAFETY: `one` outlives the call; the driver refuses before copying.
            let past = unsafe { driver.copy_from_gpu(&mut one, gpu.ptr + gpu.size, gpu.stream) };
            assert_eq!(code(past), 1, "CUDA_ERROR_INVALID_VALUE");
            assert_eq!(
                code(driver.complete(op.handle ^ 0xff0)),
                400,
                "wrong handle"
            );
            driver.complete(op.handle).unwrap();
            assert_eq!(code(driver.complete(op.handle)), 400, "completed twice");
            // SAFETY: as above.
            let late = unsafe { driver.copy_from_gpu(&mut one, gpu.ptr, gpu.stream) };
            assert_eq!(code(late), 1, "copy after complete: the mapping is gone");
            assert_eq!(
                code(driver.synchronize(gpu.stream)),
                400,
                "its stream is gone"
            );
            assert_eq!(
                driver.process_state(pid).unwrap(),
                ProcessState::Checkpointed
            );
            assert_eq!(
                code(driver.restore(pid, &[])),
                401,
                "classic restore of custom storage"
            );

            let back = driver.restore_custom(pid, &[]).unwrap();
            let gpu = back.gpus[0];
            // SAFETY: `saved` outlives the synchronisation by complete.
            unsafe { driver.copy_to_gpu(gpu.ptr, &saved, gpu.stream) }.unwrap();
            driver.complete(back.handle).unwrap();
            assert_eq!(driver.process_state(pid).unwrap(), ProcessState::Locked);
            driver.unlock(pid).unwrap();
            w.assert_keeps_verifying();
        },
    );
}

#[test]
fn restore_failure_leaves_the_checkpoint_for_another_try() {
    on_node(
        "restore_failure_leaves_the_checkpoint_for_another_try",
        Some(GPU_A),
        |node| {
            custom_node(node);
            let mut w = Workload::start(node, 64, 0);
            let session = load(CustomStorageSetting::On);
            let recorded = session
                .record(&w.pids(), CheckpointMode::CustomStorage)
                .unwrap();
            let vram = store(node, "retry");
            let held = session
                .checkpoint_custom(&w.pids(), &options(), vram.clone())
                .unwrap();
            let images = held.vram_images().to_vec();
            held.keep_checkpointed();
            let dump = node.images("dump");
            criu_dump(w.root, &dump).unwrap();
            w.reap_after_dump();

            criu_restore(&dump).unwrap();
            let err = session
                .restore_custom(&w.pids(), Some(&recorded.fingerprint), &[], vram.as_ref())
                .unwrap_err();
            assert!(err.to_string().contains("classic"), "{err}");
            assert_eq!(
                states(&session, &w.pids()),
                [ProcessState::Checkpointed],
                "untouched"
            );
            for &pid in &w.pids() {
                // SAFETY: kill has no memory preconditions; the pid is the test's.
                unsafe { libc::kill(i32::try_from(pid).unwrap(), libc::SIGKILL) };
            }
            wait_gone(&w.pids());

            for fault in [
                "restore_custom fail=2\n",
                "copy fail=700 nth=2\n",
                "complete fail=999\n",
            ] {
                criu_restore(&dump).unwrap();
                node.set_faults(fault);
                let err = session
                    .restore_custom(
                        &w.pids(),
                        Some(&recorded.fingerprint),
                        &images,
                        vram.as_ref(),
                    )
                    .unwrap_err();
                node.set_faults("");
                eprintln!("{fault:?} → {err}");
                // The restored process has no usable VRAM: it is ended, as the agent does.
                for &pid in &w.pids() {
                    // SAFETY: kill has no memory preconditions; the pid is the test's.
                    unsafe { libc::kill(i32::try_from(pid).unwrap(), libc::SIGKILL) };
                }
                wait_gone(&w.pids());
            }
            criu_restore(&dump).unwrap();
            session
                .restore_custom(
                    &w.pids(),
                    Some(&recorded.fingerprint),
                    &images,
                    vram.as_ref(),
                )
                .unwrap();
            assert_eq!(states(&session, &w.pids()), [ProcessState::Running]);
            w.assert_keeps_verifying();
        },
    );
}

#[test]
fn probe_chooses_classic_on_an_older_driver_and_refuses_on() {
    on_node(
        "probe_chooses_classic_on_an_older_driver_and_refuses_on",
        Some(GPU_A),
        |node| {
            node.set_driver_version(13000);
            let auto = load(CustomStorageSetting::Auto);
            assert_eq!(auto.mode().mode, CheckpointMode::Classic);
            assert!(
                auto.mode().reason.contains("older than 13040"),
                "{}",
                auto.mode().reason
            );
            let err = CudaSession::load_with(CustomStorageSetting::On).unwrap_err();
            assert!(err.to_string().contains("older than 13040"), "{err}");
            assert_eq!(err.phase(), Phase::Load);
            node.set_driver_version(CUSTOM_DRIVER);
            let off = load(CustomStorageSetting::Off);
            assert_eq!(off.mode().mode, CheckpointMode::Classic);
            assert!(off.require_mode(CheckpointMode::CustomStorage).is_err());
        },
    );
}

#[test]
fn gate_refuses_each_failing_fact_and_locks_nothing() {
    on_node(
        "gate_refuses_each_failing_fact_and_locks_nothing",
        Some(GPU_A),
        |node| {
            custom_node(node);
            let a = Workload::start_on(node, 64, 0);
            let b = Workload::start_on(node, 64, 1);
            let pids = [a.pids(), b.pids()].concat();
            let session = load(CustomStorageSetting::On);
            let recorded = session
                .record(&pids, CheckpointMode::CustomStorage)
                .unwrap();
            assert_eq!(recorded.used, vec![64 * MIB, 64 * MIB]);
            let policy = GatePolicy {
                free_margin: 64 * MIB,
                ..GatePolicy::default()
            };
            let refused = |session: &CudaSession, fact: &str| {
                let calls = node.calls().len();
                match session.check_gate(&recorded, &policy) {
                    Err(CudaError::Refused { reasons }) => {
                        eprintln!("{fact}: {reasons:?}");
                        assert!(
                            reasons.iter().any(|r| r.starts_with(fact)),
                            "{fact}: {reasons:?}"
                        );
                    }
                    other => panic!("{fact}: expected a refusal, got {other:?}"),
                }
                assert_eq!(
                    node.calls().len(),
                    calls,
                    "{fact}: nothing was locked or restored"
                );
            };
            assert!(session.check_gate(&recorded, &policy).is_ok());

            node.set_driver_release("615.10.01");
            refused(&session, "driver");
            node.set_driver_release("580.82.07");
            refused(&session, "driver");
            node.set_driver_release(CUSTOM_RELEASE);

            // 100 MiB left on GPU A, of which the workload holds 64: 36 free < 64 + 64.
            node.set_occupied(&[(GPU_A, 16384 - 100)]);
            refused(&session, "free GPU memory");
            node.set_occupied(&[]);

            refused(&load(CustomStorageSetting::Off), "checkpoint mode");

            node.set_devices(&[(GPU_A, 16384, MODEL)]);
            refused(&load(CustomStorageSetting::On), "GPU count");
            node.set_devices(&[(GPU_A, 16384, "Another GPU"), (GPU_B, 16384, "Another GPU")]);
            refused(&load(CustomStorageSetting::On), "GPU model");
            node.set_devices(&[(GPU_A, 8192, MODEL), (GPU_B, 8192, MODEL)]);
            refused(&load(CustomStorageSetting::On), "GPU memory");

            custom_node(node);
            assert_eq!(
                states(&session, &pids),
                [ProcessState::Running, ProcessState::Running]
            );
            a.assert_keeps_verifying();
            b.assert_keeps_verifying();
        },
    );
}

#[test]
fn custom_restore_onto_another_gpu_remaps_it() {
    on_node(
        "custom_restore_onto_another_gpu_remaps_it",
        Some(GPU_A),
        |node| {
            custom_node(node);
            let mut w = Workload::start_on(node, 64, 0);
            let session = load(CustomStorageSetting::On);
            let recorded = session
                .record(&w.pids(), CheckpointMode::CustomStorage)
                .unwrap();
            let vram = store(node, "remap");
            let held = session
                .checkpoint_custom(&w.pids(), &options(), vram.clone())
                .unwrap();
            let images = held.vram_images().to_vec();
            held.keep_checkpointed();
            let dump = node.images("dump");
            criu_dump(w.root, &dump).unwrap();
            w.reap_after_dump();

            // "Another node": only GPU B, of the same model.
            node.set_devices(&[(GPU_B, 16384, MODEL)]);
            let target = load(CustomStorageSetting::On);
            let pairs = target
                .check_gate(&recorded, &GatePolicy::default())
                .unwrap();
            assert_eq!(pairs.len(), 1);
            assert_eq!(pairs[0].new.to_string(), GPU_B);
            criu_restore(&dump).unwrap();
            let report = target
                .restore_custom(
                    &w.pids(),
                    Some(&recorded.fingerprint),
                    &images,
                    vram.as_ref(),
                )
                .unwrap();
            assert!(report.remapped);
            assert_eq!(node.regions_on(GPU_B).len(), 1, "the VRAM went to GPU B");
            assert!(node.regions_on(GPU_A).is_empty());
            w.assert_keeps_verifying();
        },
    );
}
