//! The node agent actor: the single entry point for requests. It keeps the checkpoint catalog,
//! the names in use and the tier policy, routes each operation to its workload
//! ([`crate::workloads`]; a checkpoint runs in its [`crate::checkpoint_machine`]) and answers
//! queries.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use kybernate_dataplane::{CheckpointName, TierKind};
use kybernate_proto::agent::v1 as pb;

use crate::catalog::{Catalog, CheckpointRecord, Phase};
use crate::checkpoint::CheckpointJob;
use crate::container::{RunCheckpoint, RunRestore};
use crate::demotion::{self, Candidate, Limits};
use crate::drain;
use crate::error::{tier_list, AgentError};
use crate::journal::Transition;
use crate::node_parts::NodeParts;
use crate::pins::Pins;
use crate::recovery::{Leftover, Recovery};
use crate::request_check;
use crate::tiers::{self, Remove, UsedBytes};
use crate::workloads::Workloads;

mod record;
pub use record::{GpuOf, RestorePrefetchTier, SubscribeEvents};
mod config_reload;
mod container_checkpoint;
mod container_restore;
mod containerd_checkpoint;
mod lease_expiry;
mod policy;
mod restore_admission;
mod shared;
mod shim_lease;
pub use config_reload::{
    ApplyConfig, ConfigLoaded, ConfigRejected, ConfigShow, SubscribeConfigRejections,
};
pub use container_checkpoint::{ContainerCheckpointBegin, ContainerCheckpointEnd};
pub use container_restore::{ContainerRestoreEnd, ContainerRestoreStage};
pub use policy::{Pin, TierStatus, Unpin};
pub use restore_admission::{
    CheckRestoreInto, RefusedRestore, SubscribeRefusals, UseGrants, UsePods,
};
pub use shim_lease::{CheckpointLeaseExpired, Lease, RestoreLeaseExpired};

/// The node agent.
#[derive(Debug)]
pub struct NodeAgent {
    parts: NodeParts,
    catalog: Catalog,
    /// Every workload's actor and state ([`crate::workloads`]).
    workloads: Workloads,
    /// Checkpoints with a checkpoint, restore, prefetch or delete in flight.
    busy: HashSet<CheckpointName>,
    /// Checkpoints still draining into slower tiers in the background.
    draining: HashSet<CheckpointName>,
    /// When each checkpoint was last taken or restored (Unix seconds), for LRU demotion.
    last_used: HashMap<CheckpointName, u64>,
    /// A demotion pass is running.
    demoting: bool,
    /// Budgets changed during the running pass: check again when it ends.
    demote_again: bool,
    /// Checkpoints kept in a tier on request.
    pins: Pins,
    /// Where the config came from and how its reloads went.
    config_view: config_reload::ConfigView,
    /// Container checkpoints the shim has begun and not yet ended.
    shim_checkpoints: HashMap<CheckpointName, container_checkpoint::ShimCheckpoint>,
    /// Container restores the shim has staged and not yet ended.
    shim_restores: HashMap<CheckpointName, container_restore::ShimRestore>,
    /// Grants the leases of the shim's Begins and Stages.
    leases: shim_lease::Leases,
    /// Restores whose lease ran out before their End: a late End may still unlock what
    /// `runc restore` brought back, once.
    expired_restores: HashSet<CheckpointName>,
    /// Containers this agent asked containerd to checkpoint, with the name their shim's
    /// ContainerCheckpointBegin is to use.
    awaited_containers: HashMap<String, containerd_checkpoint::AwaitedCheckpoint>,
    /// Rejected config changes, for the node worker to report as Kubernetes Events.
    config_rejections: tokio::sync::broadcast::Sender<String>,
    /// The GpuCheckpointGrants in force (none without an API server).
    grants: crate::tenancy::Grants,
    /// Refused restores into pods, for the node worker to report as Kubernetes Events.
    refusals: tokio::sync::broadcast::Sender<restore_admission::RefusedRestore>,
    /// What start-up recovery kept that is no checkpoint (incomplete dumps, quarantine):
    /// listed, holding its name, removed on delete.
    leftovers: Vec<Leftover>,
    /// Dumps recovery adopted, still to drain into the slower tiers once the agent runs.
    adopted: Vec<CheckpointName>,
}

/// How often tier budgets are re-checked besides after each operation.
const BUDGET_CHECK_INTERVAL: Duration = Duration::from_secs(30);

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl NodeAgent {
    /// An agent serving `catalog` with the node's actors.
    pub fn new(parts: NodeParts, catalog: Catalog) -> Self {
        let last_used = catalog
            .all()
            .filter_map(|r| Some((CheckpointName::new(&r.name).ok()?, r.created_unix)))
            .collect();
        let pins_file = parts.config.state_dir.join("pins.json");
        let pins = Pins::open(&pins_file).unwrap_or_else(|problem| {
            tracing::error!(%problem, "pins are not in effect until the file is fixed");
            Pins::empty(&pins_file)
        });
        Self {
            parts,
            catalog,
            workloads: Workloads::default(),
            busy: HashSet::new(),
            draining: HashSet::new(),
            last_used,
            demoting: false,
            demote_again: false,
            pins,
            config_view: config_reload::ConfigView::default(),
            shim_checkpoints: HashMap::new(),
            shim_restores: HashMap::new(),
            leases: shim_lease::Leases::default(),
            expired_restores: HashSet::new(),
            awaited_containers: HashMap::new(),
            config_rejections: tokio::sync::broadcast::channel(16).0,
            grants: crate::tenancy::Grants::none(),
            refusals: tokio::sync::broadcast::channel(16).0,
            leftovers: Vec::new(),
            adopted: Vec::new(),
        }
    }

    /// Takes over what start-up recovery found: adopted dumps drain into the slower tiers
    /// once the agent runs, leftovers are listed and hold their names.
    pub fn with_recovery(mut self, recovery: Recovery) -> Self {
        self.leftovers = recovery.leftovers;
        self.adopted = recovery.adopted;
        self.expired_restores.extend(recovery.interrupted_restores);
        self
    }

    /// Refuses a name a record, a leftover of recovery or unrecorded RAM-tier images hold.
    /// A name an operation holds is reported busy (worth a retry), not taken: its images
    /// may be on their way in or out.
    fn ensure_name_unused(&self, name: &CheckpointName) -> Result<(), AgentError> {
        if self.busy.contains(name) {
            return Err(AgentError::Busy(name.to_string()));
        }
        if self.catalog.get(name).is_some() {
            return Err(AgentError::AlreadyExists(name.to_string()));
        }
        if let Some(leftover) = self.leftovers.iter().find(|l| &l.name == name) {
            return Err(AgentError::NameInUse {
                name: name.to_string(),
                by: format!(
                    "the RAM tier keeps {} images under it ({})",
                    leftover.kind.as_str(),
                    leftover.path.display()
                ),
            });
        }
        if self.parts.ram.dir_of(name).exists() || self.parts.ram.partial_dir_of(name).exists() {
            return Err(AgentError::NameInUse {
                name: name.to_string(),
                by: "the RAM tier holds images under it that no record accounts for".into(),
            });
        }
        Ok(())
    }

    /// Demotes copies out of every tier over its high watermark or past its age limit.
    fn enforce_budgets(&mut self, ctx: &mut Context<Self>) {
        if self.demoting {
            self.demote_again = true;
            return;
        }
        let now = now_unix();
        let mut passes = Vec::new();
        for kind in [TierKind::Ram, TierKind::Nvme] {
            if let Some(limits) = policy::limits(&self.parts, kind, now) {
                passes.push((kind, limits, self.exempt(kind)));
            }
        }
        let records: Vec<CheckpointRecord> = self
            .catalog
            .all()
            .filter(|r| {
                CheckpointName::new(&r.name)
                    .is_ok_and(|n| !self.busy.contains(&n) && !self.draining.contains(&n))
            })
            .cloned()
            .collect();
        let last_used = self.last_used.clone();
        let parts = self.parts.clone();
        self.demoting = true;
        ctx.spawn(
            async move {
                for (kind, limits, exempt) in passes {
                    if let Err(e) = demote_over_budget(&parts, kind, &limits, &records, &last_used, &exempt).await {
                        tracing::error!(tier = %kind, error = %e, "demotion stopped; the copies stay where they are");
                    }
                }
            }
            .into_actor(self)
            .map(|(), agent, ctx| {
                agent.demoting = false;
                agent.refresh_tier_usage(ctx);
                if std::mem::take(&mut agent.demote_again) {
                    agent.enforce_budgets(ctx);
                }
            }),
        );
    }

    fn reserve(&mut self, name: &CheckpointName) -> Result<(), AgentError> {
        if self.busy.contains(name) {
            return Err(AgentError::Busy(name.to_string()));
        }
        self.busy.insert(name.clone());
        Ok(())
    }

    /// The slowest tier a checkpoint asks for (`tier`, NVMe when empty); it must be one of
    /// this agent's.
    fn requested_tier(&self, tier: &str) -> Result<TierKind, AgentError> {
        let until = request_check::slowest_tier(tier)?;
        if self.parts.tiers.get(until).is_none() {
            return Err(AgentError::InvalidRequest(format!(
                "this agent has no {until} tier (tiers: {})",
                tier_list(&self.parts.tiers.kinds())
            )));
        }
        Ok(until)
    }

    fn checkpoint_job(&self, req: pb::CheckpointRequest) -> Result<CheckpointJob, AgentError> {
        let until = self.requested_tier(&req.tier)?;
        let name = match request_check::requested_name(&req.name)? {
            Some(name) => name,
            None => generated_name(req.pid),
        };
        self.ensure_name_unused(&name)?;
        Ok(CheckpointJob {
            name,
            pid: req.pid,
            until,
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
        let name = request_check::checkpoint_ref(checkpoint_ref)?;
        let record = self
            .catalog
            .get(&name)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(name.to_string()))?;
        Ok((name, record))
    }

    /// Drains a fresh checkpoint into the tiers slower than `until` in the background.
    fn drain_later(
        &mut self,
        ctx: &mut Context<Self>,
        name: &CheckpointName,
        files: Vec<crate::images::ImageFile>,
        until: TierKind,
    ) {
        let (_, background) = drain::split_tiers(&self.parts, until);
        self.drain_into(ctx, name, files, background);
    }

    /// Drains `name` from its RAM copy into `kinds` in the background.
    fn drain_into(
        &mut self,
        ctx: &mut Context<Self>,
        name: &CheckpointName,
        files: Vec<crate::images::ImageFile>,
        kinds: Vec<TierKind>,
    ) {
        if kinds.is_empty() {
            return;
        }
        self.draining.insert(name.clone());
        let done = name.clone();
        let image_dir = self.parts.ram.dir_of(name);
        ctx.spawn(
            drain::drain_in_background(self.parts.clone(), name.clone(), image_dir, files, kinds)
                .into_actor(self)
                .map(move |(), agent, ctx| {
                    agent.draining.remove(&done);
                    agent.refresh_tier_usage(ctx);
                    agent.enforce_budgets(ctx);
                }),
        );
    }

    /// Resumes the drains an agent's end (or a failing tier) cut off: every recorded
    /// checkpoint drains again into the tiers slower than its slowest copy
    /// ([`drain::owed_tiers`]). Without it a checkpoint would stay in the nearer tiers for
    /// good after a crash mid-drain. Then runs a first budget pass.
    fn resume_drains(&mut self, ctx: &mut Context<Self>) {
        let parts = self.parts.clone();
        ctx.spawn(async move { holdings(&parts).await }.into_actor(self).map(
            |held, agent, ctx| {
                let held = match held {
                    Ok(held) => held,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot tell which drains to resume; they are tried at the next start");
                        return;
                    }
                };
                let owed: Vec<_> = agent
                    .catalog
                    .all()
                    .filter_map(|record| {
                        let name = CheckpointName::new(&record.name).ok()?;
                        let kinds = drain::owed_tiers(&held, &name);
                        let idle = !agent.busy.contains(&name) && !agent.draining.contains(&name);
                        (idle && !kinds.is_empty()).then(|| (name, record.files.clone(), kinds))
                    })
                    .collect();
                for (name, files, kinds) in owed {
                    tracing::info!(checkpoint = %name, tiers = %tier_list(&kinds), "resuming a drain the last agent did not finish");
                    agent.drain_into(ctx, &name, files, kinds);
                }
                // Budgets are enforced at start too: a demotion the last agent did not
                // finish, or a budget lowered while it was down, applies now.
                agent.enforce_budgets(ctx);
            },
        ));
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
        for name in std::mem::take(&mut self.adopted) {
            if let Some(record) = self.catalog.get(&name) {
                let files = record.files.clone();
                self.last_used.insert(name.clone(), record.created_unix);
                self.drain_later(ctx, &name, files, TierKind::Ram);
            }
        }
        self.resume_drains(ctx);
        policy::publish_budgets(&self.parts);
        self.refresh_tier_usage(ctx);
        ctx.run_interval(BUDGET_CHECK_INTERVAL, |agent, ctx| {
            agent.enforce_budgets(ctx)
        });
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

/// The reply to a checkpoint that completed: `record` as stored, held by `tiers`.
fn completed_reply(record: &CheckpointRecord, tiers: Vec<String>) -> pb::CheckpointReply {
    pb::CheckpointReply {
        checkpoint_ref: record.name.clone(),
        phases: phases_pb(&record.phases),
        raw_bytes: record.raw_bytes,
        stored_bytes: record.stored_bytes,
        tiers,
        cuda_done: true,
        criu_done: true,
    }
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
        note: record.note.clone(),
    }
}

fn leftover_pb(leftover: &Leftover) -> pb::CheckpointInfo {
    pb::CheckpointInfo {
        checkpoint_ref: leftover.name.to_string(),
        pid: leftover.pid,
        raw_bytes: leftover.bytes,
        tiers: vec![TierKind::Ram.as_str().to_owned()],
        state: leftover.kind.as_str().to_owned(),
        note: format!("{} ({})", leftover.note, leftover.path.display()),
        ..Default::default()
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
                source: Box::new(source),
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
        if !msg.0.container_id.is_empty() {
            return self.checkpoint_through_containerd(msg.0);
        }
        let prepared = self
            .checkpoint_job(msg.0)
            .and_then(|job| self.reserve(&job.name).map(|()| job));
        let job = match prepared {
            Ok(job) => job,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        let name = job.name.clone();
        let until = job.until;
        let workload = self.workloads.actor(&self.parts, job.pid);
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
                if let Err(AgentError::HeldPartially { record, .. }) = &result {
                    agent.keep_record(ctx, &name, record)?;
                }
                let (record, holdings) = result?;
                agent.keep_record(ctx, &name, &record)?;
                agent.workloads.evict_idle(&agent.catalog);
                agent.last_used.insert(name.clone(), record.created_unix);
                agent.drain_later(ctx, &name, record.files.clone(), until);
                agent.enforce_budgets(ctx);
                Ok(completed_reply(&record, held_by(&holdings, name.as_str())))
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

    fn handle(&mut self, msg: Restore, ctx: &mut Self::Context) -> Self::Result {
        if let Some(name) = self.unknown_but_shared(&msg.0.checkpoint_ref) {
            return self.adopt_then(name, msg, ctx);
        }
        let from = request_check::source_tier(&msg.0.from_tier);
        let prepared = from.and_then(|from| {
            let (name, record) = self.record(&msg.0.checkpoint_ref)?;
            self.reserve(&name)?;
            Ok((name, record, from))
        });
        let (name, record, from) = match prepared {
            Ok(p) => p,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        let workload = self.workloads.actor(&self.parts, record.pid);
        Box::pin(
            async move { workload.send(RunRestore { record, from }).await? }
                .into_actor(self)
                .map(move |result, agent, ctx| {
                    agent.busy.remove(&name);
                    agent.refresh_tier_usage(ctx);
                    let outcome = result?;
                    agent.last_used.insert(name.clone(), now_unix());
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
        let records: Vec<(CheckpointRecord, String)> = self
            .catalog
            .all()
            .map(|r| (r.clone(), self.workloads.state_label(r)))
            .collect();
        let leftovers: Vec<pb::CheckpointInfo> = self.leftovers.iter().map(leftover_pb).collect();
        let parts = self.parts.clone();
        Box::pin(
            async move {
                let holdings = holdings(&parts).await?;
                let mut infos = Vec::with_capacity(records.len() + leftovers.len());
                for (record, state) in records {
                    infos.push(info_pb(&record, held_by(&holdings, &record.name), state));
                }
                infos.extend(leftovers);
                Ok(infos)
            }
            .into_actor(self),
        )
    }
}

/// Details of one checkpoint.
#[derive(Debug, Message)]
#[rtype(result = "Result<pb::CheckpointInfo, AgentError>")]
pub struct Inspect(pub String);

impl Handler<Inspect> for NodeAgent {
    type Result = ResponseActFuture<Self, Result<pb::CheckpointInfo, AgentError>>;

    fn handle(&mut self, msg: Inspect, ctx: &mut Self::Context) -> Self::Result {
        if let Some(name) = self.unknown_but_shared(&msg.0) {
            return self.adopt_then(name, msg, ctx);
        }
        let record = match self.record(&msg.0) {
            Ok((_, record)) => record,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        let parts = self.parts.clone();
        let state = self.workloads.state_label(&record);
        Box::pin(
            async move {
                let holdings = holdings(&parts).await?;
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
            .and_then(|name| {
                if self.draining.contains(&name) {
                    return Err(AgentError::Busy(format!(
                        "{name} (still draining into slower tiers)"
                    )));
                }
                self.reserve(&name).map(|()| name)
            });
        let name = match prepared {
            Ok(name) => name,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        let (leftovers, others): (Vec<Leftover>, Vec<Leftover>) =
            std::mem::take(&mut self.leftovers)
                .into_iter()
                .partition(|l| l.name == name);
        self.leftovers = others;
        if leftovers
            .iter()
            .any(|l| l.kind == crate::recovery::LeftoverKind::Incomplete)
        {
            self.parts.journal.note(
                name.as_str(),
                Transition::Abandoned {
                    reason: "the incomplete dump was deleted on request".into(),
                },
            );
        }
        let tiers = self.parts.tiers.clone();
        let target = name.clone();
        Box::pin(
            async move {
                let mut removed = Vec::new();
                if !leftovers.is_empty() {
                    let paths: Vec<std::path::PathBuf> =
                        leftovers.iter().map(|l| l.path.clone()).collect();
                    crate::blocking_work::blocking(move || {
                        paths.iter().try_for_each(|p| std::fs::remove_dir_all(p).map_err(|e| {
                            AgentError::Internal(format!("cannot remove {}: {e}", p.display()))
                        }))
                    })
                    .await??;
                    removed.push(TierKind::Ram.as_str().to_owned());
                }
                for (kind, tier) in &tiers.actors {
                    let held = tier.send(Remove(target.clone())).await?.map_err(|source| {
                        AgentError::Tier {
                            name: target.to_string(),
                            phase: format!("delete_{kind}"),
                            source: Box::new(source),
                        }
                    })?;
                    if held && !removed.iter().any(|r| r == kind.as_str()) {
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
                if let Err(problem) = agent.pins.unpin(&name) {
                    tracing::error!(checkpoint = %name, %problem, "could not drop the pin of a deleted checkpoint");
                }
                let known = agent.catalog.remove(&name)?;
                agent.workloads.evict_idle(&agent.catalog);
                if !known && removed.is_empty() {
                    return Err(AgentError::NotFound(name.to_string()));
                }
                Ok(removed)
            }),
        )
    }
}

/// Demotes the copies of tier `kind` that [`demotion::plan`] picks; `exempt` ones stay.
async fn demote_over_budget(
    parts: &NodeParts,
    kind: TierKind,
    limits: &Limits,
    records: &[CheckpointRecord],
    last_used: &HashMap<CheckpointName, u64>,
    exempt: &HashSet<CheckpointName>,
) -> Result<(), AgentError> {
    let Some(tier) = parts.tiers.get(kind) else {
        return Ok(());
    };
    let tier_error = |source| AgentError::Tier {
        name: "*".into(),
        phase: format!("budget_{kind}"),
        source: Box::new(source),
    };
    let used = tier.send(UsedBytes).await?.map_err(tier_error)?;
    if used <= limits.high && limits.max_age_secs == 0 {
        return Ok(());
    }
    let held = tier.send(tiers::List).await?.map_err(tier_error)?;
    let candidates = records
        .iter()
        .filter_map(|r| {
            let name = CheckpointName::new(&r.name).ok()?;
            (held.contains(&name) && !exempt.contains(&name)).then(|| Candidate {
                bytes: r.raw_bytes,
                last_used: last_used.get(&name).copied().unwrap_or(r.created_unix),
                name,
            })
        })
        .collect();
    for name in demotion::plan(used, limits, candidates) {
        let Some(record) = records.iter().find(|r| r.name == name.as_str()) else {
            continue;
        };
        demotion::demote(parts, record, kind).await?;
    }
    Ok(())
}

/// Copy a checkpoint into a nearer tier.
#[derive(Debug, Message)]
#[rtype(result = "Result<pb::PrefetchReply, AgentError>")]
pub struct Prefetch(pub pb::PrefetchRequest);

impl Handler<Prefetch> for NodeAgent {
    type Result = ResponseActFuture<Self, Result<pb::PrefetchReply, AgentError>>;

    fn handle(&mut self, msg: Prefetch, ctx: &mut Self::Context) -> Self::Result {
        if let Some(name) = self.unknown_but_shared(&msg.0.checkpoint_ref) {
            return self.adopt_then(name, msg, ctx);
        }
        let prepared = request_check::prefetch_tier(&msg.0.to_tier).and_then(|to| {
            let (name, record) = self.record(&msg.0.checkpoint_ref)?;
            self.reserve(&name)?;
            Ok((name, record, to))
        });
        let (name, record, to) = match prepared {
            Ok(p) => p,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        let parts = self.parts.clone();
        Box::pin(
            crate::prefetch::run(parts, record, to)
                .into_actor(self)
                .map(move |result, agent, ctx| {
                    agent.busy.remove(&name);
                    agent.refresh_tier_usage(ctx);
                    let outcome = result?;
                    agent.last_used.insert(name.clone(), now_unix());
                    Ok(pb::PrefetchReply {
                        from_tier: outcome
                            .from
                            .map(|t| t.as_str().to_owned())
                            .unwrap_or_default(),
                        phases: phases_pb(&outcome.phases),
                    })
                }),
        )
    }
}
