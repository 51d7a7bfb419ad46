//! The checkpoint of one workload: CUDA phase, CRIU dump into the RAM tier, digest, and
//! storing into the slower tiers; or, for a checkpoint asked for NVMe or S3, CRIU's dump
//! streamed into the NVMe tier ([`crate::streaming`]). Any failure resumes the workload and
//! leaves no checkpoint.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kybernate_dataplane::{CheckpointName, StoreReport, TierKind};

use crate::catalog::CheckpointRecord;
use crate::config::TimeoutsConfig;
use crate::criu::Dump;
use crate::cuda::{CudaPhaseError, LockAndCheckpoint, Release};
use crate::drain;
use crate::error::{tier_list, AgentError};
use crate::events::PhaseClock;
use crate::images::{self, ImageFile};
use crate::journal::{DumpIntent, Transition};
use crate::node_parts::NodeParts;
use crate::process;
use crate::streaming;
use crate::tiers::Contains;

/// What to checkpoint and how.
#[derive(Debug, Clone)]
pub struct CheckpointJob {
    /// Name to store it under.
    pub name: CheckpointName,
    /// Root of the process tree.
    pub pid: i32,
    /// Keep the workload running.
    pub leave_running: bool,
    /// The slowest tier to store into before the checkpoint reports done; slower ones
    /// follow in the background.
    pub until: TierKind,
    /// Dump deadline requested by the caller, overriding the configured one.
    pub dump_timeout: Option<Duration>,
    /// Identity of the workload, recorded as given.
    pub container_id: String,
    /// Pod of the workload.
    pub pod_uid: String,
    /// GPU group.
    pub gpu_group: String,
    /// GPU seat.
    pub gpu_seat: String,
}

/// Runs a checkpoint; on success the record is ready to be saved in the catalog.
/// `on_dumped` is called once CRIU has finished, before the images are stored.
pub async fn run(
    parts: NodeParts,
    job: CheckpointJob,
    on_dumped: impl FnOnce(),
) -> Result<CheckpointRecord, AgentError> {
    let mut clock = PhaseClock::new(
        job.name.as_str(),
        "checkpoint",
        parts.events.clone(),
        parts.metrics.clone(),
    );
    let result = phases(&parts, &job, &mut clock, on_dumped).await;
    match &result {
        Ok(_) => clock.succeeded(),
        Err((phase, e)) => clock.failed(phase, e.metric_label()),
    }
    result.map_err(|(_, e)| e)
}

async fn phases(
    parts: &NodeParts,
    job: &CheckpointJob,
    clock: &mut PhaseClock,
    on_dumped: impl FnOnce(),
) -> Result<CheckpointRecord, (&'static str, AgentError)> {
    let name = job.name.clone();
    let stat = process::check_target(job.pid).map_err(|e| ("validate", e.into()))?;
    let shell_job = stat.session != job.pid || stat.pgrp != job.pid;
    ensure_name_free(parts, &name)
        .await
        .map_err(|e| ("validate", e))?;
    let tree = process::tree(job.pid);
    process::check_capabilities(&tree).map_err(|e| ("validate", e.into()))?;

    let cuda_error = |source: CudaPhaseError| AgentError::Cuda {
        name: name.to_string(),
        source,
    };
    let partial = parts.ram.partial_dir_of(&name);
    let intent = DumpIntent {
        pid: job.pid,
        start_ticks: stat.start_ticks,
        leave_running: job.leave_running,
        shell_job,
        container_id: job.container_id.clone(),
        pod_uid: job.pod_uid.clone(),
        gpu_group: job.gpu_group.clone(),
        gpu_seat: job.gpu_seat.clone(),
        images_dir: partial.clone(),
    };
    // The intent is journaled before anything is done to the workload: before its CUDA
    // processes are locked (only the agent that locked them would unlock them) and before
    // CRIU can end it (its images would have nobody to adopt them).
    let journal = parts.journal.clone();
    let (dir, logs, entry) = (partial.clone(), parts.config.logs_dir(), name.clone());
    let prepared = blocking(move || {
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::create_dir_all(logs))
            .map_err(|e| AgentError::Internal(format!("cannot prepare {}: {e}", dir.display())))?;
        journal
            .append(entry.as_str(), Transition::DumpIntent(intent))
            .map_err(|e| AgentError::Internal(e.to_string()))
    })
    .await
    .and_then(|prepared| prepared)
    .and_then(|()| failpoint("checkpoint.after_intent"));
    if let Err(e) = prepared {
        drop_partial(&partial).await;
        abandon(parts, &name, &e);
        return Err(("criu_dump", e));
    }

    let lock = LockAndCheckpoint {
        name: name.to_string(),
        pids: tree.clone(),
        lock_timeout: TimeoutsConfig::of(parts.config.timeouts.cuda_ms),
    };
    let cuda = clock
        .run("cuda_checkpoint", async {
            parts.cuda.send(lock).await?.map_err(cuda_error)
        })
        .await;
    let cuda = match cuda {
        Ok(cuda) => cuda,
        Err(e) => {
            drop_partial(&partial).await;
            abandon(parts, &name, &e);
            return Err(("cuda_checkpoint", e));
        }
    };
    if !cuda.cuda_pids.is_empty() {
        clock.record("cuda_lock", cuda.timings.lock);
    }
    let release = |keep_checkpointed| Release {
        name: name.to_string(),
        keep_checkpointed,
    };
    // Rolled back before the journal says so: an agent that dies in between still finds the
    // intent open and gives the GPUs back at its start.
    if let Err(e) = failpoint("checkpoint.before_criu") {
        let _ = parts.cuda.send(release(false)).await;
        drop_partial(&partial).await;
        abandon(parts, &name, &e);
        return Err(("criu_dump", e));
    }

    // A checkpoint for NVMe or S3 streams into the NVMe tier; one for RAM is written there.
    let capture = match streaming::capture_target(parts, job.until) {
        Some(nvme) => match streaming::start_capture(nvme, &name, partial.clone()).await {
            Ok(capture) => Some(capture),
            Err(e) => {
                let _ = parts.cuda.send(release(false)).await;
                drop_partial(&partial).await;
                abandon(parts, &name, &e);
                return Err(("criu_dump", e));
            }
        },
        None => None,
    };
    let timeouts = &parts.config.timeouts;
    let dump = Dump {
        pid: job.pid,
        images_dir: partial.clone(),
        log: parts.config.logs_dir().join(format!("{name}-dump.log")),
        leave_running: job.leave_running,
        shell_job,
        timeout: job
            .dump_timeout
            .unwrap_or_else(|| TimeoutsConfig::of(timeouts.dump_ms)),
        stream_commit: capture.as_ref().map(|c| c.action_script().to_owned()),
    };
    let dumped = clock
        .run("criu_dump", async {
            parts
                .criu
                .send(dump)
                .await?
                .map_err(|source| AgentError::Criu {
                    name: name.to_string(),
                    source,
                    resumed: true,
                })
        })
        .await;
    let streamed = match capture {
        Some(capture) => Some(streaming::end_capture(capture, dumped.is_ok()).await),
        None => None,
    };
    if let Err(e) = dumped {
        // A stream that failed on our side (a full disk) is why CRIU failed: report that.
        let e = match streamed {
            Some(Ok(Err(own))) => AgentError::Tier {
                name: name.to_string(),
                phase: "store_nvme".into(),
                source: Box::new(own),
            },
            _ => e,
        };
        // CRIU resumes the tree itself when it fails; when it was killed half-way, only we can.
        process::continue_tree(&tree);
        let resumed = clock
            .run("cuda_resume", async {
                parts.cuda.send(release(false)).await?.map_err(cuda_error)
            })
            .await;
        drop_partial(&partial).await;
        abandon(parts, &name, &e);
        if let Err(resume_error) = resumed {
            let e =
                AgentError::Internal(format!("{e}; and the CUDA rollback failed: {resume_error}"));
            return Err(("cuda_resume", e));
        }
        return Err(("criu_dump", e));
    }
    parts.journal.note(name.as_str(), Transition::Dumped);
    failpoint("checkpoint.after_criu").map_err(|e| ("criu_dump", e))?;
    on_dumped();
    // Stopped workloads stay checkpointed (CRIU has their memory); leave-running ones get their
    // GPUs back now.
    let phase = if job.leave_running {
        "cuda_resume"
    } else {
        "cuda_release"
    };
    let timings = clock
        .run(phase, async {
            parts
                .cuda
                .send(release(!job.leave_running))
                .await?
                .map_err(cuda_error)
        })
        .await
        .map_err(|e| (phase, e))?;
    if job.leave_running && !cuda.cuda_pids.is_empty() {
        clock.record("cuda_unlock", timings.unlock);
    }

    let (first, files, foreground) = match streamed {
        None => {
            let (ram_report, files) = commit_and_digest(parts, clock, &name).await?;
            let foreground =
                drain::store_foreground(parts, clock, &name, &files, ram_report, job.until).await;
            ((TierKind::Ram, ram_report), files, foreground)
        }
        Some(committed) => {
            streaming::store_foreground(parts, clock, &name, committed, job.until).await?
        }
    };
    for kind in foreground
        .kinds()
        .into_iter()
        .filter(|k| *k != TierKind::Ram)
    {
        parts.journal.note(
            name.as_str(),
            Transition::Committed {
                tier: kind.as_str().into(),
            },
        );
    }
    parts.metrics.stored(
        first.1.raw_bytes,
        &[(first.0.as_str(), first.1.stored_bytes)],
    );
    let record = CheckpointRecord {
        name: name.to_string(),
        pid: job.pid,
        container_id: job.container_id.clone(),
        pod_uid: job.pod_uid.clone(),
        gpu_group: job.gpu_group.clone(),
        gpu_seat: job.gpu_seat.clone(),
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        leave_running: job.leave_running,
        shell_job,
        phases: clock.phases.clone(),
        raw_bytes: first.1.raw_bytes,
        stored_bytes: foreground.stored_bytes(),
        files,
        gpu: if cuda.cuda_pids.is_empty() {
            None
        } else {
            cuda.fingerprint
        },
        note: String::new(),
        origin: crate::tenancy::Origin::NodeLocal,
    };
    let held = tier_list(&foreground.kinds());
    failpoint("checkpoint.before_record").map_err(|e| ("record", e))?;
    match foreground.failure {
        None => Ok(record),
        // The dump succeeded, so the images are the workload's state (in stop mode its only
        // state): keep the checkpoint with the tiers that hold it and report what failed.
        Some((phase, source)) => Err((
            phase,
            AgentError::HeldPartially {
                tiers: held,
                record: Box::new(record),
                source: Box::new(source),
            },
        )),
    }
}

/// What every checkpoint (a process here, a container through the shim) does once CRIU has
/// written its images: commit them as the RAM tier's copy (phase `store_ram`), then take their
/// chunk digests (phase `digest`), the one pass that hashes the images. The digests verify the
/// RAM copy before a restore and are the chunk addresses when it drains into slower tiers.
pub async fn commit_and_digest(
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
    parts.journal.note(
        name.as_str(),
        Transition::Committed {
            tier: TierKind::Ram.as_str().into(),
        },
    );
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

/// Refuses a name that anything on the node already holds: a record is checked by the node
/// agent; here the tiers are asked, so that a dump never starts (and, in stop mode, ends
/// its workload) only to fail committing into a directory that is taken.
pub async fn ensure_name_free(parts: &NodeParts, name: &CheckpointName) -> Result<(), AgentError> {
    let in_use = |by: String| AgentError::NameInUse {
        name: name.to_string(),
        by,
    };
    if parts.ram.dir_of(name).exists() {
        return Err(in_use("the RAM tier holds images under it".into()));
    }
    if parts.ram.partial_dir_of(name).exists() {
        return Err(in_use(
            "the RAM tier holds an unfinished dump under it".into(),
        ));
    }
    for (kind, tier) in &parts.tiers.actors {
        if *kind == TierKind::Ram {
            continue;
        }
        let held = tier
            .send(Contains(name.clone()))
            .await?
            .map_err(|source| AgentError::Tier {
                name: name.to_string(),
                phase: format!("find_{kind}"),
                source: Box::new(source),
            })?;
        if held {
            return Err(in_use(format!(
                "the {kind} tier holds a checkpoint under it"
            )));
        }
    }
    Ok(())
}

/// Journals that the dump of `name` was given up, so recovery does not look for it.
fn abandon(parts: &NodeParts, name: &CheckpointName, why: &AgentError) {
    parts.journal.note(
        name.as_str(),
        Transition::Abandoned {
            reason: why.to_string(),
        },
    );
}

/// Removes the images of a dump that is given up (none may exist yet).
async fn drop_partial(partial: &std::path::Path) {
    let dir = partial.to_owned();
    let removed = blocking(move || match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    })
    .await;
    if let Ok(Err(e)) = removed {
        tracing::error!(dir = %partial.display(), error = %e, "cannot remove the images of a dump that was given up");
    }
}

/// Fires a test failpoint ([`crate::failpoints`]) as an agent error.
pub fn failpoint(name: &str) -> Result<(), AgentError> {
    crate::failpoints::hit(name).map_err(AgentError::Internal)
}

/// Runs blocking file work off the async runtime.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| AgentError::Internal(format!("blocking task: {e}")))
}
