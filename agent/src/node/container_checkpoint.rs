//! Container checkpoints driven by the shim: the shim's driver of the checkpoint machine
//! ([`crate::checkpoint_machine`]). The shim runs `runc checkpoint` itself; the machine does
//! what surrounds it, as for the agent's own CRIU. Begin: CUDA lock + checkpoint of the container's processes
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
use crate::catalog::CheckpointRecord;
use crate::checkpoint_machine::{CheckpointMachine, Driver, Start, Step};
use crate::config::TimeoutsConfig;
use crate::error::AgentError;
use crate::events::PhaseClock;
use crate::journal::DumpIntent;
use crate::process;
use crate::workload_state::WorkloadKey;

/// A container checkpoint between Begin and End.
#[derive(Debug)]
pub struct ShimCheckpoint {
    pub(super) request: pb::ContainerCheckpointBeginRequest,
    /// The checkpoint's state machine, driven by the shim.
    pub(super) machine: CheckpointMachine,
    began: Instant,
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
            let (asked, mut origin) = crate::request_check::container_checkpoint_begin(&request)?;
            self.parts.pods.complete(&mut origin);
            let awaited = self.awaited_containers.get(&request.container_id);
            let (name, until) = match (asked, awaited) {
                // This agent asked containerd for the checkpoint and promised its caller a name.
                (None, Some(awaited)) => (awaited.name.clone(), awaited.until),
                (None, None) => (container_name(&request.container_id)?, TierKind::Ram),
                (Some(name), _) => (name, TierKind::Ram),
            };
            self.ensure_name_unused(&name)?;
            self.reserve(&name)?;
            Ok((name, until, origin))
        })();
        let (name, until, origin) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        let parts = self.parts.clone();
        let pids = request.pids.clone();
        let processes: Vec<(i32, u64)> = request
            .pids
            .iter()
            .filter_map(|pid| Some((*pid, process::stat(*pid)?.start_ticks)))
            .collect();
        let start = Start {
            name: name.clone(),
            driver: Driver::ShimRunc,
            intent: DumpIntent {
                pid: processes.first().map_or(0, |p| p.0),
                start_ticks: processes.first().map_or(0, |p| p.1),
                leave_running: request.leave_running,
                shell_job: false,
                container_id: request.container_id.clone(),
                pod_uid: request.pod_uid.clone(),
                gpu_group: request.gpu_group.clone(),
                gpu_seat: request.gpu_seat.clone(),
                images_dir: parts.ram.partial_dir_of(&name),
            },
            origin,
            until,
            workload: self
                .workloads
                .channel(WorkloadKey::Container(request.container_id.clone())),
            clock: PhaseClock::new(
                name.as_str(),
                "checkpoint",
                parts.events.clone(),
                parts.metrics.clone(),
            ),
        };
        let lock_timeout = if request.cuda_timeout_ms > 0 {
            Duration::from_millis(request.cuda_timeout_ms)
        } else {
            TimeoutsConfig::of(parts.config.timeouts.cuda_ms)
        };
        Box::pin(
            async move {
                let mut machine = CheckpointMachine::begin(parts, start).await?;
                if let Err(e) = machine.lock_cuda(pids, lock_timeout).await {
                    machine.clock.failed("cuda_checkpoint", e.metric_label());
                    return Err(e);
                }
                Ok(machine)
            }
            .into_actor(self)
            .map(move |result, agent, ctx| {
                let machine = match result {
                    Ok(machine) => machine,
                    Err(e) => {
                        agent.busy.remove(&name);
                        return Err(e);
                    }
                };
                let lease = agent.grant_checkpoint_lease(ctx, &name);
                let reply = pb::ContainerCheckpointBeginReply {
                    checkpoint_ref: name.to_string(),
                    image_dir: machine.images_dir().display().to_string(),
                    cuda_pids: machine
                        .cuda_pids()
                        .iter()
                        .filter_map(|p| i32::try_from(*p).ok())
                        .collect(),
                    phases: phases_pb(&machine.clock.phases),
                    lease_ms: lease.millis(),
                };
                agent.shim_checkpoints.insert(
                    name.clone(),
                    ShimCheckpoint {
                        request,
                        machine,
                        began: Instant::now(),
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

impl Handler<ContainerCheckpointEnd> for NodeAgent {
    type Result = ResponseActFuture<Self, Result<pb::CheckpointReply, AgentError>>;

    fn handle(&mut self, msg: ContainerCheckpointEnd, _: &mut Self::Context) -> Self::Result {
        let request = msg.0;
        let found =
            crate::request_check::checkpoint_ref(&request.checkpoint_ref).and_then(|name| {
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
        if request.dumped && request.images_follow {
            return self.release_before_images(name, session, request.dump_millis);
        }
        let until = session.machine.until();
        Box::pin(
            async move {
                if request.dumped {
                    let took = Duration::from_millis(request.dump_millis);
                    finish(session, Some(took), String::new()).await.map(Some)
                } else {
                    roll_back(session, &request.failure).await.map(|()| None)
                }
            }
            .into_actor(self)
            .map(move |result, agent, ctx| {
                agent.busy.remove(&name);
                agent.refresh_tier_usage(ctx);
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
        Box::pin(
            async move {
                let machine = &mut session.machine;
                let released = match machine
                    .dumped(Some(Duration::from_millis(dump_millis)))
                    .await
                {
                    Ok(()) => machine.release_gpus().await,
                    Err(e) => Err(("criu_dump", e)),
                };
                if let Err((phase, e)) = released {
                    machine.clock.failed(phase, e.metric_label());
                    let _ = machine.abandon(e.to_string()).await;
                    // The GPU state of the container is not known after a failed release.
                    machine.workload_failed();
                    return Err(e);
                }
                Ok(session)
            }
            .into_actor(self)
            .map(move |result, agent, ctx| match result {
                Ok(mut session) => {
                    // The images are still to come: the shim gets a fresh lease for them.
                    session.lease = agent.grant_checkpoint_lease(ctx, &name);
                    let reply = pb::CheckpointReply {
                        checkpoint_ref: name.to_string(),
                        phases: phases_pb(&session.machine.clock.phases),
                        cuda_done: true,
                        criu_done: true,
                        ..Default::default()
                    };
                    agent.shim_checkpoints.insert(name, session);
                    Ok(reply)
                }
                Err(e) => {
                    agent.busy.remove(&name);
                    Err(e)
                }
            }),
        )
    }
}

/// The shim's dump failed (or, after an `images_follow` End, its images never came): the
/// machine gives the GPUs back, drops the partial images and journals why.
async fn roll_back(mut session: ShimCheckpoint, failure: &str) -> Result<(), AgentError> {
    let name = session.machine.name().clone();
    if session.machine.step() == Step::Released {
        tracing::warn!(checkpoint = %name, failure, "container images never arrived; dropped");
    } else {
        tracing::warn!(checkpoint = %name, failure, "container dump failed; resuming CUDA");
    }
    session
        .machine
        .abandon(format!("the shim's dump failed: {failure}"))
        .await
}

/// Finishes a dump the shim completed: the machine gives the GPUs back (unless an earlier
/// End or the lease expiry did), commits, digests and stores the images and assembles the
/// record; `took` is the dump's duration as the shim measured it, `note` goes into the
/// record (why it was finished other than by an End). Returns the record and the tiers
/// that hold it.
pub(super) async fn finish(
    mut session: ShimCheckpoint,
    took: Option<Duration>,
    note: String,
) -> Result<(CheckpointRecord, Vec<String>), AgentError> {
    let machine = &mut session.machine;
    let result = async {
        if machine.step() == Step::Locked {
            machine.dumped(took).await.map_err(|e| ("criu_dump", e))?;
            machine.release_gpus().await?;
        }
        let stored = machine.store(None).await?;
        let tiers = stored
            .foreground
            .kinds()
            .iter()
            .map(|k| k.as_str().to_owned())
            .collect();
        Ok((machine.record(stored, note).map_err(|e| *e)?, tiers))
    }
    .await;
    machine.finish(&result);
    if result.is_ok() {
        tracing::info!(checkpoint = %machine.name(), container = %session.request.container_id,
            took_ms = crate::events::millis(session.began.elapsed()), "container checkpoint stored");
    }
    result.map_err(|(_, e)| e)
}
