//! The session's ordering, rollback and refusal logic against a recording driver.

use kybernate_cuda::{
    CheckpointOptions, CudaDriver, CudaError, CudaSession, DriverCallError, GpuDevice,
    GpuFingerprint, GpuPair, GpuUuid, Phase, ProcessState,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A driver that records every call and keeps a state per pid.
#[derive(Debug, Default)]
struct Recorder {
    devices: Vec<GpuDevice>,
    version: i32,
    states: Mutex<HashMap<u32, ProcessState>>,
    calls: Mutex<Vec<String>>,
    /// `(op, pid)` → error code to return.
    failures: HashMap<(&'static str, u32), i32>,
}

impl Recorder {
    fn new(cuda_pids: &[u32]) -> Recorder {
        Recorder {
            devices: vec![gpu(1)],
            version: 13000,
            states: Mutex::new(
                cuda_pids
                    .iter()
                    .map(|&p| (p, ProcessState::Running))
                    .collect(),
            ),
            ..Recorder::default()
        }
    }

    fn failing(mut self, op: &'static str, pid: u32, code: i32) -> Recorder {
        self.failures.insert((op, pid), code);
        self
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn state(&self, pid: u32) -> ProcessState {
        self.states.lock().unwrap()[&pid]
    }

    fn step(
        &self,
        op: &'static str,
        pid: u32,
        from: ProcessState,
        to: ProcessState,
    ) -> Result<(), DriverCallError> {
        self.calls.lock().unwrap().push(format!("{op} {pid}"));
        if let Some(&code) = self.failures.get(&(op, pid)) {
            return Err(DriverCallError {
                code,
                name: format!("CUDA_ERROR_TEST_{code}"),
            });
        }
        let mut states = self.states.lock().unwrap();
        let state = states.get_mut(&pid).expect("call on a non-CUDA pid");
        assert_eq!(*state, from, "{op} {pid} in wrong state");
        *state = to;
        Ok(())
    }
}

fn gpu(byte: u8) -> GpuDevice {
    GpuDevice {
        uuid: GpuUuid([byte; 16]),
        name: "Fake GPU".into(),
        total_memory: 1 << 30,
    }
}

impl CudaDriver for Recorder {
    fn driver_version(&self) -> i32 {
        self.version
    }
    fn devices(&self) -> &[GpuDevice] {
        &self.devices
    }
    fn process_state(&self, pid: u32) -> Result<ProcessState, DriverCallError> {
        self.states
            .lock()
            .unwrap()
            .get(&pid)
            .copied()
            .ok_or(DriverCallError {
                code: 500,
                name: "CUDA_ERROR_NOT_FOUND".into(),
            })
    }
    fn restore_thread_id(&self, pid: u32) -> Result<u32, DriverCallError> {
        Ok(pid + 1)
    }
    fn lock(&self, pid: u32, _timeout: Duration) -> Result<(), DriverCallError> {
        self.step("lock", pid, ProcessState::Running, ProcessState::Locked)
    }
    fn checkpoint(&self, pid: u32) -> Result<(), DriverCallError> {
        self.step(
            "checkpoint",
            pid,
            ProcessState::Locked,
            ProcessState::Checkpointed,
        )
    }
    fn restore(&self, pid: u32, pairs: &[GpuPair]) -> Result<(), DriverCallError> {
        let op = if pairs.is_empty() {
            "restore"
        } else {
            "restore-remap"
        };
        self.step(op, pid, ProcessState::Checkpointed, ProcessState::Locked)
    }
    fn unlock(&self, pid: u32) -> Result<(), DriverCallError> {
        self.step("unlock", pid, ProcessState::Locked, ProcessState::Running)
    }
    fn gpu_memory_used(&self, _pid: u32) -> Result<u64, DriverCallError> {
        Ok(1 << 20)
    }
}

fn session(recorder: &Arc<Recorder>) -> CudaSession {
    CudaSession::with_driver(recorder.clone())
}

fn options() -> CheckpointOptions {
    CheckpointOptions {
        lock_timeout: Duration::from_secs(1),
        host_ram_margin: 0,
    }
}

#[test]
fn all_processes_are_locked_before_any_is_checkpointed() {
    let rec = Arc::new(Recorder::new(&[10, 20, 30]));
    let held = session(&rec)
        .checkpoint(&[10, 5, 20, 30], &options())
        .unwrap();
    assert_eq!(
        held.pids(),
        &[10, 20, 30],
        "pid 5 is no CUDA process and is skipped"
    );
    assert_eq!(
        rec.calls(),
        [
            "lock 10",
            "lock 20",
            "lock 30",
            "checkpoint 10",
            "checkpoint 20",
            "checkpoint 30"
        ]
    );
    held.keep_checkpointed();
    assert_eq!(
        rec.calls().len(),
        6,
        "keep_checkpointed makes no driver call"
    );
    assert_eq!(rec.state(20), ProcessState::Checkpointed);
}

#[test]
fn lock_timeout_unlocks_the_processes_already_locked() {
    let rec = Arc::new(Recorder::new(&[10, 20, 30]).failing("lock", 20, 909));
    let err = session(&rec)
        .checkpoint(&[10, 20, 30], &options())
        .unwrap_err();
    assert_eq!(err.phase(), Phase::Lock);
    assert_eq!(err.driver_code(), Some(909));
    assert!(err.to_string().contains("lock of pid 20"), "{err}");
    assert_eq!(rec.calls(), ["lock 10", "lock 20", "unlock 10"]);
    assert_eq!(rec.state(10), ProcessState::Running);
}

#[test]
fn checkpoint_failure_rolls_back_in_reverse_order() {
    let rec = Arc::new(Recorder::new(&[10, 20, 30]).failing("checkpoint", 20, 2));
    let err = session(&rec)
        .checkpoint(&[10, 20, 30], &options())
        .unwrap_err();
    assert_eq!(
        (err.phase(), err.driver_code()),
        (Phase::Checkpoint, Some(2))
    );
    assert_eq!(
        rec.calls()[5..],
        ["unlock 30", "unlock 20", "restore 10", "unlock 10"],
        "{:?}",
        rec.calls()
    );
    for pid in [10, 20, 30] {
        assert_eq!(rec.state(pid), ProcessState::Running);
    }
}

#[test]
fn failed_rollback_is_reported_with_the_cause() {
    let rec = Arc::new(
        Recorder::new(&[10, 20])
            .failing("checkpoint", 20, 2)
            .failing("restore", 10, 999),
    );
    let err = session(&rec).checkpoint(&[10, 20], &options()).unwrap_err();
    let CudaError::RollbackIncomplete { cause, failures } = &err else {
        panic!("expected RollbackIncomplete, got {err:?}");
    };
    assert_eq!(cause.phase(), Phase::Checkpoint);
    assert_eq!(failures.len(), 1);
    assert!(failures[0].contains("restore of pid 10"), "{failures:?}");
}

#[test]
fn resume_and_drop_both_bring_every_process_back() {
    let rec = Arc::new(Recorder::new(&[10, 20]));
    let held = session(&rec).checkpoint(&[10, 20], &options()).unwrap();
    held.resume().unwrap();
    assert_eq!(
        rec.calls()[4..],
        ["restore 20", "unlock 20", "restore 10", "unlock 10"]
    );

    let rec = Arc::new(Recorder::new(&[10, 20]));
    drop(session(&rec).checkpoint(&[10, 20], &options()).unwrap());
    assert_eq!(rec.state(10), ProcessState::Running);
    assert_eq!(rec.state(20), ProcessState::Running);
}

#[test]
fn insufficient_host_ram_is_refused_before_locking() {
    let rec = Arc::new(Recorder::new(&[10]));
    let opts = CheckpointOptions {
        host_ram_margin: u64::MAX / 2,
        ..options()
    };
    let err = session(&rec).checkpoint(&[10], &opts).unwrap_err();
    assert!(
        matches!(
            err,
            CudaError::InsufficientHostMemory {
                gpu_bytes: 1_048_576,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(rec.calls().is_empty(), "{:?}", rec.calls());
}

#[test]
fn cpu_only_session_checkpoints_nothing_and_succeeds() {
    let session = CudaSession::cpu_only();
    let held = session.checkpoint(&[1, 2, 3], &options()).unwrap();
    assert!(held.pids().is_empty());
    assert!(held.fingerprint().is_none());
    held.resume().unwrap();
    assert!(session.restore(&[1], None).unwrap().processes.is_empty());
}

#[test]
fn restore_remaps_when_the_recorded_uuid_is_absent_and_unlocks_after() {
    let rec = Arc::new(Recorder::new(&[10, 20]));
    session(&rec)
        .checkpoint(&[10, 20], &options())
        .unwrap()
        .keep_checkpointed();
    let recorded = GpuFingerprint {
        driver_version: 13000,
        devices: vec![gpu(7)],
    };
    let report = session(&rec).restore(&[10, 20], Some(&recorded)).unwrap();
    assert!(report.remapped);
    assert_eq!(report.processes, [(10, 11), (20, 21)]);
    assert_eq!(
        rec.calls()[4..],
        [
            "restore-remap 10",
            "restore-remap 20",
            "unlock 10",
            "unlock 20"
        ]
    );
}

#[test]
fn restore_failure_still_unlocks_the_restored_processes() {
    let rec = Arc::new(Recorder::new(&[10, 20]).failing("restore", 20, 101));
    session(&rec)
        .checkpoint(&[10, 20], &options())
        .unwrap()
        .keep_checkpointed();
    let err = session(&rec).restore(&[10, 20], None).unwrap_err();
    assert_eq!(
        (err.phase(), err.driver_code()),
        (Phase::Restore, Some(101))
    );
    assert_eq!(rec.calls()[4..], ["restore 10", "restore 20", "unlock 10"]);
    assert_eq!(rec.state(10), ProcessState::Running);
}

#[test]
fn incompatible_fingerprint_is_refused_before_any_call() {
    let rec = Arc::new(Recorder::new(&[10]));
    let recorded = GpuFingerprint {
        driver_version: 13000,
        devices: vec![GpuDevice {
            name: "Other GPU".into(),
            ..gpu(1)
        }],
    };
    let err = session(&rec).check_restore(&recorded).unwrap_err();
    assert!(err.to_string().contains("model \"Other GPU\""), "{err}");
    assert!(session(&rec).restore(&[10], Some(&recorded)).is_err());
    assert!(rec.calls().is_empty());
}

#[test]
fn restore_unlocks_processes_left_locked_by_an_interrupted_restore() {
    let rec = Arc::new(Recorder::new(&[10, 20]));
    rec.states.lock().unwrap().insert(10, ProcessState::Locked);
    rec.states
        .lock()
        .unwrap()
        .insert(20, ProcessState::Checkpointed);
    let report = session(&rec).restore(&[10, 20], None).unwrap();
    assert_eq!(report.processes, [(20, 21)]);
    assert_eq!(rec.calls(), ["restore 20", "unlock 10", "unlock 20"]);
    assert_eq!(rec.state(10), ProcessState::Running);
}
