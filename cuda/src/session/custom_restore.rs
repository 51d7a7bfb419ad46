//! Restore with the driver's custom storage, after CRIU restored the processes: per
//! process (in parallel) map fresh VRAM, copy every GPU's memory back from the VRAM
//! store (each chunk checked against its hash first), complete; then unlock them all.

use super::{CudaSession, PhaseTimings, RestoreReport};
use crate::copier::copy_in;
use crate::driver::{CudaDriver, GpuPair, ProcessState};
use crate::error::{CudaError, Phase};
use crate::fingerprint::{plan_restore, GpuFingerprint};
use crate::vram::{VramImage, VramStore};
use crate::CopyFailure;
use std::time::Instant;

/// Restores one CHECKPOINTED process from `images` (its own, any order) in `store`:
/// restore with custom storage, copy every GPU in parallel, complete. The process is
/// LOCKED afterwards. When a copy fails the operation is not completed (completing
/// would run the process on incomplete memory); the caller ends the process.
pub(crate) fn restore_one(
    driver: &dyn CudaDriver,
    pid: u32,
    pairs: &[GpuPair],
    images: &[&VramImage],
    store: &dyn VramStore,
) -> Result<(), CudaError> {
    let op = driver
        .restore_custom(pid, pairs)
        .map_err(|source| CudaError::Driver {
            phase: Phase::Restore,
            pid,
            source,
        })?;
    let mut ordered: Vec<&VramImage> = images.to_vec();
    ordered.sort_by_key(|i| i.key.gpu);
    if ordered.len() != op.gpus.len() {
        let key = ordered
            .first()
            .map_or(crate::VramKey { pid, gpu: 0 }, |i| i.key);
        return Err(CudaError::Copy {
            key,
            source: CopyFailure::SizeMismatch {
                mapped: op.gpus.iter().map(|g| g.size).sum(),
                recorded: ordered.iter().map(|i| i.size).sum(),
            },
        });
    }
    std::thread::scope(|scope| {
        let copies: Vec<_> = op
            .gpus
            .iter()
            .zip(&ordered)
            .map(|(gpu, image)| {
                scope.spawn(move || {
                    copy_in(driver, gpu, image, store).map_err(|source| CudaError::Copy {
                        key: image.key,
                        source,
                    })
                })
            })
            .collect();
        copies
            .into_iter()
            .map(|c| c.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect::<Result<Vec<()>, CudaError>>()
    })?;
    driver
        .complete(op.handle)
        .map_err(|source| CudaError::Driver {
            phase: Phase::Complete,
            pid,
            source,
        })
}

impl CudaSession {
    /// After CRIU restore of a custom-storage checkpoint: every CUDA process among
    /// `pids` that is CHECKPOINTED gets its VRAM back from `store` (GPUs remapped when
    /// `recorded` names other UUIDs), then all are unlocked (also any found LOCKED).
    /// Processes are matched with `images` by pid. When one fails, the others still
    /// finish and are unlocked; the error names the process that failed, which the
    /// caller must end (its checkpoint stays intact for another try).
    pub fn restore_custom(
        &self,
        pids: &[u32],
        recorded: Option<&GpuFingerprint>,
        images: &[VramImage],
        store: &dyn VramStore,
    ) -> Result<RestoreReport, CudaError> {
        let pairs = match recorded {
            Some(rec) => plan_restore(rec, self.fingerprint().as_ref())?,
            None => Vec::new(),
        };
        let mut report = RestoreReport {
            processes: Vec::new(),
            remapped: !pairs.is_empty(),
            timings: PhaseTimings::default(),
        };
        let Some(driver) = self.driver.clone() else {
            return Ok(report);
        };
        let found = self.cuda_processes(pids);
        let without_images: Vec<u32> = found
            .iter()
            .filter(|(pid, state)| {
                *state == ProcessState::Checkpointed && !images.iter().any(|i| i.key.pid == *pid)
            })
            .map(|(pid, _)| *pid)
            .collect();
        if !without_images.is_empty() {
            return Err(CudaError::from(crate::mode::ModeUnavailable {
                mode: crate::CheckpointMode::CustomStorage,
                reason: format!(
                    "no VRAM images recorded for pid(s) {without_images:?}: a checkpoint made \
                     on the classic path is restored with the classic restore"
                ),
            }));
        }
        let started = Instant::now();
        let driver_ref = driver.as_ref();
        let pairs_ref = pairs.as_slice();
        let results: Vec<(u32, Result<u32, CudaError>)> = std::thread::scope(|scope| {
            let workers: Vec<_> = found
                .iter()
                .filter(|(_, state)| *state == ProcessState::Checkpointed)
                .map(|&(pid, _)| {
                    let mine: Vec<&VramImage> =
                        images.iter().filter(|i| i.key.pid == pid).collect();
                    let worker = scope.spawn(move || {
                        let tid = driver_ref.restore_thread_id(pid).map_err(|source| {
                            CudaError::Driver {
                                phase: Phase::RestoreThreadId,
                                pid,
                                source,
                            }
                        })?;
                        restore_one(driver_ref, pid, pairs_ref, &mine, store).map(|()| tid)
                    });
                    (pid, worker)
                })
                .collect();
            workers
                .into_iter()
                .map(|(pid, w)| {
                    (
                        pid,
                        w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
                    )
                })
                .collect()
        });
        report.timings.restore = started.elapsed();
        let mut failure = None;
        for (pid, result) in results {
            match result {
                Ok(tid) => report.processes.push((pid, tid)),
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        let started = Instant::now();
        let locked = found
            .iter()
            .filter(|(_, state)| *state == ProcessState::Locked)
            .map(|(pid, _)| *pid);
        let restored: Vec<u32> = report.processes.iter().map(|(pid, _)| *pid).collect();
        for pid in locked.chain(restored) {
            if let Err(source) = driver.unlock(pid) {
                failure.get_or_insert(CudaError::Driver {
                    phase: Phase::Unlock,
                    pid,
                    source,
                });
            }
        }
        report.timings.unlock = started.elapsed();
        match failure {
            None => {
                tracing::info!(
                    processes = report.processes.len(),
                    remapped = report.remapped,
                    restore_ms = report.timings.restore.as_millis(),
                    unlock_ms = report.timings.unlock.as_millis(),
                    "CUDA restore with custom storage done"
                );
                Ok(report)
            }
            Some(e) => Err(e),
        }
    }
}
