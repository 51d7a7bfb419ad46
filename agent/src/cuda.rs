//! The CUDA session actor: the driver's checkpoint API, before CRIU on checkpoint and after
//! CRIU on restore, for every CUDA process of a workload.
//!
//! Driver calls block (a lock waits up to its timeout), so the actor runs on a thread of its
//! own. It holds each workload's locked-and-checkpointed processes until the checkpoint flow
//! says, after CRIU, whether they stay checkpointed or run again. If the agent stops first,
//! dropping them rolls them back: no process is left locked.

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;
use kybernate_cuda::{
    CheckpointMode, CheckpointOptions, Checkpointed, CudaSession, GatePolicy, GpuFingerprint,
    PhaseTimings, RecordedGpu, RestoreReport,
};

/// The CUDA phase failed.
#[derive(Debug, thiserror::Error)]
pub enum CudaPhaseError {
    /// The driver refused or failed; everything touched was rolled back.
    #[error(transparent)]
    Driver(#[from] kybernate_cuda::CudaError),
    /// A process uses CUDA but this node has no usable driver to checkpoint it with.
    #[error("process {pid} has {library} mapped, but this node has no usable CUDA driver, so its GPU state cannot be checkpointed")]
    NoDriverSession {
        /// The CUDA process.
        pid: i32,
        /// The mapped driver library.
        library: String,
    },
    /// The flow asked to finish a CUDA checkpoint the actor does not hold.
    #[error("no CUDA checkpoint of {0} is being held")]
    NotHeld(String),
}

impl CudaPhaseError {
    /// Label for failure metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            CudaPhaseError::Driver(e) => e.metric_label(),
            CudaPhaseError::NoDriverSession { .. } => "cuda_no_driver",
            CudaPhaseError::NotHeld(_) => "internal",
        }
    }
}

/// Lock and checkpoint every CUDA process among `pids`, held under `name`.
#[derive(Debug, Message)]
#[rtype(result = "Result<CudaHeld, CudaPhaseError>")]
pub struct LockAndCheckpoint {
    /// Checkpoint the hold belongs to.
    pub name: String,
    /// Every PID of the workload.
    pub pids: Vec<i32>,
    /// Timeout of each process's lock.
    pub lock_timeout: Duration,
}

/// What a CUDA checkpoint holds.
#[derive(Debug, Clone)]
pub struct CudaHeld {
    /// The CUDA processes (empty for a CPU-only workload).
    pub cuda_pids: Vec<u32>,
    /// The node's GPUs, to record in the checkpoint.
    pub fingerprint: Option<GpuFingerprint>,
    /// Lock and checkpoint durations.
    pub timings: PhaseTimings,
}

/// Finish the hold of `name` after CRIU: keep the processes checkpointed (the workload
/// stops) or restore and unlock them (leave-running, or CRIU failed).
#[derive(Debug, Message)]
#[rtype(result = "Result<PhaseTimings, CudaPhaseError>")]
pub struct Release {
    /// Checkpoint the hold belongs to.
    pub name: String,
    /// Keep the processes checkpointed.
    pub keep_checkpointed: bool,
}

/// Before CRIU restore: can this node restore a checkpoint taken on `recorded`?
/// Answers whether GPUs will be remapped.
#[derive(Debug, Message)]
#[rtype(result = "Result<bool, CudaPhaseError>")]
pub struct CheckRestore {
    /// The fingerprint recorded at checkpoint time.
    pub recorded: GpuFingerprint,
}

/// After CRIU restore: restore and unlock the CUDA processes among `pids`.
#[derive(Debug, Message)]
#[rtype(result = "Result<RestoreReport, CudaPhaseError>")]
pub struct RestoreAndUnlock {
    /// Every PID of the restored workload.
    pub pids: Vec<i32>,
    /// The fingerprint recorded at checkpoint time.
    pub recorded: Option<GpuFingerprint>,
}

/// The CUDA session actor.
#[derive(Debug)]
pub struct CudaActor {
    session: CudaSession,
    held: HashMap<String, Checkpointed>,
}

impl CudaActor {
    /// Starts the actor on its own thread around a session loaded once at agent start.
    pub fn start(session: CudaSession) -> Addr<Self> {
        SyncArbiter::start(1, move || Self {
            session: session.clone(),
            held: HashMap::new(),
        })
    }
}

impl Actor for CudaActor {
    type Context = SyncContext<Self>;
}

fn pids_u32(pids: &[i32]) -> Vec<u32> {
    pids.iter().filter_map(|p| u32::try_from(*p).ok()).collect()
}

impl Handler<LockAndCheckpoint> for CudaActor {
    type Result = Result<CudaHeld, CudaPhaseError>;

    fn handle(&mut self, msg: LockAndCheckpoint, _: &mut Self::Context) -> Self::Result {
        if self.session.is_cpu_only() {
            for &pid in &msg.pids {
                if let Some(library) = mapped_cuda_driver(pid) {
                    return Err(CudaPhaseError::NoDriverSession { pid, library });
                }
            }
        }
        let options = CheckpointOptions {
            lock_timeout: msg.lock_timeout,
            ..CheckpointOptions::default()
        };
        let held = self.session.checkpoint(&pids_u32(&msg.pids), &options)?;
        let answer = CudaHeld {
            cuda_pids: held.pids().to_vec(),
            fingerprint: held.fingerprint().cloned(),
            timings: held.timings(),
        };
        self.held.insert(msg.name, held);
        Ok(answer)
    }
}

impl Handler<Release> for CudaActor {
    type Result = Result<PhaseTimings, CudaPhaseError>;

    fn handle(&mut self, msg: Release, _: &mut Self::Context) -> Self::Result {
        let held = self
            .held
            .remove(&msg.name)
            .ok_or_else(|| CudaPhaseError::NotHeld(msg.name.clone()))?;
        if msg.keep_checkpointed {
            Ok(held.keep_checkpointed())
        } else {
            Ok(held.resume()?)
        }
    }
}

impl Handler<CheckRestore> for CudaActor {
    type Result = Result<bool, CudaPhaseError>;

    fn handle(&mut self, msg: CheckRestore, _: &mut Self::Context) -> Self::Result {
        // The restore gate names every fact of this node that does not fit, before
        // anything is locked or CRIU runs. Records hold the fingerprint only (classic
        // checkpoints, usage not recorded), so driver, GPU count, model and memory are
        // checked; free memory needs the recorded usage.
        let recorded = RecordedGpu {
            fingerprint: msg.recorded,
            driver_release: None,
            mode: CheckpointMode::Classic,
            used: Vec::new(),
        };
        let pairs = self.session.check_gate(&recorded, &GatePolicy::default())?;
        Ok(!pairs.is_empty())
    }
}

impl Handler<RestoreAndUnlock> for CudaActor {
    type Result = Result<RestoreReport, CudaPhaseError>;

    fn handle(&mut self, msg: RestoreAndUnlock, _: &mut Self::Context) -> Self::Result {
        Ok(self
            .session
            .restore(&pids_u32(&msg.pids), msg.recorded.as_ref())?)
    }
}

/// The CUDA driver library mapped into `pid`, if any.
pub fn mapped_cuda_driver(pid: i32) -> Option<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| {
            path.rsplit('/')
                .next()
                .is_some_and(|file| file.starts_with("libcuda.so"))
        })
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_rt::test]
    async fn cpu_only_node_skips_processes_without_cuda() {
        let me = i32::try_from(std::process::id()).unwrap();
        assert_eq!(mapped_cuda_driver(me), None);
        let cuda = CudaActor::start(CudaSession::cpu_only());
        let held = cuda
            .send(LockAndCheckpoint {
                name: "cp".into(),
                pids: vec![me],
                lock_timeout: Duration::from_secs(1),
            })
            .await
            .unwrap()
            .unwrap();
        assert!(held.cuda_pids.is_empty());
        assert_eq!(held.fingerprint, None);
        cuda.send(Release {
            name: "cp".into(),
            keep_checkpointed: true,
        })
        .await
        .unwrap()
        .unwrap();
        let err = cuda
            .send(Release {
                name: "cp".into(),
                keep_checkpointed: true,
            })
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(err.to_string(), "no CUDA checkpoint of cp is being held");
    }
}
