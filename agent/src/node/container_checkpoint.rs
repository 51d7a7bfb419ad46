//! Container checkpoints driven by the shim: the shim runs `runc checkpoint` itself, the
//! agent does what surrounds it. Begin: CUDA lock + checkpoint of the container's processes
//! and an image directory in the RAM tier. End: commit and digest into the RAM tier, store
//! into the tiers up to the one the checkpoint asked for, record it in the catalog and drain
//! the slower tiers in the background — or, when the dump failed, CUDA resume and drop the
//! partial images. Between the two the checkpoint name stays reserved, so nothing else can
//! touch it. A checkpoint containerd asked for on its own (`ctr`, the CRI) asks for RAM, as
//! containerd stores its own copy; its shim dumps into containerd's directory and ends in two
//! steps: `images_follow` releases CUDA at once, and a second End brings the images once
//! containerd has resumed the task. Begin journals the dump's intent before the shim may
//! dump, and holds a lease ([`super::shim_lease`]): an End that never comes is settled by
//! [`super::lease_expiry`].

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use kybernate_dataplane::{CheckpointName, TierKind};
use kybernate_proto::agent::v1 as pb;

use super::shim_lease::{CheckpointLeaseExpired, Lease};
use super::{completed_reply, phases_pb, NodeAgent};
use crate::catalog::{CheckpointRecord, Phase};
use crate::checkpoint::{blocking, commit_and_digest};
use crate::config::TimeoutsConfig;
use crate::cuda::{CudaPhaseError, LockAndCheckpoint, Release};
use crate::drain;
use crate::error::{tier_list, AgentError};
use crate::events::PhaseClock;
use crate::journal::{DumpIntent, Transition};
use crate::node_parts::NodeParts;
use crate::process;
use crate::tenancy::Origin;
use crate::workload_state::WorkloadState;
use kybernate_cuda::GpuFingerprint;

/// A container checkpoint between Begin and End.
#[derive(Debug)]
pub struct ShimCheckpoint {
    pub(super) request: pb::ContainerCheckpointBeginRequest,
    cuda_pids: Vec<u32>,
    fingerprint: Option<GpuFingerprint>,
    phases: Vec<Phase>,
    began: Instant,
    /// The slowest tier stored into before End replies.
    pub(super) until: TierKind,
    /// CUDA was released by an End whose images followed later.
    pub(super) cuda_released: bool,
    /// The container's processes as Begin found them (PID, start time in clock ticks), to
    /// tell whether the workload still runs when the lease runs out.
    pub(super) processes: Vec<(i32, u64)>,
    /// The lease the shim holds; an End must come before it runs out.
    pub(super) lease: Lease,
}

impl ShimCheckpoint {
    /// Whether any process of the container Begin saw still runs.
    pub(super) fn workload_runs(&self) -> bool {
        self.processes
            .iter()
            .any(|(pid, ticks)| process::still_runs(*pid, *ticks))
    }
}

/// Begin a shim-driven container checkpoint.
#[derive(Debug, Message)]
#[rtype(result = "Result<pb::ContainerCheckpointBeginReply, AgentError>")]
pub struct ContainerCheckpointBegin(pub pb::ContainerCheckpointBeginRequest);

/// End a shim-driven container checkpoint (commit or roll back).
#[derive(Debug, Message)]
#[rtype(result = "Result<pb::CheckpointReply, AgentError>")]
pub struct ContainerCheckpointEnd(pub pb::ContainerCheckpointEndRequest);

/// A fresh checkpoint name for a container.
pub(super) fn container_name(container_id: &str) -> Result<CheckpointName, AgentError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let short: String = container_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(40)
        .collect();
    let suffix = rand::random::<u16>();
    Ok(CheckpointName::new(&format!("{short}-{now}-{suffix:04x}"))?)
}

impl Handler<ContainerCheckpointBegin> for NodeAgent {
    type Result = ResponseActFuture<Self, Result<pb::ContainerCheckpointBeginReply, AgentError>>;

    fn handle(&mut self, msg: ContainerCheckpointBegin, _: &mut Self::Context) -> Self::Result {
        let request = msg.0;
        let prepared = (|| {
            if request.container_id.is_empty() || request.pids.is_empty() {
                return Err(AgentError::InvalidRequest(
                    "a container checkpoint needs the container id and its pids".into(),
                ));
            }
            Origin::of_container(request.pod.as_ref()).map_err(|e| {
                AgentError::InvalidRequest(format!(
                    "container {}: the pod named by its CRI annotations is malformed: {e}",
                    request.container_id
                ))
            })?;
            let awaited = self.awaited_containers.get(&request.container_id);
            let (name, until) = match (request.name.is_empty(), awaited) {
                // This agent asked containerd for the checkpoint and promised its caller a name.
                (true, Some(awaited)) => (awaited.name.clone(), awaited.until),
                (true, None) => (container_name(&request.container_id)?, TierKind::Ram),
                (false, _) => (CheckpointName::new(&request.name)?, TierKind::Ram),
            };
            self.ensure_name_unused(&name)?;
            self.reserve(&name)?;
            Ok((name, until))
        })();
        let (name, until) = match prepared {
            Ok(name) => name,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        let parts = self.parts.clone();
        let job_name = name.clone();
        let pids = request.pids.clone();
        let processes: Vec<(i32, u64)> = request
            .pids
            .iter()
            .filter_map(|pid| Some((*pid, process::stat(*pid)?.start_ticks)))
            .collect();
        let intent = DumpIntent {
            pid: processes.first().map_or(0, |p| p.0),
            start_ticks: processes.first().map_or(0, |p| p.1),
            leave_running: request.leave_running,
            shell_job: false,
            container_id: request.container_id.clone(),
            pod_uid: request.pod_uid.clone(),
            gpu_group: request.gpu_group.clone(),
            gpu_seat: request.gpu_seat.clone(),
            images_dir: parts.ram.partial_dir_of(&name),
        };
        let lock_timeout = if request.cuda_timeout_ms > 0 {
            Duration::from_millis(request.cuda_timeout_ms)
        } else {
            TimeoutsConfig::of(parts.config.timeouts.cuda_ms)
        };
        Box::pin(
            async move {
                let mut clock = PhaseClock::new(
                    job_name.as_str(),
                    "checkpoint",
                    parts.events.clone(),
                    parts.metrics.clone(),
                );
                let lock = LockAndCheckpoint {
                    name: job_name.to_string(),
                    pids,
                    lock_timeout,
                };
                let held = clock
                    .run("cuda_checkpoint", async {
                        parts
                            .cuda
                            .send(lock)
                            .await?
                            .map_err(|source| AgentError::Cuda {
                                name: job_name.to_string(),
                                source,
                            })
                    })
                    .await;
                let held = match held {
                    Ok(held) => held,
                    Err(e) => {
                        clock.failed("cuda_checkpoint", e.metric_label());
                        return Err(e);
                    }
                };
                let partial = intent.images_dir.clone();
                let (dir, journal, entry) =
                    (partial.clone(), parts.journal.clone(), job_name.clone());
                let made = blocking(move || {
                    match std::fs::remove_dir_all(&dir) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                        _ => std::fs::create_dir_all(&dir),
                    }
                    .map_err(|e| {
                        AgentError::Internal(format!("cannot prepare {}: {e}", dir.display()))
                    })?;
                    // Journaled before the shim may dump: a stop-mode dump ends the
                    // container, and an agent that crashes after it must find out whose
                    // images these are.
                    journal
                        .append(entry.as_str(), Transition::DumpIntent(intent))
                        .map_err(|e| AgentError::Internal(e.to_string()))
                })
                .await
                .and_then(|made| made);
                if let Err(e) = made {
                    let _ = parts.cuda.send(release(&job_name, false)).await;
                    let _ = std::fs::remove_dir(&partial);
                    return Err(e);
                }
                Ok((held, partial, clock.phases.clone()))
            }
            .into_actor(self)
            .map(move |result, agent, ctx| {
                let (held, partial, phases) = match result {
                    Ok(r) => r,
                    Err(e) => {
                        agent.busy.remove(&name);
                        return Err(e);
                    }
                };
                let lease = agent.grant_checkpoint_lease(ctx, &name);
                agent.set_container_state(&request.container_id, WorkloadState::Freezing);
                let reply = pb::ContainerCheckpointBeginReply {
                    checkpoint_ref: name.to_string(),
                    image_dir: partial.display().to_string(),
                    cuda_pids: held
                        .cuda_pids
                        .iter()
                        .filter_map(|p| i32::try_from(*p).ok())
                        .collect(),
                    phases: phases_pb(&phases),
                    lease_ms: lease.millis(),
                };
                agent.shim_checkpoints.insert(
                    name.clone(),
                    ShimCheckpoint {
                        request,
                        cuda_pids: held.cuda_pids,
                        fingerprint: held.fingerprint,
                        phases,
                        began: Instant::now(),
                        until,
                        cuda_released: false,
                        processes,
                        lease,
                    },
                );
                Ok(reply)
            }),
        )
    }
}

impl NodeAgent {
    /// Grants the shim a lease on checkpoint `name` and arms its expiry.
    fn grant_checkpoint_lease(&mut self, ctx: &mut Context<Self>, name: &CheckpointName) -> Lease {
        let lease = self.leases.grant(self.parts.config.timeouts.shim_lease());
        ctx.notify_later(
            CheckpointLeaseExpired {
                name: name.clone(),
                lease,
            },
            lease.length,
        );
        lease
    }
}

pub(super) fn release(name: &CheckpointName, keep_checkpointed: bool) -> Release {
    Release {
        name: name.to_string(),
        keep_checkpointed,
    }
}

impl Handler<ContainerCheckpointEnd> for NodeAgent {
    type Result = ResponseActFuture<Self, Result<pb::CheckpointReply, AgentError>>;

    fn handle(&mut self, msg: ContainerCheckpointEnd, _: &mut Self::Context) -> Self::Result {
        let request = msg.0;
        let found = CheckpointName::new(&request.checkpoint_ref)
            .map_err(AgentError::from)
            .and_then(|name| {
                self.shim_checkpoints
                    .remove(&name)
                    .map(|session| (name.clone(), session))
                    .ok_or_else(|| {
                        AgentError::NotFound(format!(
                            "{name} (no container checkpoint in progress: it never began, \
                             already ended, or its lease ran out)"
                        ))
                    })
            });
        let (name, session) = match found {
            Ok(found) => found,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        let container = session.request.container_id.clone();
        if request.dumped {
            self.set_container_state(&container, WorkloadState::Dumped);
        }
        if request.dumped && request.images_follow {
            return self.release_before_images(name, session, request.dump_millis);
        }
        let parts = self.parts.clone();
        let job_name = name.clone();
        let until = session.until;
        let leave_running = session.request.leave_running;
        Box::pin(
            async move {
                if request.dumped {
                    parts.journal.note(job_name.as_str(), Transition::Dumped);
                    finish(
                        &parts,
                        &job_name,
                        session,
                        request.dump_millis,
                        String::new(),
                    )
                    .await
                    .map(Some)
                } else {
                    roll_back(&parts, &job_name, &request.failure, session.cuda_released)
                        .await
                        .map(|()| None)
                }
            }
            .into_actor(self)
            .map(move |result, agent, ctx| {
                agent.busy.remove(&name);
                agent.refresh_tier_usage(ctx);
                agent.set_container_state(
                    &container,
                    match &result {
                        Ok(None) => WorkloadState::Running,
                        Ok(Some(_)) | Err(AgentError::HeldPartially { .. }) if leave_running => {
                            WorkloadState::Running
                        }
                        Ok(Some(_)) | Err(AgentError::HeldPartially { .. }) => {
                            WorkloadState::Stored
                        }
                        Err(_) => WorkloadState::Failed,
                    },
                );
                if let Err(AgentError::HeldPartially { record, .. }) = &result {
                    agent.keep_record(ctx, &name, record)?;
                }
                let Some((record, tiers)) = result? else {
                    return Ok(pb::CheckpointReply {
                        checkpoint_ref: name.to_string(),
                        cuda_done: false,
                        criu_done: false,
                        ..Default::default()
                    });
                };
                agent.keep_record(ctx, &name, &record)?;
                agent.last_used.insert(name.clone(), record.created_unix);
                agent.drain_later(ctx, &name, record.files.clone(), until);
                agent.enforce_budgets(ctx);
                Ok(completed_reply(&record, tiers))
            }),
        )
    }
}

impl NodeAgent {
    /// The first of two Ends (`images_follow`): the dump is done, so CUDA is released now;
    /// the checkpoint stays open and reserved until the images are in the RAM tier.
    fn release_before_images(
        &mut self,
        name: CheckpointName,
        mut session: ShimCheckpoint,
        dump_millis: u64,
    ) -> ResponseActFuture<Self, Result<pb::CheckpointReply, AgentError>> {
        let parts = self.parts.clone();
        let job_name = name.clone();
        let phases = session.phases.clone();
        let leave_running = session.request.leave_running;
        Box::pin(
            async move {
                let mut clock = PhaseClock::new(
                    job_name.as_str(),
                    "checkpoint",
                    parts.events.clone(),
                    parts.metrics.clone(),
                );
                clock.phases = phases;
                clock.record("criu_dump", Duration::from_millis(dump_millis));
                parts.journal.note(job_name.as_str(), Transition::Dumped);
                match release_cuda(&parts, &mut clock, &job_name, leave_running).await {
                    Ok(()) => Ok(clock.phases),
                    Err((phase, e)) => {
                        clock.failed(phase, e.metric_label());
                        let partial = parts.ram.partial_dir_of(&job_name);
                        let _ = blocking(move || std::fs::remove_dir_all(partial)).await;
                        parts.journal.note(
                            job_name.as_str(),
                            Transition::Abandoned {
                                reason: e.to_string(),
                            },
                        );
                        Err(e)
                    }
                }
            }
            .into_actor(self)
            .map(move |result, agent, ctx| match result {
                Ok(phases) => {
                    // The images are still to come: the shim gets a fresh lease for them.
                    session.lease = agent.grant_checkpoint_lease(ctx, &name);
                    let reply = pb::CheckpointReply {
                        checkpoint_ref: name.to_string(),
                        phases: phases_pb(&phases),
                        cuda_done: true,
                        criu_done: true,
                        ..Default::default()
                    };
                    session.phases = phases;
                    session.cuda_released = true;
                    agent.shim_checkpoints.insert(name, session);
                    Ok(reply)
                }
                Err(e) => {
                    agent.busy.remove(&name);
                    agent.set_container_state(&session.request.container_id, WorkloadState::Failed);
                    Err(e)
                }
            }),
        )
    }
}

/// Gives the container's GPUs back after its dump: CUDA resume (leave-running) or release.
pub(super) async fn release_cuda(
    parts: &NodeParts,
    clock: &mut PhaseClock,
    name: &CheckpointName,
    leave_running: bool,
) -> Result<(), (&'static str, AgentError)> {
    let phase = if leave_running {
        "cuda_resume"
    } else {
        "cuda_release"
    };
    clock
        .run(phase, async {
            parts
                .cuda
                .send(release(name, !leave_running))
                .await?
                .map_err(|source| AgentError::Cuda {
                    name: name.to_string(),
                    source,
                })
        })
        .await
        .map(|_| ())
        .map_err(|e| (phase, e))
}

async fn roll_back(
    parts: &NodeParts,
    name: &CheckpointName,
    failure: &str,
    cuda_released: bool,
) -> Result<(), AgentError> {
    let partial = parts.ram.partial_dir_of(name);
    let _ = blocking(move || std::fs::remove_dir_all(partial)).await;
    parts.journal.note(
        name.as_str(),
        Transition::Abandoned {
            reason: format!("the shim's dump failed: {failure}"),
        },
    );
    if cuda_released {
        tracing::warn!(checkpoint = %name, failure, "container images never arrived; dropped");
        return Ok(());
    }
    tracing::warn!(checkpoint = %name, failure, "container dump failed; resuming CUDA");
    parts
        .cuda
        .send(release(name, false))
        .await?
        .map(|_| ())
        .map_err(|source: CudaPhaseError| AgentError::Cuda {
            name: name.to_string(),
            source,
        })
}

/// Commits, digests and stores the images of a dump the shim finished, after giving the
/// GPUs back; `note` goes into the record (why it was finished other than by an End).
pub(super) async fn finish(
    parts: &NodeParts,
    name: &CheckpointName,
    session: ShimCheckpoint,
    dump_millis: u64,
    note: String,
) -> Result<(CheckpointRecord, Vec<String>), AgentError> {
    let mut clock = PhaseClock::new(
        name.as_str(),
        "checkpoint",
        parts.events.clone(),
        parts.metrics.clone(),
    );
    clock.phases = session.phases.clone();
    let leave_running = session.request.leave_running;
    if !session.cuda_released {
        clock.record("criu_dump", Duration::from_millis(dump_millis));
        if let Err((phase, e)) = release_cuda(parts, &mut clock, name, leave_running).await {
            clock.failed(phase, e.metric_label());
            return Err(e);
        }
    }
    let (ram_report, files) = match commit_and_digest(parts, &mut clock, name).await {
        Ok(committed) => committed,
        Err((phase, e)) => {
            clock.failed(phase, e.metric_label());
            return Err(e);
        }
    };
    let foreground =
        drain::store_foreground(parts, &mut clock, name, &files, ram_report, session.until).await;
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
    parts
        .metrics
        .stored(ram_report.raw_bytes, &[("ram", ram_report.stored_bytes)]);
    tracing::info!(checkpoint = %name, container = %session.request.container_id,
        took_ms = crate::events::millis(session.began.elapsed()), "container checkpoint stored");
    let request = session.request;
    // Validated at Begin; node-local, the strictest origin, if it were not.
    let mut origin = Origin::of_container(request.pod.as_ref()).unwrap_or_default();
    parts.pods.complete(&mut origin);
    let record = CheckpointRecord {
        name: name.to_string(),
        pid: request.pids.first().copied().unwrap_or_default(),
        container_id: request.container_id,
        pod_uid: request.pod_uid,
        gpu_group: request.gpu_group,
        gpu_seat: request.gpu_seat,
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        leave_running,
        shell_job: false,
        phases: clock.phases.clone(),
        raw_bytes: ram_report.raw_bytes,
        stored_bytes: foreground.stored_bytes(),
        files,
        gpu: if session.cuda_pids.is_empty() {
            None
        } else {
            session.fingerprint
        },
        note,
        origin,
    };
    let held = tier_list(&foreground.kinds());
    match foreground.failure {
        None => {
            clock.succeeded();
            let tiers = foreground
                .kinds()
                .iter()
                .map(|k| k.as_str().to_owned())
                .collect();
            Ok((record, tiers))
        }
        // The images are the container's state (its only state when it exited): keep the
        // checkpoint in the tiers that hold it and report what failed.
        Some((phase, source)) => {
            clock.failed(phase, source.metric_label());
            Err(AgentError::HeldPartially {
                tiers: held,
                record: Box::new(record),
                source: Box::new(source),
            })
        }
    }
}
