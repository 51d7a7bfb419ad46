//! The one state machine of a checkpoint, whoever runs the dump. Two drivers feed it:
//! the agent running CRIU itself ([`crate::checkpoint`], a bare process tree) and the shim
//! running `runc checkpoint` between its Begin and End ([`crate::node`], a container). They
//! differ only in who dumps; everything around the dump happens here, once: the journal
//! entry of each step (written before the step is acted on, so recovery can finish or undo
//! it), the CUDA lock and its release or rollback, the commit into the tiers, the record, and
//! the workload's state in its `watch` channel ([`crate::workload_state`]).
//!
//! Steps and their legal moves (anything else is a bug and is refused):
//!
//! ```text
//! Intended ──► Locked ──► Dumped ──► Released ──► Stored ──► Recorded
//!     └──────────┴──────────┴───────────┴──► Abandoned
//! ```
//!
//! Journal: `dump_intent` before anything is done to the workload (before its CUDA lock), a
//! driver's dump ends in `dumped`, `committed` per tier once the images are there, then the
//! node agent writes `recorded` with the catalog entry; `abandoned` after a rollback.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kybernate_dataplane::{CheckpointName, StoreReport, TierError, TierKind};

use crate::blocking_work::blocking;
use crate::catalog::CheckpointRecord;
use crate::cuda::{CudaHeld, LockAndCheckpoint, Release};
use crate::drain::{self, Foreground};
use crate::error::{tier_list, AgentError};
use crate::events::PhaseClock;
use crate::failpoints::failpoint;
use crate::images::{self, ImageFile};
use crate::journal::{DumpIntent, Transition};
use crate::node_parts::NodeParts;
use crate::streaming;
use crate::tenancy::Origin;
use crate::workload_state::{StateSender, WorkloadState};

/// Who runs the dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// The agent runs CRIU on a bare process tree.
    AgentCriu,
    /// The shim runs `runc checkpoint` on a container, between Begin and End.
    ShimRunc,
}

impl Driver {
    /// Prefix of the test failpoints of this driver's steps.
    fn failpoints(self) -> &'static str {
        match self {
            Driver::AgentCriu => "checkpoint",
            Driver::ShimRunc => "container_checkpoint",
        }
    }
}

/// Where a checkpoint is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The intent is journaled; nothing is done to the workload yet.
    Intended,
    /// Its CUDA processes are locked and checkpointed.
    Locked,
    /// The dump is complete.
    Dumped,
    /// The GPUs are given back (resumed, or released for a workload the dump ended).
    Released,
    /// The images are committed in the tiers up to the one asked for (or some of them).
    Stored,
    /// The record is assembled; the node agent writes it.
    Recorded,
    /// Given up and rolled back.
    Abandoned,
}

impl Step {
    /// Whether a checkpoint may move from `self` to `next`.
    pub fn may_become(self, next: Step) -> bool {
        use Step::*;
        matches!(
            (self, next),
            (Intended, Locked)
                | (Locked, Dumped)
                | (Dumped, Released)
                | (Released, Stored)
                | (Stored, Recorded)
                | (Intended | Locked | Dumped | Released, Abandoned)
        )
    }
}

/// The images of a checkpoint as the tiers hold them.
#[derive(Debug)]
pub struct Stored {
    /// The first tier and what it stored.
    pub first: (TierKind, StoreReport),
    /// The image digests.
    pub files: Vec<ImageFile>,
    /// What the tiers up to the one asked for hold, and what failed.
    pub foreground: Foreground,
}

/// Everything a checkpoint's machine is started with.
#[derive(Debug)]
pub struct Start {
    /// The checkpoint.
    pub name: CheckpointName,
    /// Who dumps.
    pub driver: Driver,
    /// The journaled intent: workload, identity and image directory.
    pub intent: DumpIntent,
    /// Which tenant may restore it.
    pub origin: Origin,
    /// The slowest tier to store into before the checkpoint reports done.
    pub until: TierKind,
    /// The workload's state channel.
    pub workload: StateSender,
    /// The operation's clock (phases timed before the machine started, like validation).
    pub clock: PhaseClock,
}

/// One checkpoint's state machine (see the module docs).
#[derive(Debug)]
pub struct CheckpointMachine {
    parts: NodeParts,
    name: CheckpointName,
    driver: Driver,
    intent: DumpIntent,
    origin: Origin,
    until: TierKind,
    step: Step,
    cuda: Option<CudaHeld>,
    /// The CUDA hold is still to be ended (by a release or a rollback).
    cuda_held: bool,
    workload: StateSender,
    /// Times each phase; a shim's checkpoint keeps it from Begin to End.
    pub clock: PhaseClock,
}

impl CheckpointMachine {
    /// Journals the intent (after making the image directory) and moves the workload to
    /// `Freezing`. Nothing is done to the workload before the intent is durable.
    pub async fn begin(parts: NodeParts, start: Start) -> Result<Self, AgentError> {
        let Start {
            name,
            driver,
            intent,
            origin,
            until,
            workload,
            clock,
        } = start;
        let journal = parts.journal.clone();
        let dir = intent.images_dir.clone();
        let logs = parts.config.logs_dir();
        let (entry, journaled) = (name.clone(), intent.clone());
        let prepared = blocking(move || {
            std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::create_dir_all(logs))
                .map_err(|e| {
                    AgentError::Internal(format!("cannot prepare {}: {e}", dir.display()))
                })?;
            journal
                .append(entry.as_str(), Transition::DumpIntent(journaled))
                .map_err(|e| AgentError::Internal(e.to_string()))
        })
        .await
        .and_then(|prepared| prepared)
        .and_then(|()| failpoint(&format!("{}.after_intent", driver.failpoints())));
        let mut machine = Self {
            parts,
            name,
            driver,
            intent,
            origin,
            until,
            step: Step::Intended,
            cuda: None,
            cuda_held: false,
            workload,
            clock,
        };
        if let Err(e) = prepared {
            let _ = machine.abandon(e.to_string()).await;
            return Err(e);
        }
        machine.workload.send_replace(WorkloadState::Freezing);
        Ok(machine)
    }

    /// The checkpoint's name.
    pub fn name(&self) -> &CheckpointName {
        &self.name
    }

    /// Where the checkpoint is.
    pub fn step(&self) -> Step {
        self.step
    }

    /// The journaled intent.
    pub fn intent(&self) -> &DumpIntent {
        &self.intent
    }

    /// The directory the driver dumps into.
    pub fn images_dir(&self) -> &Path {
        &self.intent.images_dir
    }

    /// The CUDA processes the lock found.
    pub fn cuda_pids(&self) -> &[u32] {
        self.cuda.as_ref().map_or(&[], |c| c.cuda_pids.as_slice())
    }

    /// Whether the GPUs are still held (locked, not yet released or resumed).
    pub fn holds_gpus(&self) -> bool {
        self.cuda_held
    }

    fn advance(&mut self, next: Step) -> Result<(), AgentError> {
        if !self.step.may_become(next) {
            return Err(AgentError::Internal(format!(
                "checkpoint {}: step {:?} cannot become {next:?}",
                self.name, self.step
            )));
        }
        self.step = next;
        Ok(())
    }

    /// Locks and checkpoints the CUDA processes of `pids`. On failure the checkpoint is
    /// abandoned (the CUDA actor undoes a partial lock itself).
    pub async fn lock_cuda(&mut self, pids: Vec<i32>, timeout: Duration) -> Result<(), AgentError> {
        self.advance(Step::Locked)?;
        let lock = LockAndCheckpoint {
            name: self.name.to_string(),
            pids,
            lock_timeout: timeout,
        };
        let (parts, name) = (&self.parts, &self.name);
        let held = self
            .clock
            .run("cuda_checkpoint", async {
                parts
                    .cuda
                    .send(lock)
                    .await?
                    .map_err(|source| AgentError::Cuda {
                        name: name.to_string(),
                        source,
                    })
            })
            .await;
        match held {
            Ok(held) => {
                if !held.cuda_pids.is_empty() {
                    self.clock.record("cuda_lock", held.timings.lock);
                }
                self.cuda = Some(held);
                self.cuda_held = true;
                Ok(())
            }
            Err(e) => {
                let _ = self.abandon(e.to_string()).await;
                Err(e)
            }
        }
    }

    /// The driver's dump is complete (`took`, when the driver timed it elsewhere).
    pub async fn dumped(&mut self, took: Option<Duration>) -> Result<(), AgentError> {
        self.advance(Step::Dumped)?;
        if let Some(took) = took {
            self.clock.record("criu_dump", took);
        }
        self.parts
            .journal
            .note_off_thread(self.name.as_str(), Transition::Dumped)
            .await;
        self.workload.send_replace(WorkloadState::Dumped);
        Ok(())
    }

    /// Gives the GPUs back after the dump: a leave-running workload gets them restored and
    /// unlocked, a stopped one stays checkpointed (CRIU has its memory).
    pub async fn release_gpus(&mut self) -> Result<(), (&'static str, AgentError)> {
        let keep = !self.intent.leave_running;
        self.release_gpus_keeping(keep).await
    }

    /// Releases the GPUs after the dump, keeping the processes checkpointed or not
    /// (`keep_checkpointed`): a lease that ran out decides by whether the workload runs.
    pub async fn release_gpus_keeping(
        &mut self,
        keep_checkpointed: bool,
    ) -> Result<(), (&'static str, AgentError)> {
        let phase = if keep_checkpointed {
            "cuda_release"
        } else {
            "cuda_resume"
        };
        self.advance(Step::Released).map_err(|e| (phase, e))?;
        self.end_gpu_hold(keep_checkpointed)
            .await
            .map_err(|e| (phase, e))
    }

    /// Ends the CUDA hold, if there still is one, whatever the step: the processes stay
    /// checkpointed (`keep_checkpointed`, for a workload that has ended: gone processes
    /// cannot be resumed) or are restored and unlocked.
    pub async fn end_gpu_hold(&mut self, keep_checkpointed: bool) -> Result<(), AgentError> {
        if !self.cuda_held {
            return Ok(());
        }
        self.cuda_held = false;
        let phase = if keep_checkpointed {
            "cuda_release"
        } else {
            "cuda_resume"
        };
        let release = Release {
            name: self.name.to_string(),
            keep_checkpointed,
        };
        let (parts, name) = (&self.parts, &self.name);
        let timings = self
            .clock
            .run(phase, async {
                parts
                    .cuda
                    .send(release)
                    .await?
                    .map_err(|source| AgentError::Cuda {
                        name: name.to_string(),
                        source,
                    })
            })
            .await?;
        if !keep_checkpointed && !self.cuda_pids().is_empty() {
            self.clock.record("cuda_unlock", timings.unlock);
        }
        Ok(())
    }

    /// Commits the images into the RAM tier, digests them and stores them into the tiers up
    /// to the one asked for; or, for a dump streamed into NVMe (`streamed`, what its
    /// capture returned), takes NVMe's store. Each tier that holds them is journaled.
    pub async fn store(
        &mut self,
        streamed: Option<Result<Result<StoreReport, TierError>, AgentError>>,
    ) -> Result<Stored, (&'static str, AgentError)> {
        self.advance(Step::Stored).map_err(|e| ("store_ram", e))?;
        let (parts, name, until) = (&self.parts, &self.name, self.until);
        let clock = &mut self.clock;
        let (first, files, foreground) = match streamed {
            None => {
                let (ram, files) = commit_and_digest(parts, clock, name).await?;
                let foreground =
                    drain::store_foreground(parts, clock, name, &files, ram, until).await;
                ((TierKind::Ram, ram), files, foreground)
            }
            Some(committed) => store_streamed(parts, clock, name, committed, until).await?,
        };
        for kind in foreground
            .kinds()
            .into_iter()
            .filter(|k| *k != TierKind::Ram)
        {
            parts
                .journal
                .note_off_thread(
                    name.as_str(),
                    Transition::Committed {
                        tier: kind.as_str().into(),
                    },
                )
                .await;
        }
        parts.metrics.stored(
            first.1.raw_bytes,
            &[(first.0.as_str(), first.1.stored_bytes)],
        );
        Ok(Stored {
            first,
            files,
            foreground,
        })
    }

    /// The checkpoint's record, with `note` (why it was finished other than by its driver).
    /// When a tier past the first failed, the checkpoint is still kept in the tiers that
    /// hold it: the images are the workload's state (in stop mode its only state), and the
    /// error carries the record. The workload's state says where it is now.
    pub fn record(
        &mut self,
        stored: Stored,
        note: String,
    ) -> Result<CheckpointRecord, Box<(&'static str, AgentError)>> {
        self.advance(Step::Recorded)
            .map_err(|e| Box::new(("record", e)))?;
        let intent = &self.intent;
        let record = CheckpointRecord {
            name: self.name.to_string(),
            pid: intent.pid,
            container_id: intent.container_id.clone(),
            pod_uid: intent.pod_uid.clone(),
            gpu_group: intent.gpu_group.clone(),
            gpu_seat: intent.gpu_seat.clone(),
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            leave_running: intent.leave_running,
            shell_job: intent.shell_job,
            phases: self.clock.phases.clone(),
            raw_bytes: stored.first.1.raw_bytes,
            stored_bytes: stored.foreground.stored_bytes(),
            files: stored.files,
            gpu: match &self.cuda {
                Some(held) if !held.cuda_pids.is_empty() => held.fingerprint.clone(),
                _ => None,
            },
            note,
            origin: self.origin.clone(),
        };
        self.workload.send_replace(if intent.leave_running {
            WorkloadState::Running
        } else {
            WorkloadState::Stored
        });
        failpoint(&format!("{}.before_record", self.driver.failpoints()))
            .map_err(|e| Box::new(("record", e)))?;
        let held = tier_list(&stored.foreground.kinds());
        match stored.foreground.failure {
            None => Ok(record),
            Some((phase, source)) => Err(Box::new((
                phase,
                AgentError::HeldPartially {
                    tiers: held,
                    record: Box::new(record),
                    source: Box::new(source),
                },
            ))),
        }
    }

    /// Gives the checkpoint up: GPUs still held are restored and unlocked, the images
    /// dropped, and then the journal says so (an agent that dies before finds the intent
    /// open and does the same at its start). `Err` when the GPUs could not be given back.
    pub async fn abandon(&mut self, reason: String) -> Result<(), AgentError> {
        self.advance(Step::Abandoned)?;
        let resumed = self.end_gpu_hold(false).await;
        let dir = self.intent.images_dir.clone();
        let removed = blocking(move || match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        })
        .await;
        if let Ok(Err(e)) = removed {
            tracing::error!(checkpoint = %self.name, error = %e, "cannot remove the images of a dump that was given up");
        }
        self.parts
            .journal
            .note_off_thread(self.name.as_str(), Transition::Abandoned { reason })
            .await;
        self.workload.send_replace(if resumed.is_ok() {
            WorkloadState::Running
        } else {
            WorkloadState::Failed
        });
        resumed
    }

    /// The workload is known to be in trouble (its GPU state unknown, or it ended without a
    /// checkpoint).
    pub fn workload_failed(&self) {
        self.workload.send_replace(WorkloadState::Failed);
    }

    /// The slowest tier stored into before the checkpoint reports done.
    pub fn until(&self) -> TierKind {
        self.until
    }

    /// Ends the operation's events and metrics with `result`, and marks the workload failed
    /// when the checkpoint stopped between steps (its journal entry stays open for recovery).
    pub fn finish<T>(&mut self, result: &Result<T, (&'static str, AgentError)>) {
        match result {
            Ok(_) => self.clock.succeeded(),
            Err((phase, e)) => {
                self.clock.failed(phase, e.metric_label());
                let settled = matches!(self.step, Step::Abandoned)
                    || matches!(e, AgentError::HeldPartially { .. });
                if !settled {
                    self.workload.send_replace(WorkloadState::Failed);
                }
            }
        }
    }
}

/// What every checkpoint (a process here, a container through the shim) does once CRIU has
/// written its images: commit them as the RAM tier's copy (phase `store_ram`), then take their
/// chunk digests (phase `digest`), the one pass that hashes the images. The digests verify the
/// RAM copy before a restore and are the chunk addresses when it drains into slower tiers.
async fn commit_and_digest(
    parts: &NodeParts,
    clock: &mut PhaseClock,
    name: &CheckpointName,
) -> Result<(StoreReport, Vec<ImageFile>), (&'static str, AgentError)> {
    let ram = parts.ram.clone();
    let commit_name = name.clone();
    let ram_report = clock
        .run("store_ram", async {
            blocking(move || ram.commit(&commit_name))
                .await?
                .map_err(|source| AgentError::Tier {
                    name: name.to_string(),
                    phase: "store_ram".into(),
                    source: Box::new(source),
                })
        })
        .await
        .map_err(|e| ("store_ram", e))?;
    parts
        .journal
        .note_off_thread(
            name.as_str(),
            Transition::Committed {
                tier: TierKind::Ram.as_str().into(),
            },
        )
        .await;
    failpoint("checkpoint.after_ram_commit").map_err(|e| ("store_ram", e))?;
    let dir = parts.ram.dir_of(name);
    let config = parts.config.dataplane.chunk_config();
    let files = clock
        .run("digest", async move {
            blocking(move || images::digest_dir(&dir, &config))
                .await?
                .map_err(|e| AgentError::Internal(e.to_string()))
        })
        .await
        .map_err(|e| ("digest", e))?;
    Ok((ram_report, files))
}

/// After a successful streamed dump: takes the NVMe tier's store (`committed`, from
/// [`streaming::end_capture`]) and the checkpoint's digests, and stores into S3 from NVMe when the
/// checkpoint must reach S3 before it reports done. Returns what
/// [`crate::drain::store_foreground`] returns for the RAM path, with NVMe as the first tier.
async fn store_streamed(
    parts: &NodeParts,
    clock: &mut PhaseClock,
    name: &CheckpointName,
    committed: Result<Result<StoreReport, TierError>, AgentError>,
    until: TierKind,
) -> Result<((TierKind, StoreReport), Vec<ImageFile>, Foreground), (&'static str, AgentError)> {
    let partial = parts.ram.partial_dir_of(name);
    let _ = blocking(move || std::fs::remove_dir_all(partial)).await;
    let report = committed
        .and_then(|r| {
            r.map_err(|source| AgentError::Tier {
                name: name.to_string(),
                phase: "store_nvme".into(),
                source: Box::new(source),
            })
        })
        .map_err(|e| ("store_nvme", e))?;
    parts.metrics.drained(TierKind::Nvme.as_str(), &report);
    let nvme = parts
        .tiers
        .nvme
        .clone()
        .ok_or_else(|| ("store_nvme", AgentError::Internal("no NVMe tier".into())))?;
    let files = streaming::files_in(nvme, name)
        .await
        .map_err(|e| ("store_nvme", e))?;
    let mut foreground = Foreground {
        stored: vec![(TierKind::Nvme, report)],
        failure: None,
    };
    if until >= TierKind::S3 {
        match streaming::store_s3_from_nvme(parts, clock, name).await {
            Ok(s3) => foreground.stored.push((TierKind::S3, s3)),
            Err(e) => foreground.failure = Some(("store_s3", e)),
        }
    }
    Ok(((TierKind::Nvme, report), files, foreground))
}

#[cfg(test)]
mod tests {
    use super::Step::*;

    #[test]
    fn only_forward_moves_and_rollbacks_before_the_commit_are_legal() {
        let order = [Intended, Locked, Dumped, Released, Stored, Recorded];
        for (i, from) in order.iter().enumerate() {
            for (j, to) in order.iter().enumerate() {
                assert_eq!(from.may_become(*to), j == i + 1, "{from:?} -> {to:?}");
            }
        }
        for from in [Intended, Locked, Dumped, Released] {
            assert!(from.may_become(Abandoned), "{from:?} can be given up");
        }
        for from in [Stored, Recorded, Abandoned] {
            assert!(!from.may_become(Abandoned), "{from:?} is never rolled back");
        }
        assert!(!Abandoned.may_become(Intended));
    }
}
