//! Checkpoint with the driver's custom storage: lock every process, then per process
//! (all in parallel) map its VRAM, copy every GPU's memory (in parallel, one stream
//! each) into the VRAM store, and complete. CRIU runs afterwards and dumps host state
//! only. A failure gives every process its VRAM back and unlocks it.

use crate::checkpointed::Checkpointed;
use crate::copier::copy_out;
use crate::custom_restore::restore_one;
use crate::driver::{CudaDriver, MappedOperation};
use crate::error::{CudaError, Phase};
use crate::session::{lock_all, CudaSession};
use crate::vram::{MemoryVramStore, VramImage, VramKey, VramStore};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Knobs of a custom-storage checkpoint.
#[derive(Clone, Copy, Debug)]
pub struct CustomCheckpointOptions {
    /// Timeout of each `cuCheckpointProcessLock`.
    pub lock_timeout: Duration,
    /// Bytes per copy; each GPU stream uses two pinned buffers of this size.
    pub chunk_size: u64,
}

impl Default for CustomCheckpointOptions {
    fn default() -> Self {
        CustomCheckpointOptions {
            lock_timeout: Duration::from_secs(10),
            chunk_size: 16 * 1024 * 1024,
        }
    }
}

/// Where one process ended up after its part of the checkpoint.
enum Outcome {
    /// Checkpointed; its VRAM is in the store.
    Saved(Vec<VramImage>),
    /// Still LOCKED with its VRAM on the GPU (checkpoint or completion failed).
    Locked(CudaError),
    /// Checkpointed, but its VRAM is only in the rescue copy.
    Rescued(CudaError, Vec<VramImage>, Arc<MemoryVramStore>),
    /// Its mapping could not be copied anywhere; the operation was left open.
    Stuck(CudaError),
}

/// Copies every GPU of `op` into `store`, GPUs in parallel.
fn copy_all(
    driver: &dyn CudaDriver,
    pid: u32,
    op: &MappedOperation,
    store: &dyn VramStore,
    chunk: u64,
) -> Result<Vec<VramImage>, CudaError> {
    std::thread::scope(|scope| {
        let copies: Vec<_> = op
            .gpus
            .iter()
            .enumerate()
            .map(|(index, gpu)| {
                let key = VramKey {
                    pid,
                    gpu: u32::try_from(index).unwrap_or(u32::MAX),
                };
                scope.spawn(move || {
                    copy_out(driver, gpu, key, store, chunk)
                        .map_err(|source| CudaError::Copy { key, source })
                })
            })
            .collect();
        copies
            .into_iter()
            .map(|c| c.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

fn complete(driver: &dyn CudaDriver, pid: u32, handle: u64) -> Result<(), CudaError> {
    driver.complete(handle).map_err(|source| CudaError::Driver {
        phase: Phase::Complete,
        pid,
        source,
    })
}

/// One process: checkpoint with custom storage, copy, complete.
fn save_one(driver: &dyn CudaDriver, pid: u32, store: &dyn VramStore, chunk: u64) -> Outcome {
    let op = match driver.checkpoint_custom(pid) {
        Ok(op) => op,
        Err(source) => {
            return Outcome::Locked(CudaError::Driver {
                phase: Phase::Checkpoint,
                pid,
                source,
            })
        }
    };
    match copy_all(driver, pid, &op, store, chunk) {
        Ok(images) => match complete(driver, pid, op.handle) {
            Ok(()) => Outcome::Saved(images),
            Err(e) => Outcome::Locked(e),
        },
        Err(cause) => {
            // The mapping is still valid: keep a copy here so that completing (which
            // releases the GPU memory) loses nothing, then give it back on rollback.
            tracing::warn!(pid, error = %cause, "VRAM copy failed; taking a rescue copy");
            let rescue = Arc::new(MemoryVramStore::default());
            match copy_all(driver, pid, &op, rescue.as_ref(), chunk) {
                Ok(images) => match complete(driver, pid, op.handle) {
                    Ok(()) => Outcome::Rescued(cause, images, rescue),
                    Err(_) => Outcome::Locked(cause),
                },
                Err(again) => Outcome::Stuck(CudaError::RollbackIncomplete {
                    cause: Box::new(cause),
                    failures: vec![format!(
                        "the rescue copy failed too ({again}); pid {pid}'s checkpoint \
                         operation stays open and its VRAM mapped"
                    )],
                }),
            }
        }
    }
}

/// Gives `pid` its VRAM back (when checkpointed) and unlocks it; failures are returned.
fn roll_back_one(
    driver: &dyn CudaDriver,
    pid: u32,
    saved: Option<(&[VramImage], &dyn VramStore)>,
) -> Vec<String> {
    let mut failures = Vec::new();
    if let Some((images, store)) = saved {
        let images: Vec<&VramImage> = images.iter().collect();
        if let Err(e) = restore_one(driver, pid, &[], &images, store) {
            failures.push(e.to_string());
            return failures;
        }
    }
    if let Err(source) = driver.unlock(pid) {
        failures.push(
            CudaError::Driver {
                phase: Phase::Unlock,
                pid,
                source,
            }
            .to_string(),
        );
    }
    failures
}

impl CudaSession {
    /// Locks all CUDA processes among `pids`, then checkpoints them with custom
    /// storage: their VRAM goes into `store`, never into their own memory, so no host
    /// RAM pre-flight is needed. On success the guard (as for
    /// [`CudaSession::checkpoint`]) carries the [`VramImage`]s to record; resuming or
    /// dropping it restores the VRAM from `store`. On failure every process gets its
    /// VRAM back and is unlocked, and the first error is returned.
    pub fn checkpoint_custom(
        &self,
        pids: &[u32],
        options: &CustomCheckpointOptions,
        store: Arc<dyn VramStore>,
    ) -> Result<Checkpointed, CudaError> {
        let mut guard = Checkpointed::new(self.driver.clone(), self.fingerprint());
        guard.hold_custom(Arc::clone(&store));
        let Some(driver) = self.driver.clone() else {
            tracing::info!("CPU-only node: no CUDA checkpoint");
            return Ok(guard);
        };
        let targets = self.running_targets(pids, &mut guard)?;
        lock_all(driver.as_ref(), &targets, options.lock_timeout, &mut guard)?;
        let started = Instant::now();
        let outcomes: Vec<(u32, Outcome)> = std::thread::scope(|scope| {
            let workers: Vec<_> = targets
                .iter()
                .map(|&pid| {
                    let (driver, store) = (driver.as_ref(), store.as_ref());
                    let chunk = options.chunk_size;
                    (
                        pid,
                        scope.spawn(move || save_one(driver, pid, store, chunk)),
                    )
                })
                .collect();
            workers
                .into_iter()
                .map(|(pid, w)| {
                    let outcome = w.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
                    (pid, outcome)
                })
                .collect()
        });
        guard.timings_mut().checkpoint = started.elapsed();
        if outcomes.iter().all(|(_, o)| matches!(o, Outcome::Saved(_))) {
            for (_, outcome) in outcomes {
                if let Outcome::Saved(images) = outcome {
                    guard.checkpointed_next();
                    guard.add_images(images);
                }
            }
            tracing::info!(
                processes = targets.len(),
                vram_bytes = guard.vram_bytes(),
                lock_ms = guard.timings().lock.as_millis(),
                checkpoint_ms = guard.timings().checkpoint.as_millis(),
                "CUDA checkpoint with custom storage done"
            );
            return Ok(guard);
        }
        guard.forget();
        Err(self.roll_back_custom(driver.as_ref(), outcomes, store.as_ref()))
    }

    fn roll_back_custom(
        &self,
        driver: &dyn CudaDriver,
        outcomes: Vec<(u32, Outcome)>,
        store: &dyn VramStore,
    ) -> CudaError {
        let mut cause = None;
        let mut failures = Vec::new();
        for (pid, outcome) in outcomes.into_iter().rev() {
            match outcome {
                Outcome::Saved(images) => {
                    failures.extend(roll_back_one(driver, pid, Some((&images, store))));
                }
                Outcome::Locked(e) => {
                    cause.get_or_insert(e);
                    failures.extend(roll_back_one(driver, pid, None));
                }
                Outcome::Rescued(e, images, rescue) => {
                    cause.get_or_insert(e);
                    failures.extend(roll_back_one(driver, pid, Some((&images, rescue.as_ref()))));
                }
                Outcome::Stuck(e) => {
                    failures.push(e.to_string());
                    cause.get_or_insert(e);
                }
            }
        }
        let cause = cause.unwrap_or_else(|| CudaError::RollbackIncomplete {
            cause: Box::new(CudaError::Refused {
                reasons: vec!["custom-storage checkpoint failed".into()],
            }),
            failures: Vec::new(),
        });
        tracing::warn!(error = %cause, "CUDA checkpoint with custom storage failed; rolled back");
        if failures.is_empty() || matches!(cause, CudaError::RollbackIncomplete { .. }) {
            cause
        } else {
            CudaError::RollbackIncomplete {
                cause: Box::new(cause),
                failures,
            }
        }
    }
}
