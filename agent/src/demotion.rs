//! Keeping tiers within their budgets: when a tier holds more than its budget, its least
//! recently used checkpoints move to the next slower tier. A copy is dropped only after the
//! slower tier holds the checkpoint, so nothing is ever lost to a budget.

use kybernate_dataplane::{CheckpointName, TierKind};

use crate::catalog::CheckpointRecord;
use crate::drain;
use crate::error::AgentError;
use crate::events::PhaseClock;
use crate::node_parts::NodeParts;
use crate::restore;
use crate::tiers::{Contains, Remove};

/// A checkpoint a tier holds, as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The checkpoint.
    pub name: CheckpointName,
    /// Bytes its copy takes in the tier.
    pub bytes: u64,
    /// When it was last checkpointed or restored (Unix seconds).
    pub last_used: u64,
}

/// Which checkpoints leave a tier holding `used` bytes against `budget`: least recently used
/// first, until the rest fits.
pub fn plan(used: u64, budget: u64, mut candidates: Vec<Candidate>) -> Vec<CheckpointName> {
    if used <= budget {
        return Vec::new();
    }
    candidates.sort_by(|a, b| a.last_used.cmp(&b.last_used).then(a.name.cmp(&b.name)));
    let mut remaining = used;
    let mut out = Vec::new();
    for c in candidates {
        if remaining <= budget {
            break;
        }
        remaining = remaining.saturating_sub(c.bytes);
        out.push(c.name);
    }
    out
}

/// Moves `record` out of tier `from` into the next slower tier (copying it there first if
/// that tier does not hold it yet), then drops the `from` copy.
pub async fn demote(
    parts: &NodeParts,
    record: &CheckpointRecord,
    from: TierKind,
) -> Result<TierKind, AgentError> {
    let name = CheckpointName::new(&record.name)?;
    let Some(to) = parts.tiers.kinds().into_iter().find(|k| *k > from) else {
        return Err(AgentError::InvalidRequest(format!(
            "there is no tier slower than {from} to demote {name} to"
        )));
    };
    let mut clock = PhaseClock::new(
        name.as_str(),
        "demote",
        parts.events.clone(),
        parts.metrics.clone(),
    );
    let target = parts
        .tiers
        .get(to)
        .ok_or_else(|| AgentError::Internal(format!("no {to} tier")))?;
    let held = target
        .send(Contains(name.clone()))
        .await?
        .map_err(|source| AgentError::Tier {
            name: name.to_string(),
            phase: format!("find_{to}"),
            source: Box::new(source),
        })?;
    if !held {
        if from == TierKind::Ram {
            let dir = parts.ram.dir_of(&name);
            drain::store_into(parts, &mut clock, &name, &dir, &record.files, to).await?;
        } else {
            let staged = restore::stage(parts, record, &name, &[from], &mut clock).await?;
            drain::store_into(parts, &mut clock, &name, &staged.dir, &record.files, to).await?;
        }
    }
    let source = parts
        .tiers
        .get(from)
        .ok_or_else(|| AgentError::Internal(format!("no {from} tier")))?;
    source
        .send(Remove(name.clone()))
        .await?
        .map_err(|e| AgentError::Tier {
            name: name.to_string(),
            phase: format!("demote_{from}"),
            source: Box::new(e),
        })?;
    tracing::info!(checkpoint = %name, %from, %to, "demoted to stay within the tier budget");
    clock.succeeded();
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, bytes: u64, last_used: u64) -> Candidate {
        Candidate {
            name: CheckpointName::new(name).unwrap(),
            bytes,
            last_used,
        }
    }

    #[test]
    fn evicts_least_recently_used_until_within_budget() {
        let all = vec![c("new", 40, 30), c("old", 40, 10), c("mid", 40, 20)];
        assert!(plan(120, 120, all.clone()).is_empty());
        let names: Vec<String> = plan(120, 50, all.clone())
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(names, ["old", "mid"]);
        let names: Vec<String> = plan(120, 100, all).iter().map(|n| n.to_string()).collect();
        assert_eq!(names, ["old"]);
        assert_eq!(plan(100, 10, vec![]), Vec::<CheckpointName>::new());
    }
}
