//! The node agent actor: the single entry point for requests. It keeps the checkpoint catalog,
//! routes each operation to the workload's container actor and answers queries.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use kybernate_dataplane::{CheckpointName, TierKind};
use kybernate_proto::agent::v1 as pb;

use crate::catalog::{Catalog, CheckpointRecord, Phase};
use crate::checkpoint::CheckpointJob;
use crate::container::{ContainerActor, GetState, RunCheckpoint, RunRestore};
use crate::error::AgentError;
use crate::node_parts::NodeParts;
use crate::tiers::{self, Remove, UsedBytes};

mod container_checkpoint;
mod container_restore;
pub use container_checkpoint::{ContainerCheckpointBegin, ContainerCheckpointEnd};
pub use container_restore::{ContainerRestoreEnd, ContainerRestoreStage};

/// The node agent.
#[derive(Debug)]
pub struct NodeAgent {
    parts: NodeParts,
    catalog: Catalog,
    workloads: HashMap<i32, Addr<ContainerActor>>,
    busy: HashSet<CheckpointName>,
    shim_checkpoints: HashMap<CheckpointName, container_checkpoint::ShimCheckpoint>,
    shim_restores: HashMap<CheckpointName, container_restore::ShimRestore>,
}

impl NodeAgent {
    /// An agent serving `catalog` with the node's actors.
    pub fn new(parts: NodeParts, catalog: Catalog) -> Self {
        Self {
            parts,
            catalog,
            workloads: HashMap::new(),
            busy: HashSet::new(),
            shim_checkpoints: HashMap::new(),
            shim_restores: HashMap::new(),
        }
    }

    fn workload(&mut self, pid: i32) -> Addr<ContainerActor> {
        let parts = self.parts.clone();
        self.workloads
            .entry(pid)
            .or_insert_with(|| ContainerActor::new(parts).start())
            .clone()
    }

    fn reserve(&mut self, name: &CheckpointName) -> Result<(), AgentError> {
        if self.busy.contains(name) {
            return Err(AgentError::Busy(name.to_string()));
        }
        self.busy.insert(name.clone());
        Ok(())
    }

    fn checkpoint_job(&self, req: pb::CheckpointRequest) -> Result<CheckpointJob, AgentError> {
        if !req.container_id.is_empty() {
            return Err(AgentError::InvalidRequest(format!(
                "container {} must be checkpointed through containerd and the kybernate shim; \
                 this call takes the PID of a bare process tree",
                req.container_id
            )));
        }
        let name = if req.name.is_empty() {
            generated_name(req.pid)
        } else {
            CheckpointName::new(&req.name)?
        };
        if self.catalog.get(&name).is_some() {
            return Err(AgentError::AlreadyExists(name.to_string()));
        }
        Ok(CheckpointJob {
            name,
            pid: req.pid,
            leave_running: req.leave_running,
            dump_timeout: (req.timeout_ms > 0).then(|| Duration::from_millis(req.timeout_ms)),
            container_id: req.container_id,
            pod_uid: req.pod_uid,
            gpu_group: req.gpu_group,
            gpu_seat: req.gpu_seat,
        })
    }

    fn record(
        &self,
        checkpoint_ref: &str,
    ) -> Result<(CheckpointName, CheckpointRecord), AgentError> {
        let name = CheckpointName::new(checkpoint_ref)?;
        let record = self
            .catalog
            .get(&name)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(name.to_string()))?;
        Ok((name, record))
    }

    fn refresh_tier_usage(&self, ctx: &mut Context<Self>) {
        for (kind, tier) in self.parts.tiers.actors.clone() {
            let metrics = self.parts.metrics.clone();
            ctx.spawn(
                async move {
                    if let Ok(Ok(bytes)) = tier.send(UsedBytes).await {
                        metrics.tier_used(kind.as_str(), bytes);
                    }
                }
                .into_actor(self),
            );
        }
    }
}

impl Actor for NodeAgent {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.refresh_tier_usage(ctx);
    }
}

fn generated_name(pid: i32) -> CheckpointName {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let suffix = rand::random::<u16>();
    CheckpointName::new(&format!("pid{pid}-{now}-{suffix:04x}"))
        .unwrap_or_else(|_| unreachable!("generated names only use valid characters"))
}

fn phases_pb(phases: &[Phase]) -> Vec<pb::PhaseDuration> {
    phases
        .iter()
        .map(|p| pb::PhaseDuration {
            phase: p.name.clone(),
            millis: p.millis,
        })
        .collect()
}

fn info_pb(record: &CheckpointRecord, tiers: Vec<String>, state: String) -> pb::CheckpointInfo {
    pb::CheckpointInfo {
        checkpoint_ref: record.name.clone(),
        pid: record.pid,
        container_id: record.container_id.clone(),
        pod_uid: record.pod_uid.clone(),
        gpu_group: record.gpu_group.clone(),
        gpu_seat: record.gpu_seat.clone(),
        created_unix: record.created_unix,
        leave_running: record.leave_running,
        phases: phases_pb(&record.phases),
        raw_bytes: record.raw_bytes,
        stored_bytes: record.stored_bytes,
        tiers,
        state,
    }
}

/// Which tiers hold which checkpoints.
async fn holdings(parts: &NodeParts) -> Result<Vec<(TierKind, Vec<CheckpointName>)>, AgentError> {
    let mut all = Vec::new();
    for (kind, tier) in &parts.tiers.actors {
        let names = tier
            .send(tiers::List)
            .await?
            .map_err(|source| AgentError::Tier {
                name: "*".into(),
                phase: format!("list_{kind}"),
                source,
            })?;
        all.push((*kind, names));
    }
    Ok(all)
}

fn held_by(holdings: &[(TierKind, Vec<CheckpointName>)], name: &str) -> Vec<String> {
    holdings
        .iter()
        .filter(|(_, names)| names.iter().any(|n| n.as_str() == name))
        .map(|(k, _)| k.as_str().to_owned())
        .collect()
}

/// Take a checkpoint.
#[derive(Debug, Message)]
#[rtype(result = "Result<pb::CheckpointReply, AgentError>")]
pub struct Checkpoint(pub pb::CheckpointRequest);

impl Handler<Checkpoint> for NodeAgent {
    type Result = ResponseActFuture<Self, Result<pb::CheckpointReply, AgentError>>;

    fn handle(&mut self, msg: Checkpoint, _: &mut Self::Context) -> Self::Result {
        let prepared = self
            .checkpoint_job(msg.0)
            .and_then(|job| self.reserve(&job.name).map(|()| job));
        let job = match prepared {
            Ok(job) => job,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        let name = job.name.clone();
        let workload = self.workload(job.pid);
        let parts = self.parts.clone();
        Box::pin(
            async move {
                let record = workload.send(RunCheckpoint(job)).await??;
                let tiers = holdings(&parts).await?;
                Ok::<_, AgentError>((record, tiers))
            }
            .into_actor(self)
            .map(move |result, agent, ctx| {
                agent.busy.remove(&name);
                agent.refresh_tier_usage(ctx);
                let (record, holdings) = result?;
                agent.catalog.insert(name.clone(), record.clone())?;
                Ok(pb::CheckpointReply {
                    checkpoint_ref: record.name.clone(),
                    phases: phases_pb(&record.phases),
                    raw_bytes: record.raw_bytes,
                    stored_bytes: record.stored_bytes,
                    tiers: held_by(&holdings, name.as_str()),
                    cuda_done: true,
                    criu_done: true,
                })
            }),
        )
    }
}

/// Restore a checkpoint.
#[derive(Debug, Message)]
#[rtype(result = "Result<pb::RestoreReply, AgentError>")]
pub struct Restore(pub pb::RestoreRequest);

impl Handler<Restore> for NodeAgent {
    type Result = ResponseActFuture<Self, Result<pb::RestoreReply, AgentError>>;

    fn handle(&mut self, msg: Restore, _: &mut Self::Context) -> Self::Result {
        let from = match msg.0.from_tier.as_str() {
            "" => Ok(None),
            tier => TierKind::parse(tier).map(Some).ok_or_else(|| {
                AgentError::InvalidRequest(format!("unknown tier {tier:?}: use ram, nvme or s3"))
            }),
        };
        let prepared = from.and_then(|from| {
            let (name, record) = self.record(&msg.0.checkpoint_ref)?;
            self.reserve(&name)?;
            Ok((name, record, from))
        });
        let (name, record, from) = match prepared {
            Ok(p) => p,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        let workload = self.workload(record.pid);
        Box::pin(
            async move { workload.send(RunRestore { record, from }).await? }
                .into_actor(self)
                .map(move |result, agent, ctx| {
                    agent.busy.remove(&name);
                    agent.refresh_tier_usage(ctx);
                    let outcome = result?;
                    Ok(pb::RestoreReply {
                        checkpoint_ref: name.to_string(),
                        pid: outcome.pid,
                        phases: phases_pb(&outcome.phases),
                        source_tier: outcome.source_tier.as_str().to_owned(),
                    })
                }),
        )
    }
}

/// List every checkpoint.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<pb::CheckpointInfo>, AgentError>")]
pub struct List;

impl Handler<List> for NodeAgent {
    type Result = ResponseActFuture<Self, Result<Vec<pb::CheckpointInfo>, AgentError>>;

    fn handle(&mut self, _: List, _: &mut Self::Context) -> Self::Result {
        let records: Vec<CheckpointRecord> = self.catalog.all().cloned().collect();
        let parts = self.parts.clone();
        let workloads = self.workloads.clone();
        Box::pin(
            async move {
                let holdings = holdings(&parts).await?;
                let mut infos = Vec::with_capacity(records.len());
                for record in &records {
                    let state = workload_state(&workloads, record.pid).await;
                    infos.push(info_pb(record, held_by(&holdings, &record.name), state));
                }
                Ok(infos)
            }
            .into_actor(self),
        )
    }
}

async fn workload_state(workloads: &HashMap<i32, Addr<ContainerActor>>, pid: i32) -> String {
    match workloads.get(&pid) {
        Some(actor) => actor
            .send(GetState)
            .await
            .map(|s| s.to_string())
            .unwrap_or_else(|_| "Unknown".into()),
        None => "Unknown".into(),
    }
}

/// Details of one checkpoint.
#[derive(Debug, Message)]
#[rtype(result = "Result<pb::CheckpointInfo, AgentError>")]
pub struct Inspect(pub String);

impl Handler<Inspect> for NodeAgent {
    type Result = ResponseActFuture<Self, Result<pb::CheckpointInfo, AgentError>>;

    fn handle(&mut self, msg: Inspect, _: &mut Self::Context) -> Self::Result {
        let record = match self.record(&msg.0) {
            Ok((_, record)) => record,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        let parts = self.parts.clone();
        let workloads = self.workloads.clone();
        Box::pin(
            async move {
                let holdings = holdings(&parts).await?;
                let state = workload_state(&workloads, record.pid).await;
                Ok(info_pb(&record, held_by(&holdings, &record.name), state))
            }
            .into_actor(self),
        )
    }
}

/// Delete a checkpoint from every tier and the catalog.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<String>, AgentError>")]
pub struct Delete(pub String);

impl Handler<Delete> for NodeAgent {
    type Result = ResponseActFuture<Self, Result<Vec<String>, AgentError>>;

    fn handle(&mut self, msg: Delete, _: &mut Self::Context) -> Self::Result {
        let prepared = CheckpointName::new(&msg.0)
            .map_err(AgentError::from)
            .and_then(|name| self.reserve(&name).map(|()| name));
        let name = match prepared {
            Ok(name) => name,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        let tiers = self.parts.tiers.clone();
        let target = name.clone();
        Box::pin(
            async move {
                let mut removed = Vec::new();
                for (kind, tier) in &tiers.actors {
                    let held = tier.send(Remove(target.clone())).await?.map_err(|source| {
                        AgentError::Tier {
                            name: target.to_string(),
                            phase: format!("delete_{kind}"),
                            source,
                        }
                    })?;
                    if held {
                        removed.push(kind.as_str().to_owned());
                    }
                }
                Ok::<_, AgentError>(removed)
            }
            .into_actor(self)
            .map(move |result, agent, ctx| {
                agent.busy.remove(&name);
                agent.refresh_tier_usage(ctx);
                let removed = result?;
                let known = agent.catalog.remove(&name)?;
                if !known && removed.is_empty() {
                    return Err(AgentError::NotFound(name.to_string()));
                }
                Ok(removed)
            }),
        )
    }
}
