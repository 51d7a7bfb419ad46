//! Prefetch: copy a checkpoint into a nearer tier ahead of its restore, so the restore reads
//! from RAM (or NVMe) instead of waiting for S3.

use kybernate_dataplane::{CheckpointName, TierKind};

use crate::bandwidth::Urgency;
use crate::catalog::{CheckpointRecord, Phase};
use crate::drain;
use crate::error::AgentError;
use crate::events::PhaseClock;
use crate::node_parts::NodeParts;
use crate::restore;
use crate::tiers::Contains;

/// What a prefetch did.
#[derive(Debug, Clone)]
pub struct PrefetchOutcome {
    /// Tier the copy came from; `None` when the target already held it.
    pub from: Option<TierKind>,
    /// Phases and durations.
    pub phases: Vec<Phase>,
}

/// Makes tier `to` (RAM or NVMe) hold `record`, copying it from the nearest slower tier.
pub async fn run(
    parts: NodeParts,
    record: CheckpointRecord,
    to: TierKind,
) -> Result<PrefetchOutcome, AgentError> {
    let name = CheckpointName::new(&record.name)?;
    if to == TierKind::S3 {
        return Err(AgentError::InvalidRequest(
            "prefetch copies into ram or nvme, not s3".into(),
        ));
    }
    let Some(target) = parts.tiers.get(to) else {
        return Err(AgentError::InvalidRequest(format!(
            "this agent has no {to} tier"
        )));
    };
    let held = target
        .send(Contains(name.clone()))
        .await?
        .map_err(|source| AgentError::Tier {
            name: name.to_string(),
            phase: format!("find_{to}"),
            source: Box::new(source),
        })?;
    if held {
        return Ok(PrefetchOutcome {
            from: None,
            phases: Vec::new(),
        });
    }
    let mut clock = PhaseClock::new(
        name.as_str(),
        "prefetch",
        parts.events.clone(),
        parts.metrics.clone(),
    );
    let slower: Vec<TierKind> = parts
        .tiers
        .kinds()
        .into_iter()
        .filter(|k| *k > to)
        .collect();
    let result = async {
        let staged = restore::stage(
            &parts,
            &record,
            &name,
            &slower,
            &mut clock,
            Urgency::Prefetch,
        )
        .await?;
        let from = staged.tier;
        match to {
            TierKind::Ram => staged.keep_in_ram(&parts, &name)?,
            _ => {
                drain::store_into(
                    &parts,
                    &mut clock,
                    &name,
                    &staged.dir,
                    &record.files,
                    to,
                    Urgency::Prefetch,
                )
                .await?;
            }
        }
        Ok::<_, AgentError>(from)
    }
    .await;
    match result {
        Ok(from) => {
            clock.succeeded();
            Ok(PrefetchOutcome {
                from: Some(from),
                phases: clock.phases.clone(),
            })
        }
        Err(e) => {
            clock.failed("prefetch", e.metric_label());
            Err(e)
        }
    }
}
