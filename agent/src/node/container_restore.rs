//! Container restores driven by the shim: the agent stages the images from the nearest tier
//! holding an intact copy (verified, as for any restore), the shim runs `runc restore`, and
//! the agent then restores and unlocks CUDA in the restored processes. The checkpoint stays
//! reserved in between.

use actix::prelude::*;
use kybernate_dataplane::{CheckpointName, TierKind};
use kybernate_proto::agent::v1 as pb;

use super::{phases_pb, NodeAgent};
use crate::bandwidth::Urgency;
use crate::catalog::CheckpointRecord;
use crate::cuda::{CheckRestore, RestoreAndUnlock};
use crate::error::AgentError;
use crate::events::PhaseClock;
use crate::restore::{stage, Staged};
use crate::tenancy::check_restore;

/// A container restore between Stage and End.
#[derive(Debug)]
pub struct ShimRestore {
    record: CheckpointRecord,
    staged: Staged,
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
        let from = match request.from_tier.as_str() {
            "" => Ok(None),
            tier => TierKind::parse(tier).map(Some).ok_or_else(|| {
                AgentError::InvalidRequest(format!("unknown tier {tier:?}: use ram, nvme or s3"))
            }),
        };
        let prepared = from.and_then(|from| {
            let (name, record) = self.record(&request.checkpoint_ref)?;
            check_restore(name.as_str(), &record.origin, request.target.as_ref()).inspect_err(
                |refused| {
                    self.parts
                        .metrics
                        .failure("restore", "tenancy", "refused_tenant");
                    tracing::warn!(checkpoint = %name, container = %request.container_id,
                        %refused, "refused a container restore across tenants");
                },
            )?;
            self.reserve(&name)?;
            Ok((name, record, from))
        });
        let (name, record, from) = match prepared {
            Ok(p) => p,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        let parts = self.parts.clone();
        let job_name = name.clone();
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
                match staged.await {
                    Ok(staged) => Ok((record, staged, clock.phases.clone())),
                    Err(e) => {
                        clock.failed("stage", e.metric_label());
                        Err(e)
                    }
                }
            }
            .into_actor(self)
            .map(move |result, agent, _| {
                let (record, staged, phases) = match result {
                    Ok(r) => r,
                    Err(e) => {
                        agent.busy.remove(&name);
                        return Err(e);
                    }
                };
                let reply = pb::ContainerRestoreStageReply {
                    image_dir: staged.dir.display().to_string(),
                    source_tier: staged.tier.as_str().to_owned(),
                    phases: phases_pb(&phases),
                };
                agent
                    .shim_restores
                    .insert(name.clone(), ShimRestore { record, staged });
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
            .map_err(AgentError::from)
            .and_then(|name| {
                self.shim_restores
                    .remove(&name)
                    .map(|session| (name.clone(), session))
                    .ok_or_else(|| {
                        AgentError::NotFound(format!("{name} (no container restore in progress)"))
                    })
            });
        let (name, session) = match found {
            Ok(found) => found,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        let parts = self.parts.clone();
        Box::pin(
            async move {
                let ShimRestore { record, staged } = session;
                if !request.restored {
                    drop(staged);
                    return Ok(Vec::new());
                }
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
                drop(staged);
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
                let phases = result?;
                Ok(pb::ContainerRestoreEndReply {
                    phases: phases_pb(&phases),
                })
            }),
        )
    }
}
