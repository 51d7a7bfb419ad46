//! The restore of one checkpoint: find the nearest tier with a good copy, bring the images into
//! the RAM tier, verify them, wait for the PID to be free, and run CRIU restore. When the
//! nearest copy is on NVMe, CRIU reads it straight from there instead ([`crate::streaming`]).

use std::path::PathBuf;
use std::time::Duration;

use kybernate_dataplane::{CheckpointName, TierKind};

use crate::bandwidth::Urgency;
use crate::blocking_work::blocking;
use crate::catalog::{CheckpointRecord, Phase};
use crate::config::TimeoutsConfig;
use crate::criu::{Restore, Restored};
use crate::cuda::{CheckRestore, CudaPhaseError, RestoreAndUnlock};
use crate::error::{tier_list, AgentError};
use crate::events::PhaseClock;
use crate::images::{self, ImageError};
use crate::journal::Transition;
use crate::node_parts::NodeParts;
use crate::process;
use crate::streaming::{self, StreamedRestoreError};
use crate::tiers::{Contains, Load};

/// What a restore produced.
#[derive(Debug, Clone)]
pub struct RestoreOutcome {
    /// PID of the restored tree's root.
    pub pid: i32,
    /// Tier the images came from.
    pub source_tier: TierKind,
    /// Restore phases and their durations.
    pub phases: Vec<Phase>,
}

/// Restores `record`, from `from` only when given, else from the nearest tier holding a good copy.
pub async fn run(
    parts: NodeParts,
    record: CheckpointRecord,
    from: Option<TierKind>,
) -> Result<RestoreOutcome, AgentError> {
    let mut clock = PhaseClock::new(
        &record.name,
        "restore",
        parts.events.clone(),
        parts.metrics.clone(),
    );
    let result = phases(&parts, &record, from, &mut clock).await;
    match &result {
        Ok(_) => clock.succeeded(),
        Err((phase, e)) => clock.failed(phase, e.metric_label()),
    }
    result.map_err(|(_, e)| e)
}

/// Verified images in the RAM tier, and the scratch copy to remove afterwards.
#[derive(Debug)]
pub struct Staged {
    /// Directory holding the images.
    pub dir: PathBuf,
    scratch: Option<PathBuf>,
    /// Tier they came from.
    pub tier: TierKind,
}

impl Staged {
    /// No staged copy: CRIU read the images straight from `tier`.
    fn streamed(tier: TierKind) -> Self {
        Self {
            dir: PathBuf::new(),
            scratch: None,
            tier,
        }
    }

    /// Moves a scratch copy into the RAM tier as the held copy of `name`.
    pub fn keep_in_ram(
        mut self,
        parts: &NodeParts,
        name: &CheckpointName,
    ) -> Result<(), AgentError> {
        let Some(scratch) = self.scratch.take() else {
            return Ok(());
        };
        let target = parts.ram.dir_of(name);
        std::fs::rename(&scratch, &target).map_err(|e| {
            let _ = std::fs::remove_dir_all(&scratch);
            AgentError::Internal(format!(
                "cannot move {} to {}: {e}",
                scratch.display(),
                target.display()
            ))
        })
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(scratch) = &self.scratch {
            let _ = std::fs::remove_dir_all(scratch);
        }
    }
}

async fn phases(
    parts: &NodeParts,
    record: &CheckpointRecord,
    from: Option<TierKind>,
    clock: &mut PhaseClock,
) -> Result<RestoreOutcome, (&'static str, AgentError)> {
    let name = CheckpointName::new(&record.name).map_err(|e| ("stage", e.into()))?;
    let cuda_error = |source: CudaPhaseError| AgentError::Cuda {
        name: record.name.clone(),
        source,
    };
    if let Some(recorded) = &record.gpu {
        let check = CheckRestore {
            recorded: recorded.clone(),
        };
        clock
            .run("cuda_check", async {
                parts.cuda.send(check).await?.map_err(cuda_error)
            })
            .await
            .map_err(|e| ("cuda_check", e))?;
    }
    let candidates = match from {
        Some(kind) if parts.tiers.get(kind).is_none() => {
            let e = AgentError::InvalidRequest(format!(
                "this agent has no {kind} tier (tiers: {})",
                tier_list(&parts.tiers.kinds())
            ));
            return Err(("stage", e));
        }
        Some(kind) => vec![kind],
        None => parts.tiers.kinds(),
    };
    let timeouts = &parts.config.timeouts;
    let streamed = streaming::nearest_is_nvme(parts, &name, &candidates)
        .await
        .map_err(|e| ("stage", e))?;
    let staged = if streamed {
        None
    } else {
        let staged = stage(
            parts,
            record,
            &name,
            &candidates,
            clock,
            Urgency::Foreground,
        );
        Some(staged.await.map_err(|e| ("stage", e))?)
    };

    let pid_wait = TimeoutsConfig::of(timeouts.pid_release_ms);
    clock
        .run("wait_pid", async {
            process::wait_until_released(record.pid, pid_wait)
                .await
                .map_err(|stat| AgentError::PidInUse {
                    name: record.name.clone(),
                    pid: record.pid,
                    stat,
                })
        })
        .await
        .map_err(|e| ("wait_pid", e))?;

    let _ = std::fs::create_dir_all(parts.config.logs_dir());
    // Whatever holds the PID from here on was put there by this restore.
    let since_ticks = process::uptime_ticks();
    parts
        .journal
        .note_off_thread(
            &record.name,
            Transition::RestoreStarted {
                pid: record.pid,
                since_ticks,
            },
        )
        .await;
    let restored = match crate::failpoints::failpoint("restore.before_criu") {
        Err(e) => Err(("criu_restore", e)),
        Ok(()) => run_criu_restore(parts, record, &name, staged, candidates, clock).await,
    };
    let (restored, staged) = match restored {
        Ok(done) => done,
        Err(e) => {
            // A failed or killed CRIU can leave a process that never runs on the PID (the
            // restorer waiting on a futex); it would hold the PID against every retry.
            if process::kill_started_since(record.pid, since_ticks, pid_wait).await {
                tracing::warn!(checkpoint = %record.name, pid = record.pid, "killed what the failed restore left on the PID");
            }
            parts
                .journal
                .note_off_thread(&record.name, Transition::RestoreEnded { ok: false })
                .await;
            return Err(e);
        }
    };
    crate::failpoints::failpoint("restore.after_criu").map_err(|e| ("criu_restore", e))?;

    let tree = process::tree(restored.pid);
    let unlock = RestoreAndUnlock {
        pids: tree.clone(),
        recorded: record.gpu.clone(),
    };
    let cuda = clock
        .run("cuda_restore", async {
            parts.cuda.send(unlock).await?.map_err(cuda_error)
        })
        .await;
    match cuda {
        Ok(report) if !report.processes.is_empty() => {
            clock.record("cuda_unlock", report.timings.unlock)
        }
        Ok(_) => {}
        Err(e) => {
            // A process whose GPU state did not come back must not run half-restored; the
            // checkpoint stays, so the restore can be retried.
            process::kill_tree(&tree);
            parts
                .journal
                .note_off_thread(&record.name, Transition::RestoreEnded { ok: false })
                .await;
            return Err(("cuda_restore", e));
        }
    }
    parts
        .journal
        .note_off_thread(&record.name, Transition::RestoreEnded { ok: true })
        .await;
    let source_tier = staged.tier;
    // Dropping a staged scratch copy removes it: file work, off the agent's thread.
    let _ = blocking(move || drop(staged)).await;

    Ok(RestoreOutcome {
        pid: restored.pid,
        source_tier,
        phases: clock.phases.clone(),
    })
}

/// Restores the process tree with CRIU: streamed from NVMe when nothing was staged, else from
/// the staged images; a streamed restore that finds a damaged chunk falls back to staging the
/// slower tiers.
async fn run_criu_restore(
    parts: &NodeParts,
    record: &CheckpointRecord,
    name: &CheckpointName,
    staged: Option<Staged>,
    mut candidates: Vec<TierKind>,
    clock: &mut PhaseClock,
) -> Result<(Restored, Staged), (&'static str, AgentError)> {
    Ok(match staged {
        Some(staged) => (criu_restore(parts, record, &staged, clock).await?, staged),
        None => match streaming::restore_from_nvme(parts, record, name, clock).await {
            Ok(restored) => (restored, Staged::streamed(TierKind::Nvme)),
            Err(StreamedRestoreError::Failed(e)) => return Err(("criu_restore", e)),
            Err(StreamedRestoreError::Damaged(e)) => {
                // CRIU refused the tree before it ran; try the slower tiers the usual way.
                tracing::warn!(checkpoint = %name, error = %e, "NVMe copy unusable; trying the next tier");
                candidates.retain(|k| *k > TierKind::Nvme);
                let staged = stage(parts, record, name, &candidates, clock, Urgency::Foreground)
                    .await
                    .map_err(|fallback| {
                        let detail = format!("nvme copy: {}; {}", damage_of(&e), fallback);
                        (
                            "stage",
                            AgentError::Images {
                                name: record.name.clone(),
                                detail: format!("no intact copy left ({detail})"),
                            },
                        )
                    })?;
                (criu_restore(parts, record, &staged, clock).await?, staged)
            }
        },
    })
}

/// Runs CRIU's restore from the images in `staged`, as phase `criu_restore`.
async fn criu_restore(
    parts: &NodeParts,
    record: &CheckpointRecord,
    staged: &Staged,
    clock: &mut PhaseClock,
) -> Result<Restored, (&'static str, AgentError)> {
    let restore = Restore {
        images_dir: staged.dir.clone(),
        log: parts
            .config
            .logs_dir()
            .join(format!("{}-restore.log", record.name)),
        shell_job: record.shell_job,
        timeout: TimeoutsConfig::of(parts.config.timeouts.restore_ms),
        stream_check: None,
    };
    let _ = std::fs::create_dir_all(parts.config.logs_dir());
    clock
        .run("criu_restore", async {
            parts
                .criu
                .send(restore)
                .await?
                .map_err(|source| AgentError::Criu {
                    name: record.name.clone(),
                    source,
                    resumed: false,
                })
        })
        .await
        .map_err(|e| ("criu_restore", e))
}

/// Finds the first of `candidates` (nearest first) with an intact copy and makes its images
/// available in RAM. A RAM copy is checked against the checkpoint's file digests; NVMe and S3
/// copies are verified chunk by chunk by the data plane as they load. A damaged copy is
/// reported and the next tier is tried. Loads run under the bandwidth limits of `urgency`.
pub async fn stage(
    parts: &NodeParts,
    record: &CheckpointRecord,
    name: &CheckpointName,
    candidates: &[TierKind],
    clock: &mut PhaseClock,
    urgency: Urgency,
) -> Result<Staged, AgentError> {
    let mut damaged = Vec::new();
    for kind in candidates {
        let Some(tier) = parts.tiers.get(*kind) else {
            continue;
        };
        let held = tier
            .send(Contains(name.clone()))
            .await?
            .map_err(|source| AgentError::Tier {
                name: record.name.clone(),
                phase: format!("find_{kind}"),
                source: Box::new(source),
            })?;
        if !held {
            continue;
        }
        let attempt = match kind {
            TierKind::Ram => verify_ram_copy(parts, record, name, clock).await,
            _ => load_into_ram(parts, name, *kind, tier, clock, urgency).await,
        };
        match attempt {
            Ok(staged) => return Ok(staged),
            Err(e @ (AgentError::Images { .. } | AgentError::Tier { .. })) => {
                tracing::warn!(checkpoint = %name, tier = %kind, error = %e, "copy unusable; trying the next tier");
                damaged.push(format!("{kind} copy: {}", damage_of(&e)));
            }
            Err(other) => return Err(other),
        }
    }
    if damaged.is_empty() {
        Err(AgentError::NoCopy {
            name: record.name.clone(),
            tiers: tier_list(candidates),
        })
    } else {
        Err(AgentError::Images {
            name: record.name.clone(),
            detail: format!("no intact copy left ({})", damaged.join("; ")),
        })
    }
}

async fn verify_ram_copy(
    parts: &NodeParts,
    record: &CheckpointRecord,
    name: &CheckpointName,
    clock: &mut PhaseClock,
) -> Result<Staged, AgentError> {
    let dir = parts.ram.dir_of(name);
    let files = record.files.clone();
    let checked = dir.clone();
    let workers = parts.config.dataplane.chunk_config().worker_count();
    clock
        .run("verify_ram", async move {
            blocking(move || images::verify_dir(&checked, &files, workers))
                .await?
                .map_err(|e: ImageError| AgentError::Images {
                    name: name.to_string(),
                    detail: e.to_string(),
                })
        })
        .await?;
    Ok(Staged {
        dir,
        scratch: None,
        tier: TierKind::Ram,
    })
}

async fn load_into_ram(
    parts: &NodeParts,
    name: &CheckpointName,
    kind: TierKind,
    tier: &actix::Addr<crate::tiers::TierActor>,
    clock: &mut PhaseClock,
    urgency: Urgency,
) -> Result<Staged, AgentError> {
    let scratch = parts.ram.staging_dir_of(name, rand::random::<u32>());
    std::fs::create_dir_all(&scratch)
        .map_err(|e| AgentError::Internal(format!("cannot create {}: {e}", scratch.display())))?;
    let staged = Staged {
        dir: scratch.clone(),
        scratch: Some(scratch.clone()),
        tier: kind,
    };
    let deadline = Duration::from_millis(parts.config.timeouts.restore_ms);
    let phase = load_phase(kind);
    crate::failpoints::failpoint(&format!("stage.{kind}.before_load"))?;
    let pacing = parts.bandwidth.pacing(urgency);
    // A load that times out stops writing into the scratch directory.
    let _cancel = crate::tiers::CancelOnDrop(pacing.cancel.clone());
    let report = clock
        .run(phase, async {
            let sent = tokio::time::timeout(
                deadline,
                tier.send(Load {
                    name: name.clone(),
                    dest: scratch.clone(),
                    pacing,
                }),
            )
            .await
            .map_err(|_| AgentError::Timeout {
                name: name.to_string(),
                phase: phase.into(),
                millis: parts.config.timeouts.restore_ms,
            })?;
            sent?.map_err(|source| AgentError::Tier {
                name: name.to_string(),
                phase: phase.into(),
                source: Box::new(source),
            })
        })
        .await?;
    parts.metrics.loaded(kind.as_str(), report.bytes);
    crate::failpoints::failpoint(&format!("stage.{kind}.after_load"))?;
    Ok(staged)
}

fn load_phase(kind: TierKind) -> &'static str {
    match kind {
        TierKind::Ram => "load_ram",
        TierKind::Nvme => "load_nvme",
        TierKind::S3 => "load_s3",
    }
}

/// What is wrong with a copy, without the checkpoint name the whole message already carries.
fn damage_of(e: &AgentError) -> String {
    match e {
        AgentError::Images { detail, .. } => detail.clone(),
        AgentError::Tier { phase, source, .. } => format!("{phase}: {source}"),
        other => other.to_string(),
    }
}
