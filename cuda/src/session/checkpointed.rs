//! The guard a CUDA checkpoint returns: it holds the locked and checkpointed processes
//! until the caller decides, after CRIU, whether they stay checkpointed or run again.

use super::custom_restore::restore_one;
use super::PhaseTimings;
use crate::driver::CudaDriver;
use crate::error::{CudaError, Phase};
use crate::fingerprint::GpuFingerprint;
use crate::mode::CheckpointMode;
use crate::vram::{VramImage, VramStore};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The processes of one workload, locked and checkpointed at one consistent point.
/// Resolve it once CRIU has run; dropping it unresolved rolls back.
#[derive(Debug)]
pub struct Checkpointed {
    driver: Option<Arc<dyn CudaDriver>>,
    /// Locked processes, in lock order.
    locked: Vec<u32>,
    /// How many of `locked` (a prefix) are also checkpointed.
    checkpointed: usize,
    fingerprint: Option<GpuFingerprint>,
    timings: PhaseTimings,
    resolved: bool,
    /// With custom storage: where the VRAM went, to give it back on rollback.
    custom: Option<CustomHold>,
}

/// The VRAM of a custom-storage checkpoint: the images and the store holding them.
#[derive(Debug)]
pub(crate) struct CustomHold {
    pub(crate) store: Arc<dyn VramStore>,
    pub(crate) images: Vec<VramImage>,
}

impl Checkpointed {
    pub(crate) fn new(
        driver: Option<Arc<dyn CudaDriver>>,
        fingerprint: Option<GpuFingerprint>,
    ) -> Checkpointed {
        Checkpointed {
            driver,
            locked: Vec::new(),
            checkpointed: 0,
            fingerprint,
            timings: PhaseTimings::default(),
            resolved: false,
            custom: None,
        }
    }

    /// Marks this a custom-storage checkpoint whose VRAM is in `store`.
    pub(crate) fn hold_custom(&mut self, store: Arc<dyn VramStore>) {
        self.custom = Some(CustomHold {
            store,
            images: Vec::new(),
        });
    }

    /// Records the images of the next checkpointed process (custom storage).
    pub(crate) fn add_images(&mut self, images: Vec<VramImage>) {
        if let Some(hold) = &mut self.custom {
            hold.images.extend(images);
        }
    }

    /// How the VRAM was saved: record it in the manifest.
    pub fn mode(&self) -> CheckpointMode {
        if self.custom.is_some() {
            CheckpointMode::CustomStorage
        } else {
            CheckpointMode::Classic
        }
    }

    /// The VRAM images of a custom-storage checkpoint (empty on the classic path):
    /// record them in the manifest; a restore needs them.
    pub fn vram_images(&self) -> &[VramImage] {
        self.custom.as_ref().map_or(&[], |h| h.images.as_slice())
    }

    /// Bytes of GPU memory saved through custom storage.
    pub fn vram_bytes(&self) -> u64 {
        self.vram_images().iter().map(|i| i.size).sum()
    }

    /// Records that `pid` is now locked.
    pub(crate) fn locked(&mut self, pid: u32) {
        self.locked.push(pid);
    }

    /// Records that the next locked process is now checkpointed.
    pub(crate) fn checkpointed_next(&mut self) {
        self.checkpointed += 1;
    }

    pub(crate) fn timings_mut(&mut self) -> &mut PhaseTimings {
        &mut self.timings
    }

    /// The caller rolled back (or settled) every process itself.
    pub(crate) fn forget(&mut self) {
        self.resolved = true;
        self.locked.clear();
        self.checkpointed = 0;
    }

    /// Nothing was touched; dropping needs no rollback.
    pub(crate) fn mark_resolved(&mut self) {
        self.resolved = true;
    }

    /// The CUDA processes held (empty on a CPU-only node or without CUDA processes).
    pub fn pids(&self) -> &[u32] {
        &self.locked
    }

    /// The GPUs to record in the manifest.
    pub fn fingerprint(&self) -> Option<&GpuFingerprint> {
        self.fingerprint.as_ref()
    }

    /// Lock and checkpoint durations so far.
    pub fn timings(&self) -> PhaseTimings {
        self.timings
    }

    /// The processes stay checkpointed: CRIU has captured them and a stop-checkpoint
    /// ends them. Returns the phase durations.
    pub fn keep_checkpointed(mut self) -> PhaseTimings {
        self.resolved = true;
        self.timings
    }

    /// Restores and unlocks every process (reverse order), so the workload runs on its
    /// GPU again: after a leave-running checkpoint, or when CRIU failed.
    pub fn resume(mut self) -> Result<PhaseTimings, CudaError> {
        self.resolved = true;
        let failures = self.roll_back();
        match failures.into_iter().next() {
            None => Ok(self.timings),
            Some(first) => Err(first),
        }
    }

    /// Rolls back after `cause`: the error to report, wrapped when rollback failed too.
    pub(crate) fn fail(&mut self, cause: CudaError) -> CudaError {
        self.resolved = true;
        tracing::warn!(error = %cause, "CUDA checkpoint failed; rolling back");
        let failures = self.roll_back();
        if failures.is_empty() {
            cause
        } else {
            CudaError::RollbackIncomplete {
                cause: Box::new(cause),
                failures: failures.iter().map(ToString::to_string).collect(),
            }
        }
    }

    /// Restore (if checkpointed) then unlock each touched process, last one first; a
    /// failed step does not stop the others.
    fn roll_back(&mut self) -> Vec<CudaError> {
        let Some(driver) = self.driver.clone() else {
            return Vec::new();
        };
        let mut failures = Vec::new();
        let mut restore = Duration::ZERO;
        let mut unlock = Duration::ZERO;
        for (index, &pid) in self.locked.iter().enumerate().rev() {
            if index < self.checkpointed {
                let started = Instant::now();
                let restored = match &self.custom {
                    Some(hold) => {
                        let images: Vec<&VramImage> =
                            hold.images.iter().filter(|i| i.key.pid == pid).collect();
                        restore_one(driver.as_ref(), pid, &[], &images, hold.store.as_ref())
                    }
                    None => driver
                        .restore(pid, &[])
                        .map_err(|source| CudaError::Driver {
                            phase: Phase::Restore,
                            pid,
                            source,
                        }),
                };
                restore += started.elapsed();
                if let Err(failure) = restored {
                    failures.push(failure);
                    continue;
                }
            }
            let started = Instant::now();
            let unlocked = driver.unlock(pid);
            unlock += started.elapsed();
            if let Err(source) = unlocked {
                failures.push(CudaError::Driver {
                    phase: Phase::Unlock,
                    pid,
                    source,
                });
            }
        }
        self.timings.restore = restore;
        self.timings.unlock = unlock;
        self.locked.clear();
        self.checkpointed = 0;
        failures
    }
}

impl Drop for Checkpointed {
    fn drop(&mut self) {
        if !self.resolved && !self.locked.is_empty() {
            tracing::warn!("CUDA checkpoint dropped unresolved; rolling back");
            for failure in self.roll_back() {
                tracing::error!(error = %failure, "CUDA rollback step failed");
            }
        }
    }
}
