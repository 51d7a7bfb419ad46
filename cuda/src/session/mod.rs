//! The CUDA session: what the agent's CUDA session actor calls. Checkpoint locks every
//! CUDA process of a workload, then checkpoints them all, and hands back a guard that
//! the caller resolves after CRIU; restore runs after CRIU restore.

use crate::driver::{CudaDriver, GpuPair, ProcessState};
use crate::error::{CudaError, Phase};
use crate::fingerprint::{plan_restore, GpuFingerprint};
use crate::gate::{check_gate, GatePolicy, NodeGpuFacts, RecordedGpu};
use crate::host;
use crate::libcuda::LibCuda;
use crate::mode::{choose_mode, CheckpointMode, CustomStorageSetting, ModeChoice};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod checkpointed;
mod custom_checkpoint;
mod custom_restore;

pub use checkpointed::Checkpointed;
pub use custom_checkpoint::CustomCheckpointOptions;

/// How long each phase took, for metrics and the CLI. Phases that did not run are zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PhaseTimings {
    /// Locking every process.
    pub lock: Duration,
    /// Checkpointing every process (VRAM → host memory).
    pub checkpoint: Duration,
    /// Restoring every process (host memory → VRAM).
    pub restore: Duration,
    /// Unlocking every process.
    pub unlock: Duration,
}

/// Knobs of one checkpoint.
#[derive(Clone, Copy, Debug)]
pub struct CheckpointOptions {
    /// Timeout of each `cuCheckpointProcessLock`.
    pub lock_timeout: Duration,
    /// Host RAM that must stay free beyond the GPU memory moved into it.
    pub host_ram_margin: u64,
}

impl Default for CheckpointOptions {
    fn default() -> Self {
        CheckpointOptions {
            lock_timeout: Duration::from_secs(10),
            host_ram_margin: 512 * 1024 * 1024,
        }
    }
}

/// The result of a restore.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RestoreReport {
    /// The CUDA processes restored, with their restore thread ids.
    pub processes: Vec<(u32, u32)>,
    /// Whether GPUs were remapped to other UUIDs.
    pub remapped: bool,
    /// Restore and unlock durations.
    pub timings: PhaseTimings,
}

/// Locks every target in order, recording each in `guard`; on failure the guard rolls
/// back what was locked and the error names the pid.
pub(crate) fn lock_all(
    driver: &dyn CudaDriver,
    targets: &[u32],
    timeout: Duration,
    guard: &mut Checkpointed,
) -> Result<(), CudaError> {
    let started = Instant::now();
    for &pid in targets {
        if let Err(source) = driver.lock(pid, timeout) {
            return Err(guard.fail(CudaError::Driver {
                phase: Phase::Lock,
                pid,
                source,
            }));
        }
        guard.locked(pid);
    }
    guard.timings_mut().lock = started.elapsed();
    Ok(())
}

/// The agent's handle on the CUDA driver. Create it once, at agent start; a node
/// without a driver gets a CPU-only session whose operations do nothing.
#[derive(Clone, Debug)]
pub struct CudaSession {
    pub(crate) driver: Option<Arc<dyn CudaDriver>>,
    /// The checkpoint path chosen at load, and why.
    mode: ModeChoice,
}

impl CudaSession {
    /// Loads and initialises `libcuda.so.1`; CPU-only (with a log line) when the node
    /// has no driver or no GPU. Checkpoints take the classic path, as with
    /// `custom_storage = "off"`: callers that store VRAM images use
    /// [`CudaSession::load_with`].
    pub fn load() -> Result<CudaSession, CudaError> {
        CudaSession::load_with(CustomStorageSetting::Off)
    }

    /// [`CudaSession::load`] with the `[cuda] custom_storage` setting: probes the
    /// driver and logs one line with the chosen checkpoint path and why. `on` on a
    /// driver without custom storage is an error naming the reason.
    pub fn load_with(setting: CustomStorageSetting) -> Result<CudaSession, CudaError> {
        match LibCuda::load()? {
            Some(driver) => CudaSession::with_driver_setting(Arc::new(driver), setting),
            None => Ok(CudaSession::cpu_only()),
        }
    }

    /// A session over any driver implementation (tests use recording fakes), with
    /// custom storage when the driver offers it.
    pub fn with_driver(driver: Arc<dyn CudaDriver>) -> CudaSession {
        let probe = driver.custom_storage_probe();
        let mode = choose_mode(CustomStorageSetting::Auto, probe).unwrap_or(ModeChoice {
            mode: CheckpointMode::Classic,
            reason: "custom storage unavailable".into(),
        });
        CudaSession {
            driver: Some(driver),
            mode,
        }
    }

    /// A session over `driver` with the given setting; see [`CudaSession::load_with`].
    pub fn with_driver_setting(
        driver: Arc<dyn CudaDriver>,
        setting: CustomStorageSetting,
    ) -> Result<CudaSession, CudaError> {
        let mode = choose_mode(setting, driver.custom_storage_probe())?;
        tracing::info!(mode = %mode.mode, reason = %mode.reason, "CUDA checkpoint path chosen");
        Ok(CudaSession {
            driver: Some(driver),
            mode,
        })
    }

    /// A session for a node without GPUs.
    pub fn cpu_only() -> CudaSession {
        CudaSession {
            driver: None,
            mode: ModeChoice {
                mode: CheckpointMode::Classic,
                reason: "no CUDA driver on this node".into(),
            },
        }
    }

    /// The checkpoint path this session takes, and why.
    pub fn mode(&self) -> &ModeChoice {
        &self.mode
    }

    /// Refuses a checkpoint or restore in `wanted` mode when this node cannot do it.
    pub fn require_mode(&self, wanted: CheckpointMode) -> Result<(), CudaError> {
        if wanted == CheckpointMode::CustomStorage && self.mode.mode != wanted {
            return Err(CudaError::from(crate::mode::ModeUnavailable {
                mode: wanted,
                reason: self.mode.reason.clone(),
            }));
        }
        Ok(())
    }

    /// What to record about the GPUs of `pids` before a checkpoint in `mode`: call it
    /// while their memory is still on the GPUs. Only the GPUs they hold memory on are
    /// recorded (all GPUs when the usage is unknown), so a restore needs only those.
    /// `None` on a CPU-only node.
    pub fn record(&self, pids: &[u32], mode: CheckpointMode) -> Option<RecordedGpu> {
        let driver = self.driver.as_ref()?;
        let mut fingerprint = self.fingerprint()?;
        let mut used = driver.gpu_usage(pids).unwrap_or_default();
        if used.len() == fingerprint.devices.len() && used.iter().any(|&u| u > 0) {
            let (devices, usage): (Vec<_>, Vec<_>) = fingerprint
                .devices
                .into_iter()
                .zip(used)
                .filter(|(_, u)| *u > 0)
                .unzip();
            fingerprint.devices = devices;
            used = usage;
        } else {
            used.clear();
        }
        Some(RecordedGpu {
            fingerprint,
            driver_release: driver.driver_release(),
            mode,
            used,
        })
    }

    /// This node's GPU facts now, for the restore gate and for node selection.
    pub fn node_facts(&self) -> NodeGpuFacts {
        let Some(driver) = &self.driver else {
            return NodeGpuFacts {
                driver_version: None,
                driver_release: None,
                devices: Vec::new(),
                free_memory: None,
                custom_storage: false,
            };
        };
        NodeGpuFacts {
            driver_version: Some(driver.driver_version()),
            driver_release: driver.driver_release(),
            devices: driver.devices().to_vec(),
            free_memory: driver
                .gpu_memory()
                .map(|m| m.into_iter().map(|g| g.free).collect()),
            custom_storage: self.mode.mode == CheckpointMode::CustomStorage,
        }
    }

    /// The restore gate: compares `recorded` with this node before anything is locked
    /// or restored; returns the UUID pairs, or one reason per failing fact.
    pub fn check_gate(
        &self,
        recorded: &RecordedGpu,
        policy: &GatePolicy,
    ) -> Result<Vec<GpuPair>, CudaError> {
        check_gate(recorded, &self.node_facts(), policy)
    }

    /// True when there is no driver: checkpoints skip the CUDA steps.
    pub fn is_cpu_only(&self) -> bool {
        self.driver.is_none()
    }

    /// This node's GPUs and driver, to record in a checkpoint's manifest.
    pub fn fingerprint(&self) -> Option<GpuFingerprint> {
        self.driver.as_ref().map(|d| GpuFingerprint {
            driver_version: d.driver_version(),
            devices: d.devices().to_vec(),
        })
    }

    /// The CUDA processes among `pids` (those whose state query succeeds), with their
    /// states. Other processes are skipped.
    pub fn cuda_processes(&self, pids: &[u32]) -> Vec<(u32, ProcessState)> {
        let Some(driver) = &self.driver else {
            return Vec::new();
        };
        pids.iter()
            .filter_map(|&pid| match driver.process_state(pid) {
                Ok(state) => Some((pid, state)),
                Err(e) => {
                    tracing::debug!(pid, error = %e, "not a CUDA process");
                    None
                }
            })
            .collect()
    }

    /// The CUDA processes among `pids`, which must all be RUNNING; nothing is touched.
    pub(crate) fn running_targets(
        &self,
        pids: &[u32],
        guard: &mut Checkpointed,
    ) -> Result<Vec<u32>, CudaError> {
        let mut targets = Vec::new();
        for (pid, state) in self.cuda_processes(pids) {
            if state != ProcessState::Running {
                guard.mark_resolved();
                return Err(CudaError::UnexpectedState {
                    phase: Phase::Discover,
                    pid,
                    expected: ProcessState::Running,
                    found: state,
                });
            }
            targets.push(pid);
        }
        Ok(targets)
    }

    /// Refuses, before CRIU restore runs, a checkpoint this node cannot take back; on
    /// success returns whether GPUs will be remapped.
    pub fn check_restore(&self, recorded: &GpuFingerprint) -> Result<bool, CudaError> {
        plan_restore(recorded, self.fingerprint().as_ref()).map(|pairs| !pairs.is_empty())
    }

    /// Locks all CUDA processes among `pids`, then checkpoints them all. Refuses before
    /// locking when host RAM cannot take their GPU memory. On any failure every
    /// process already touched is restored and unlocked, in reverse order, and the
    /// error names the phase, the pid and the driver's code. On success the returned
    /// guard must be resolved after CRIU: [`Checkpointed::resume`] (leave-running or
    /// CRIU failed) or [`Checkpointed::keep_checkpointed`] (stop); dropping it rolls back.
    pub fn checkpoint(
        &self,
        pids: &[u32],
        options: &CheckpointOptions,
    ) -> Result<Checkpointed, CudaError> {
        let mut guard = Checkpointed::new(self.driver.clone(), self.fingerprint());
        let Some(driver) = self.driver.clone() else {
            tracing::info!("CPU-only node: no CUDA checkpoint");
            return Ok(guard);
        };
        let targets = self.running_targets(pids, &mut guard)?;
        let mut gpu_bytes = 0u64;
        for &pid in &targets {
            let used = driver
                .gpu_memory_used(pid)
                .map_err(|source| CudaError::Driver {
                    phase: Phase::Discover,
                    pid,
                    source,
                })?;
            gpu_bytes = gpu_bytes.saturating_add(used);
        }
        if !targets.is_empty() {
            host::preflight(
                gpu_bytes,
                options.host_ram_margin,
                host::available_memory()?,
            )?;
        }
        lock_all(driver.as_ref(), &targets, options.lock_timeout, &mut guard)?;
        let started = Instant::now();
        for &pid in &targets {
            if let Err(source) = driver.checkpoint(pid) {
                return Err(guard.fail(CudaError::Driver {
                    phase: Phase::Checkpoint,
                    pid,
                    source,
                }));
            }
            guard.checkpointed_next();
        }
        guard.timings_mut().checkpoint = started.elapsed();
        tracing::info!(
            processes = targets.len(),
            gpu_bytes,
            lock_ms = guard.timings().lock.as_millis(),
            checkpoint_ms = guard.timings().checkpoint.as_millis(),
            "CUDA checkpoint done"
        );
        Ok(guard)
    }

    /// After CRIU restore: for every CUDA process among `pids` in CHECKPOINTED state,
    /// reads its restore thread id and restores it (remapping GPUs when `recorded`
    /// names other UUIDs), then unlocks them all (and any found still LOCKED). When a
    /// step fails, processes already restored are still unlocked, so none stays LOCKED.
    pub fn restore(
        &self,
        pids: &[u32],
        recorded: Option<&GpuFingerprint>,
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
        let targets: Vec<u32> = found
            .iter()
            .filter(|(_, state)| *state == ProcessState::Checkpointed)
            .map(|(pid, _)| *pid)
            .collect();
        // Left LOCKED by an earlier, interrupted restore: they only need unlocking.
        let locked = found
            .iter()
            .filter(|(_, state)| *state == ProcessState::Locked)
            .map(|(pid, _)| *pid);
        let started = Instant::now();
        let mut failure = None;
        for &pid in &targets {
            let step = driver
                .restore_thread_id(pid)
                .map_err(|source| (Phase::RestoreThreadId, source))
                .and_then(|tid| {
                    driver
                        .restore(pid, &pairs)
                        .map(|()| tid)
                        .map_err(|source| (Phase::Restore, source))
                });
            match step {
                Ok(tid) => report.processes.push((pid, tid)),
                Err((phase, source)) => {
                    failure = Some(CudaError::Driver { phase, pid, source });
                    break;
                }
            }
        }
        report.timings.restore = started.elapsed();
        let started = Instant::now();
        let mut unlock_failures = Vec::new();
        let restored: Vec<u32> = report.processes.iter().map(|(pid, _)| *pid).collect();
        for pid in locked.chain(restored) {
            if let Err(source) = driver.unlock(pid) {
                let err = CudaError::Driver {
                    phase: Phase::Unlock,
                    pid,
                    source,
                };
                unlock_failures.push(err.to_string());
                failure.get_or_insert(err);
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
                    "CUDA restore done"
                );
                Ok(report)
            }
            Some(cause) if unlock_failures.is_empty() || cause.phase() == Phase::Unlock => {
                Err(cause)
            }
            Some(cause) => Err(CudaError::RollbackIncomplete {
                cause: Box::new(cause),
                failures: unlock_failures,
            }),
        }
    }
}
