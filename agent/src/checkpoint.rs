//! The agent's driver of a checkpoint ([`crate::checkpoint_machine`]): the agent runs CRIU
//! on a bare process tree, into the RAM tier or, for a checkpoint asked for NVMe or S3,
//! streamed into the NVMe tier ([`crate::streaming`]). The machine journals, locks and
//! releases CUDA, stores and records; a failure before the dump completed resumes the
//! workload and leaves no checkpoint.

use std::time::Duration;

use kybernate_dataplane::{CheckpointName, TierKind};

use crate::catalog::CheckpointRecord;
use crate::checkpoint_machine::{CheckpointMachine, Driver, Start};
use crate::config::TimeoutsConfig;
use crate::criu::Dump;
use crate::error::AgentError;
use crate::events::PhaseClock;
use crate::failpoints::failpoint;
use crate::journal::DumpIntent;
use crate::node_parts::NodeParts;
use crate::process;
use crate::streaming;
use crate::tiers::Contains;
use crate::workload_state::StateSender;

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

/// Runs a checkpoint; on success the record is ready to be saved in the catalog. The
/// workload's state goes into `workload`.
pub async fn run(
    parts: NodeParts,
    job: CheckpointJob,
    workload: StateSender,
) -> Result<CheckpointRecord, AgentError> {
    let clock = PhaseClock::new(
        job.name.as_str(),
        "checkpoint",
        parts.events.clone(),
        parts.metrics.clone(),
    );
    let mut machine = match start(&parts, &job, clock, workload).await {
        Ok(machine) => machine,
        Err((clock, phase, e)) => {
            clock.failed(phase, e.metric_label());
            return Err(e);
        }
    };
    let result = dump_and_store(&parts, &job, &mut machine).await;
    machine.finish(&result);
    result.map_err(|(_, e)| e)
}

/// Validates the job and starts its machine (the intent journaled); the clock comes back
/// with the error when nothing was started.
async fn start(
    parts: &NodeParts,
    job: &CheckpointJob,
    clock: PhaseClock,
    workload: StateSender,
) -> Result<CheckpointMachine, (PhaseClock, &'static str, AgentError)> {
    let validated = async {
        let stat = process::check_target(job.pid)?;
        ensure_name_free(parts, &job.name).await?;
        process::check_capabilities(&process::tree(job.pid))?;
        Ok::<_, AgentError>(stat)
    }
    .await;
    let stat = match validated {
        Ok(stat) => stat,
        Err(e) => return Err((clock, "validate", e)),
    };
    let intent = DumpIntent {
        pid: job.pid,
        start_ticks: stat.start_ticks,
        leave_running: job.leave_running,
        shell_job: stat.session != job.pid || stat.pgrp != job.pid,
        container_id: job.container_id.clone(),
        pod_uid: job.pod_uid.clone(),
        gpu_group: job.gpu_group.clone(),
        gpu_seat: job.gpu_seat.clone(),
        images_dir: parts.ram.partial_dir_of(&job.name),
    };
    let start = Start {
        name: job.name.clone(),
        driver: Driver::AgentCriu,
        intent,
        origin: crate::tenancy::Origin::NodeLocal,
        until: job.until,
        workload,
        clock,
    };
    // A failed start has abandoned itself and ended its clock's events in `run`'s stead.
    CheckpointMachine::begin(parts.clone(), start)
        .await
        .map_err(|e| {
            let clock = PhaseClock::new(
                job.name.as_str(),
                "checkpoint",
                parts.events.clone(),
                parts.metrics.clone(),
            );
            (clock, "criu_dump", e)
        })
}

/// The agent's driver: CUDA lock, CRIU dump (streamed into NVMe for a checkpoint asked for
/// NVMe or S3), then the machine stores and records.
async fn dump_and_store(
    parts: &NodeParts,
    job: &CheckpointJob,
    machine: &mut CheckpointMachine,
) -> Result<CheckpointRecord, (&'static str, AgentError)> {
    let name = job.name.clone();
    let tree = process::tree(job.pid);
    machine
        .lock_cuda(
            tree.clone(),
            TimeoutsConfig::of(parts.config.timeouts.cuda_ms),
        )
        .await
        .map_err(|e| ("cuda_checkpoint", e))?;
    if let Err(e) = failpoint("checkpoint.before_criu") {
        return Err(roll_back(machine, "criu_dump", e).await);
    }
    let partial = machine.images_dir().to_owned();
    let capture = match streaming::capture_target(parts, job.until) {
        Some(nvme) => match streaming::start_capture(nvme, &name, partial.clone()).await {
            Ok(capture) => Some(capture),
            Err(e) => return Err(roll_back(machine, "criu_dump", e).await),
        },
        None => None,
    };
    let timeouts = &parts.config.timeouts;
    let dump = Dump {
        pid: job.pid,
        images_dir: partial,
        log: parts.config.logs_dir().join(format!("{name}-dump.log")),
        leave_running: job.leave_running,
        shell_job: machine.intent().shell_job,
        timeout: job
            .dump_timeout
            .unwrap_or_else(|| TimeoutsConfig::of(timeouts.dump_ms)),
        stream_commit: capture.as_ref().map(|c| c.action_script().to_owned()),
    };
    let dumped = machine
        .clock
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
        return Err(roll_back(machine, "criu_dump", e).await);
    }
    machine.dumped(None).await.map_err(|e| ("criu_dump", e))?;
    failpoint("checkpoint.after_criu").map_err(|e| ("criu_dump", e))?;
    machine.release_gpus().await?;
    let stored = machine.store(streamed).await?;
    machine.record(stored, String::new()).map_err(|e| *e)
}

/// Abandons the checkpoint after `e` in `phase`; a CUDA rollback that failed too is added
/// to the error.
async fn roll_back(
    machine: &mut CheckpointMachine,
    phase: &'static str,
    e: AgentError,
) -> (&'static str, AgentError) {
    match machine.abandon(e.to_string()).await {
        Ok(()) => (phase, e),
        Err(resume_error) => (
            "cuda_resume",
            AgentError::Internal(format!("{e}; and the CUDA rollback failed: {resume_error}")),
        ),
    }
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
