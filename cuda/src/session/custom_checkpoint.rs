//! Checkpoint with the driver's custom storage: lock every process, then per process
//! (all in parallel) map its VRAM, copy every GPU's memory (in parallel, one stream
//! each) into the VRAM store, and complete. CRIU runs afterwards and dumps host state
//! only. A failure gives every process its VRAM back and unlocks it.

use super::checkpointed::Checkpointed;
use super::custom_restore::restore_one;
use super::{lock_all, CudaSession};
use crate::copier::copy_out;
use crate::driver::{CudaDriver, MappedOperation};
use crate::error::{CudaError, Phase};
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

/// Where one process ended up after its part of the checkpoint: the error, if its part
/// failed, and what giving it back needs.
struct Outcome {
    error: Option<CudaError>,
    state: Held,
}

/// What a process holds after its part of the checkpoint.
enum Held {
    /// Checkpointed; its VRAM is in `store` (the checkpoint's store or a rescue copy).
    Saved(Vec<VramImage>, Option<Arc<MemoryVramStore>>),
    /// Still LOCKED with its VRAM on the GPU (checkpoint or completion failed).
    Locked,
    /// Its mapping could not be copied anywhere; the operation was left open.
    Stuck,
}

impl Outcome {
    fn saved(images: Vec<VramImage>) -> Outcome {
        Outcome {
            error: None,
            state: Held::Saved(images, None),
        }
    }

    fn locked(error: CudaError) -> Outcome {
        Outcome {
            error: Some(error),
            state: Held::Locked,
        }
    }
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
            return Outcome::locked(CudaError::Driver {
                phase: Phase::Checkpoint,
                pid,
                source,
            })
        }
    };
    match copy_all(driver, pid, &op, store, chunk) {
        Ok(images) => match complete(driver, pid, op.handle) {
            Ok(()) => Outcome::saved(images),
            Err(e) => Outcome::locked(e),
        },
        Err(cause) => {
            // The mapping is still valid: keep a copy here so that completing (which
            // releases the GPU memory) loses nothing, then give it back on rollback.
            tracing::warn!(pid, error = %cause, "VRAM copy failed; taking a rescue copy");
            let rescue = Arc::new(MemoryVramStore::default());
            match copy_all(driver, pid, &op, rescue.as_ref(), chunk) {
                Ok(images) => match complete(driver, pid, op.handle) {
                    Ok(()) => Outcome {
                        error: Some(cause),
                        state: Held::Saved(images, Some(rescue)),
                    },
                    Err(_) => Outcome::locked(cause),
                },
                Err(again) => Outcome {
                    error: Some(CudaError::RollbackIncomplete {
                        cause: Box::new(cause),
                        failures: vec![format!(
                            "the rescue copy failed too ({again}); pid {pid}'s checkpoint \
                             operation stays open and its VRAM mapped"
                        )],
                    }),
                    state: Held::Stuck,
                },
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
        let mut outcomes = outcomes;
        let first_error = outcomes.iter_mut().find_map(|(_, o)| o.error.take());
        let Some(cause) = first_error else {
            for (_, outcome) in outcomes {
                if let Held::Saved(images, _) = outcome.state {
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
        };
        guard.forget();
        tracing::warn!(error = %cause, "CUDA checkpoint with custom storage failed; rolling back");
        let mut failures = Vec::new();
        for (pid, outcome) in outcomes.into_iter().rev() {
            match (&outcome.error, &outcome.state) {
                (Some(also), Held::Stuck) => failures.push(also.to_string()),
                (Some(also), _) => tracing::warn!(pid, error = %also, "also failed"),
                (None, _) => {}
            }
            match outcome.state {
                Held::Saved(images, rescue) => {
                    let from: &dyn VramStore = match &rescue {
                        Some(rescue) => rescue.as_ref(),
                        None => store.as_ref(),
                    };
                    failures.extend(roll_back_one(driver.as_ref(), pid, Some((&images, from))));
                }
                Held::Locked => failures.extend(roll_back_one(driver.as_ref(), pid, None)),
                Held::Stuck => {}
            }
        }
        if failures.is_empty() {
            Err(cause)
        } else {
            Err(CudaError::RollbackIncomplete {
                cause: Box::new(cause),
                failures,
            })
        }
    }
}
