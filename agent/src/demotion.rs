//! Keeping tiers within their budgets: when a tier holds more than its budget, its least
//! recently used checkpoints move to the next slower tier. A copy is dropped only after the
//! slower tier holds the checkpoint, so nothing is ever lost to a budget.

use kybernate_dataplane::{CheckpointName, TierKind};

use crate::bandwidth::Urgency;
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

/// When a tier's copies must move on, in bytes and seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Demotion starts when the tier holds more than this.
    pub high: u64,
    /// and goes on until it holds at most this.
    pub low: u64,
    /// Copies unused for longer than this move on regardless; 0 = no limit.
    pub max_age_secs: u64,
    /// The current time (Unix seconds).
    pub now: u64,
}

/// Which checkpoints leave a tier holding `used` bytes: first every copy older than the age
/// limit, then, when the tier is still above its high watermark, the least recently used
/// until it is at or below the low watermark. `candidates` are the copies that may move
/// (pinned ones are left out by the caller but counted in `used`).
pub fn plan(used: u64, limits: &Limits, mut candidates: Vec<Candidate>) -> Vec<CheckpointName> {
    candidates.sort_by(|a, b| a.last_used.cmp(&b.last_used).then(a.name.cmp(&b.name)));
    let mut remaining = used;
    let mut out = Vec::new();
    let mut rest = Vec::new();
    for c in candidates {
        let age = limits.now.saturating_sub(c.last_used);
        if limits.max_age_secs > 0 && age > limits.max_age_secs {
            remaining = remaining.saturating_sub(c.bytes);
            out.push(c.name);
        } else {
            rest.push(c);
        }
    }
    if remaining <= limits.high {
        return out;
    }
    for c in rest {
        if remaining <= limits.low {
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
            drain::store_into(
                parts,
                &mut clock,
                &name,
                &dir,
                &record.files,
                to,
                Urgency::Background,
            )
            .await?;
        } else if from == TierKind::Nvme
            && to == TierKind::S3
            && parts.tiers.nvme.is_some()
            && parts.tiers.s3.is_some()
            && parts.bandwidth.pacing(Urgency::Background).upload.is_none()
        {
            // The NVMe chunks are cut, compressed and addressed already: they are verified
            // and uploaded as they are, with no RAM copy and no second compression. That
            // upload takes no byte-rate limit yet, so a limited node keeps the staged path.
            crate::streaming::store_s3_from_nvme(parts, &mut clock, &name).await?;
        } else {
            let staged = restore::stage(
                parts,
                record,
                &name,
                &[from],
                &mut clock,
                Urgency::Background,
            )
            .await?;
            drain::store_into(
                parts,
                &mut clock,
                &name,
                &staged.dir,
                &record.files,
                to,
                Urgency::Background,
            )
            .await?;
        }
    }
    crate::failpoints::failpoint(&format!("demote.{from}.before_remove"))?;
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
    crate::failpoints::failpoint(&format!("demote.{from}.after_remove"))?;
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

    fn names(list: Vec<CheckpointName>) -> Vec<String> {
        list.iter().map(|n| n.to_string()).collect()
    }

    fn limits(high: u64, low: u64) -> Limits {
        Limits {
            high,
            low,
            max_age_secs: 0,
            now: 100,
        }
    }

    #[test]
    fn evicts_least_recently_used_until_below_the_low_watermark() {
        let all = vec![c("new", 40, 30), c("old", 40, 10), c("mid", 40, 20)];
        assert!(plan(120, &limits(120, 120), all.clone()).is_empty());
        assert_eq!(
            names(plan(120, &limits(50, 50), all.clone())),
            ["old", "mid"]
        );
        assert_eq!(names(plan(120, &limits(100, 100), all.clone())), ["old"]);
        // Above the high watermark, demotion goes on down to the low one.
        assert_eq!(
            names(plan(120, &limits(100, 60), all.clone())),
            ["old", "mid"]
        );
        // Between the watermarks nothing moves.
        assert!(plan(90, &limits(100, 60), all).is_empty());
        assert_eq!(
            plan(100, &limits(10, 10), vec![]),
            Vec::<CheckpointName>::new()
        );
    }

    #[test]
    fn copies_past_the_age_limit_move_regardless_of_the_budget() {
        let all = vec![c("new", 40, 95), c("old", 40, 10), c("mid", 40, 50)];
        let aged = Limits {
            max_age_secs: 60,
            ..limits(1000, 1000)
        };
        assert_eq!(names(plan(120, &aged, all.clone())), ["old"]);
        // Aged copies count towards getting under the watermarks.
        let both = Limits {
            max_age_secs: 60,
            ..limits(75, 40)
        };
        assert_eq!(names(plan(120, &both, all)), ["old", "mid"]);
    }
}
