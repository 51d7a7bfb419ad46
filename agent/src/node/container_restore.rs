//! Container restores driven by the shim: the agent stages the images from the nearest tier
//! holding an intact copy (verified, as for any restore), the shim runs `runc restore`, and
//! the agent then restores and unlocks CUDA in the restored processes. The checkpoint stays
//! reserved in between, under a lease ([`super::shim_lease`]): a Stage whose End never comes
//! is settled by [`super::lease_expiry`]. An End that comes after that still unlocks the
//! restored processes, which would otherwise stay CUDA-locked.

use actix::prelude::*;
use kybernate_dataplane::CheckpointName;
use kybernate_proto::agent::v1 as pb;

use super::shim_lease::{Lease, RestoreLeaseExpired};
use super::{phases_pb, NodeAgent};
use crate::bandwidth::Urgency;
use crate::blocking_work::blocking;
use crate::catalog::CheckpointRecord;
use crate::cuda::{CheckRestore, RestoreAndUnlock};
use crate::error::AgentError;
use crate::events::PhaseClock;
use crate::journal::Transition;
use crate::restore::{stage, Staged};
use crate::workload_state::WorkloadState;

/// A container restore between Stage and End.
#[derive(Debug)]
pub struct ShimRestore {
    pub(super) record: CheckpointRecord,
    staged: Staged,
    /// The lease the shim holds; an End must come before it runs out.
    pub(super) lease: Lease,
    /// The workload's state before the Stage, for a restore that does not happen.
    pub(super) before: Option<WorkloadState>,
}

/// Stage a checkpoint's images for the shim's `runc restore`.
#[derive(Debug, Message)]
#[rtype(result = "Result<pb::ContainerRestoreStageReply, AgentError>")]
pub struct ContainerRestoreStage(pub pb::ContainerRestoreStageRequest);

/// After the shim's `runc restore`: CUDA restore + unlock, and release the staged images.
#[derive(Debug, Message)]
#[rtype(result = "Result<pb::ContainerRestoreEndReply, AgentError>")]
pub struct ContainerRestoreEnd(pub pb::ContainerRestoreEndRequest);

impl Handler<ContainerRestoreStage> for NodeAgent {
    type Result = ResponseActFuture<Self, Result<pb::ContainerRestoreStageReply, AgentError>>;

    fn handle(&mut self, msg: ContainerRestoreStage, ctx: &mut Self::Context) -> Self::Result {
        if let Some(name) = self.unknown_but_shared(&msg.0.checkpoint_ref) {
            return self.adopt_then(name, msg, ctx);
        }
        let request = msg.0;
        let from = crate::request_check::source_tier(&request.from_tier);
        let prepared = from.and_then(|from| {
            let (name, record) = self.record(&request.checkpoint_ref)?;
            let target = request.target.as_ref();
            self.admit_restore(&name, &record, target.map(|p| p.namespace.as_str()), target)?;
            self.reserve(&name)?;
            Ok((name, record, from))
        });
        let (name, record, from) = match prepared {
            Ok(p) => p,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        let parts = self.parts.clone();
        let job_name = name.clone();
        let container_id = request.container_id.clone();
        Box::pin(
            async move {
                let mut clock = PhaseClock::new(
                    job_name.as_str(),
                    "restore",
                    parts.events.clone(),
                    parts.metrics.clone(),
                );
                if let Some(recorded) = &record.gpu {
                    let check = CheckRestore {
                        recorded: recorded.clone(),
                    };
                    let checked = clock
                        .run("cuda_check", async {
                            parts
                                .cuda
                                .send(check)
                                .await?
                                .map_err(|source| AgentError::Cuda {
                                    name: record.name.clone(),
                                    source,
                                })
                        })
                        .await;
                    if let Err(e) = checked {
                        clock.failed("cuda_check", e.metric_label());
                        return Err(e);
                    }
                }
                let candidates = from.map_or_else(|| parts.tiers.kinds(), |kind| vec![kind]);
                let staged = stage(
                    &parts,
                    &record,
                    &job_name,
                    &candidates,
                    &mut clock,
                    Urgency::Foreground,
                );
                let staged = staged.await.and_then(|staged| {
                    // Journaled before the shim may restore: an agent that dies before the
                    // End must know a restore may have brought processes back.
                    parts
                        .journal
                        .append(
                            job_name.as_str(),
                            Transition::RestoreStaged {
                                container_id,
                                images_dir: staged.dir.clone(),
                            },
                        )
                        .map_err(|e| AgentError::Internal(e.to_string()))?;
                    Ok(staged)
                });
                match staged {
                    Ok(staged) => Ok((record, staged, clock.phases.clone())),
                    Err(e) => {
                        clock.failed("stage", e.metric_label());
                        Err(e)
                    }
                }
            }
            .into_actor(self)
            .map(move |result, agent, ctx| {
                let (record, staged, phases) = match result {
                    Ok(r) => r,
                    Err(e) => {
                        agent.busy.remove(&name);
                        return Err(e);
                    }
                };
                let lease = agent.leases.grant(agent.parts.config.timeouts.shim_lease());
                ctx.notify_later(
                    RestoreLeaseExpired {
                        name: name.clone(),
                        lease,
                    },
                    lease.length,
                );
                let before = agent
                    .workloads
                    .set_state_of(&record, WorkloadState::Restoring);
                agent.expired_restores.remove(&name);
                let reply = pb::ContainerRestoreStageReply {
                    image_dir: staged.dir.display().to_string(),
                    source_tier: staged.tier.as_str().to_owned(),
                    phases: phases_pb(&phases),
                    lease_ms: lease.millis(),
                };
                agent.shim_restores.insert(
                    name.clone(),
                    ShimRestore {
                        record,
                        staged,
                        lease,
                        before,
                    },
                );
                Ok(reply)
            }),
        )
    }
}

impl Handler<ContainerRestoreEnd> for NodeAgent {
    type Result = ResponseActFuture<Self, Result<pb::ContainerRestoreEndReply, AgentError>>;

    fn handle(&mut self, msg: ContainerRestoreEnd, _: &mut Self::Context) -> Self::Result {
        let request = msg.0;
        let found = CheckpointName::new(&request.checkpoint_ref)
            .map_err(|e| Err(AgentError::from(e)))
            .and_then(|name| match self.shim_restores.remove(&name) {
                Some(session) => Ok((name, session)),
                None => Err(Ok(name)),
            });
        let (name, session) = match found {
            Ok(found) => found,
            Err(Ok(name)) => return self.end_after_lease(name, request),
            Err(Err(e)) => return Box::pin(actix::fut::ready(Err(e))),
        };
        let parts = self.parts.clone();
        let (stored, before) = (session.record.clone(), session.before);
        Box::pin(
            async move {
                let ShimRestore { record, staged, .. } = session;
                // Dropping the staged copy removes its scratch directory: file work, off
                // the agent's thread.
                if !request.restored {
                    let _ = blocking(move || drop(staged)).await;
                    parts
                        .journal
                        .note_off_thread(&record.name, Transition::RestoreEnded { ok: false })
                        .await;
                    return Ok(Vec::new());
                }
                // Journaled before the unlock: an agent that dies first leaves the restored
                // processes CUDA-locked, and recovery unlocks exactly these.
                parts
                    .journal
                    .note_off_thread(
                        &record.name,
                        Transition::RestoreRan {
                            pids: request.pids.clone(),
                        },
                    )
                    .await;
                crate::failpoints::failpoint("container_restore.before_cuda_restore")?;
                let mut clock = PhaseClock::new(
                    &record.name,
                    "restore",
                    parts.events.clone(),
                    parts.metrics.clone(),
                );
                let unlock = RestoreAndUnlock {
                    pids: request.pids.clone(),
                    recorded: record.gpu.clone(),
                };
                let report = clock
                    .run("cuda_restore", async {
                        parts
                            .cuda
                            .send(unlock)
                            .await?
                            .map_err(|source| AgentError::Cuda {
                                name: record.name.clone(),
                                source,
                            })
                    })
                    .await;
                let _ = blocking(move || drop(staged)).await;
                parts
                    .journal
                    .note_off_thread(
                        &record.name,
                        Transition::RestoreEnded { ok: report.is_ok() },
                    )
                    .await;
                match report {
                    Ok(report) => {
                        if !report.processes.is_empty() {
                            clock.record("cuda_unlock", report.timings.unlock);
                        }
                        clock.succeeded();
                        Ok(clock.phases.clone())
                    }
                    Err(e) => {
                        clock.failed("cuda_restore", e.metric_label());
                        Err(e)
                    }
                }
            }
            .into_actor(self)
            .map(move |result, agent, ctx| {
                agent.busy.remove(&name);
                agent.refresh_tier_usage(ctx);
                if matches!(&result, Ok(phases) if !phases.is_empty()) {
                    agent
                        .workloads
                        .set_state_of(&stored, WorkloadState::Running);
                } else {
                    agent.workloads.put_back_state_of(&stored, before);
                }
                let phases = result?;
                Ok(pb::ContainerRestoreEndReply {
                    phases: phases_pb(&phases),
                })
            }),
        )
    }
}

impl NodeAgent {
    /// An End whose restore is not (or no longer) staged: after its lease ran out the staged
    /// images are gone, but processes `runc restore` brought back before that are still
    /// CUDA-locked, so they are restored and unlocked all the same (once, and only for a
    /// restore whose lease ran out: an End nobody staged unlocks nothing).
    fn end_after_lease(
        &mut self,
        name: CheckpointName,
        request: pb::ContainerRestoreEndRequest,
    ) -> ResponseActFuture<Self, Result<pb::ContainerRestoreEndReply, AgentError>> {
        let not_staged = || {
            AgentError::NotFound(format!(
                "{name} (no container restore in progress: it was never staged, already \
                 ended, or its lease ran out)"
            ))
        };
        let expired = request.restored && self.expired_restores.remove(&name);
        let record = match self.catalog.get(&name) {
            Some(record) if request.restored && expired => record.clone(),
            _ => return Box::pin(actix::fut::ready(Err(not_staged()))),
        };
        tracing::warn!(checkpoint = %name, pids = ?request.pids,
            "restore End after its lease ran out; unlocking the restored processes anyway");
        let parts = self.parts.clone();
        Box::pin(
            async move {
                let unlock = RestoreAndUnlock {
                    pids: request.pids,
                    recorded: record.gpu.clone(),
                };
                let mut clock = PhaseClock::new(
                    &record.name,
                    "restore",
                    parts.events.clone(),
                    parts.metrics.clone(),
                );
                clock
                    .run("cuda_restore", async {
                        parts
                            .cuda
                            .send(unlock)
                            .await?
                            .map_err(|source| AgentError::Cuda {
                                name: record.name.clone(),
                                source,
                            })
                    })
                    .await?;
                Ok::<_, AgentError>(pb::ContainerRestoreEndReply {
                    phases: phases_pb(&clock.phases),
                })
            }
            .into_actor(self),
        )
    }
}
