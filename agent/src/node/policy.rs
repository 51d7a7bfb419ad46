//! Tier policy on the node agent: budgets and demotion limits, pins, and the view behind
//! `kybernatectl tiers`.

use std::collections::{HashMap, HashSet};

use actix::prelude::*;
use kybernate_dataplane::{CheckpointName, TierKind};
use kybernate_proto::agent::v1 as pb;

use super::{holdings, now_unix, phases_pb, NodeAgent};
use crate::catalog::CheckpointRecord;
use crate::config::{AgentConfig, TierPolicy};
use crate::demotion::Limits;
use crate::error::AgentError;
use crate::node_parts::NodeParts;
use crate::tiers::UsedBytes;

/// The budget of tier `kind` in bytes (0: no limit) and its policy.
pub fn budget_of(config: &AgentConfig, kind: TierKind) -> (u64, Option<&TierPolicy>) {
    match kind {
        TierKind::Ram => (config.ram_budget(), Some(&config.tiers.ram)),
        TierKind::Nvme => (
            config.tiers.nvme_budget_bytes.unwrap_or(0),
            Some(&config.tiers.nvme),
        ),
        TierKind::S3 => (0, None),
    }
}

/// What demotion out of tier `kind` has to achieve now; `None` when nothing can or need
/// move (no budget and no age limit, or no slower tier to keep the copies).
pub(super) fn limits(parts: &NodeParts, kind: TierKind, now: u64) -> Option<Limits> {
    parts.tiers.get(kind)?;
    if kind == TierKind::Nvme && parts.tiers.get(TierKind::S3).is_none() {
        return None;
    }
    let (budget, policy) = budget_of(&parts.config, kind);
    let policy = policy?;
    if budget == 0 && policy.max_age_secs == 0 {
        return None;
    }
    let (high, low) = if budget == 0 {
        (u64::MAX, u64::MAX)
    } else {
        policy.watermarks(budget)
    };
    Some(Limits {
        high,
        low,
        max_age_secs: policy.max_age_secs,
        now,
    })
}

/// Sets the budget gauge of every tier.
pub(super) fn publish_budgets(parts: &NodeParts) {
    for kind in parts.tiers.kinds() {
        let (budget, _) = budget_of(&parts.config, kind);
        parts.metrics.tier_budget(kind.as_str(), budget);
    }
}

/// The workload a checkpoint belongs to: its pod, else its container, else its process.
fn workload_of(record: &CheckpointRecord) -> String {
    if !record.pod_uid.is_empty() {
        format!("pod:{}", record.pod_uid)
    } else if !record.container_id.is_empty() {
        format!("container:{}", record.container_id)
    } else {
        format!("pid:{}", record.pid)
    }
}

/// The `keep` newest checkpoints of every workload.
fn newest_per_workload<'a>(
    records: impl Iterator<Item = &'a CheckpointRecord>,
    keep: u32,
) -> HashSet<CheckpointName> {
    let mut by_workload: HashMap<String, Vec<&CheckpointRecord>> = HashMap::new();
    for record in records {
        by_workload
            .entry(workload_of(record))
            .or_default()
            .push(record);
    }
    let keep = usize::try_from(keep).unwrap_or(usize::MAX);
    by_workload
        .into_values()
        .flat_map(|mut list| {
            list.sort_by_key(|b| std::cmp::Reverse(b.created_unix));
            list.into_iter()
                .take(keep)
                .filter_map(|r| CheckpointName::new(&r.name).ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

impl NodeAgent {
    /// Checkpoints whose copy in `kind` must stay: pinned ones, and on NVMe the newest of
    /// each workload.
    pub(super) fn exempt(&self, kind: TierKind) -> HashSet<CheckpointName> {
        let mut out: HashSet<CheckpointName> = self.pins.pinned_to(kind).into_iter().collect();
        if kind == TierKind::Nvme {
            let keep = self.parts.config.policy.nvme_keep_recent;
            out.extend(newest_per_workload(self.catalog.all(), keep));
        }
        out
    }
}

/// Occupancy of every tier against its budget and watermarks.
#[derive(Debug, Message)]
#[rtype(result = "Result<pb::TierStatusReply, AgentError>")]
pub struct TierStatus;

impl Handler<TierStatus> for NodeAgent {
    type Result = ResponseActFuture<Self, Result<pb::TierStatusReply, AgentError>>;
    fn handle(&mut self, _: TierStatus, _: &mut Self::Context) -> Self::Result {
        let parts = self.parts.clone();
        let raw: HashMap<String, u64> = self
            .catalog
            .all()
            .map(|r| (r.name.clone(), r.raw_bytes))
            .collect();
        let pinned: HashMap<TierKind, Vec<CheckpointName>> = parts
            .tiers
            .kinds()
            .into_iter()
            .map(|k| (k, self.pins.pinned_to(k)))
            .collect();
        Box::pin(
            async move {
                let held = holdings(&parts).await?;
                let mut tiers = Vec::new();
                for (kind, names) in held {
                    let Some(actor) = parts.tiers.get(kind) else {
                        continue;
                    };
                    let used = actor
                        .send(UsedBytes)
                        .await?
                        .map_err(|source| AgentError::Tier {
                            name: "*".into(),
                            phase: format!("used_{kind}"),
                            source: Box::new(source),
                        })?;
                    let (budget, policy) = budget_of(&parts.config, kind);
                    let (high, low) = match policy {
                        Some(p) if budget > 0 => p.watermarks(budget),
                        _ => (0, 0),
                    };
                    let pins: Vec<&CheckpointName> = pinned
                        .get(&kind)
                        .into_iter()
                        .flatten()
                        .filter(|n| names.contains(n))
                        .collect();
                    tiers.push(pb::TierStatus {
                        tier: kind.as_str().into(),
                        used_bytes: used,
                        budget_bytes: budget,
                        high_watermark_bytes: high,
                        low_watermark_bytes: low,
                        max_age_secs: policy.map_or(0, |p| p.max_age_secs),
                        pinned_bytes: pins
                            .iter()
                            .map(|n| raw.get(n.as_str()).copied().unwrap_or(0))
                            .sum(),
                        checkpoints: u32::try_from(names.len()).unwrap_or(u32::MAX),
                        pinned: pins.iter().map(|n| n.to_string()).collect(),
                    });
                }
                Ok(pb::TierStatusReply { tiers })
            }
            .into_actor(self),
        )
    }
}

/// Keep a checkpoint in a tier.
#[derive(Debug, Message)]
#[rtype(result = "Result<pb::PinReply, AgentError>")]
pub struct Pin(pub pb::PinRequest);

impl Handler<Pin> for NodeAgent {
    type Result = ResponseActFuture<Self, Result<pb::PinReply, AgentError>>;
    fn handle(&mut self, msg: Pin, ctx: &mut Self::Context) -> Self::Result {
        if let Some(name) = self.unknown_but_shared(&msg.0.checkpoint_ref) {
            return self.adopt_then(name, msg, ctx);
        }
        let prepared = crate::request_check::pin_tier(&msg.0.tier).and_then(|tier| {
            let (name, record) = self.record(&msg.0.checkpoint_ref)?;
            self.reserve(&name)?;
            Ok((name, record, tier))
        });
        let (name, record, tier) = match prepared {
            Ok(p) => p,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        Box::pin(
            crate::prefetch::run(self.parts.clone(), record, tier)
                .into_actor(self)
                .map(move |result, agent, ctx| {
                    agent.busy.remove(&name);
                    agent.refresh_tier_usage(ctx);
                    let outcome = result?;
                    agent
                        .pins
                        .pin(&name, tier)
                        .map_err(|e| AgentError::Internal(e.to_string()))?;
                    agent.last_used.insert(name.clone(), now_unix());
                    tracing::info!(checkpoint = %name, %tier, "pinned");
                    agent.enforce_budgets(ctx);
                    Ok(pb::PinReply {
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

/// Remove a checkpoint's pin.
#[derive(Debug, Message)]
#[rtype(result = "Result<pb::UnpinReply, AgentError>")]
pub struct Unpin(pub pb::UnpinRequest);

impl Handler<Unpin> for NodeAgent {
    type Result = Result<pb::UnpinReply, AgentError>;
    fn handle(&mut self, msg: Unpin, ctx: &mut Self::Context) -> Self::Result {
        let (name, _) = self.record(&msg.0.checkpoint_ref)?;
        let was = self
            .pins
            .unpin(&name)
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        if let Some(tier) = was {
            tracing::info!(checkpoint = %name, %tier, "unpinned");
        }
        self.enforce_budgets(ctx);
        Ok(pb::UnpinReply {
            tier: was.map(|t| t.as_str().to_owned()).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, pod: &str, pid: i32, created: u64) -> CheckpointRecord {
        CheckpointRecord {
            name: name.into(),
            pid,
            container_id: String::new(),
            pod_uid: pod.into(),
            gpu_group: String::new(),
            gpu_seat: String::new(),
            created_unix: created,
            leave_running: false,
            shell_job: false,
            phases: Vec::new(),
            raw_bytes: 1,
            stored_bytes: 1,
            files: Vec::new(),
            gpu: None,
            note: String::new(),
            origin: crate::tenancy::Origin::NodeLocal,
        }
    }

    #[test]
    fn newest_checkpoints_of_each_workload_stay() {
        let all = [
            record("a1", "pod-a", 1, 10),
            record("a2", "pod-a", 2, 20),
            record("a3", "pod-a", 3, 30),
            record("p1", "", 7, 5),
            record("p2", "", 7, 6),
        ];
        let mut kept: Vec<String> = newest_per_workload(all.iter(), 2)
            .into_iter()
            .map(|n| n.to_string())
            .collect();
        kept.sort();
        assert_eq!(kept, ["a2", "a3", "p1", "p2"]);
        assert!(newest_per_workload(all.iter(), 0).is_empty());
    }
}
