//! Storing a checkpoint's images into the slower tiers: in the foreground up to the tier a
//! checkpoint asked for, and in the background beyond it.

use std::path::{Path, PathBuf};

use kybernate_dataplane::{CheckpointName, StoreReport, TierKind};

use crate::bandwidth::Urgency;
use crate::config::TimeoutsConfig;
use crate::error::AgentError;
use crate::events::PhaseClock;
use crate::images::{self, ImageFile};
use crate::node_parts::NodeParts;
use crate::tiers::Store;

/// Phase name of storing into `kind`.
pub fn store_phase(kind: TierKind) -> &'static str {
    match kind {
        TierKind::Ram => "store_ram",
        TierKind::Nvme => "store_nvme",
        TierKind::S3 => "store_s3",
    }
}

/// Stores the image set in `image_dir` into tier `kind`, as phase `store_<kind>` of `clock`,
/// under the bandwidth limits of `urgency`. `files` are the checkpoint's chunk digests; when
/// they were taken with the chunk size the tiers use, the tier takes its chunk addresses from
/// them instead of hashing again.
pub async fn store_into(
    parts: &NodeParts,
    clock: &mut PhaseClock,
    name: &CheckpointName,
    image_dir: &Path,
    files: &[ImageFile],
    kind: TierKind,
    urgency: Urgency,
) -> Result<StoreReport, AgentError> {
    let phase = store_phase(kind);
    let Some(tier) = parts.tiers.get(kind) else {
        return Err(AgentError::InvalidRequest(format!(
            "this agent has no {kind} tier"
        )));
    };
    let chunk_size = parts.config.dataplane.chunk_config().chunk_size;
    let digest = images::to_digest(files)
        .ok()
        .filter(|d| d.chunk_size == chunk_size && !d.files.is_empty());
    let store = Store {
        name: name.clone(),
        image_dir: image_dir.to_owned(),
        digest,
        pacing: parts.bandwidth.pacing(urgency),
    };
    let millis = parts.config.timeouts.store_ms;
    let report = clock
        .run(phase, async {
            let sent = tokio::time::timeout(TimeoutsConfig::of(millis), tier.send(store))
                .await
                .map_err(|_| AgentError::Timeout {
                    name: name.to_string(),
                    phase: phase.into(),
                    millis,
                })?;
            sent?.map_err(|source| AgentError::Tier {
                name: name.to_string(),
                phase: phase.into(),
                source: Box::new(source),
            })
        })
        .await?;
    parts.metrics.drained(kind.as_str(), &report);
    Ok(report)
}

/// The tiers a checkpoint drains into after RAM, split into those before "done" (up to and
/// including `until`) and those drained in the background.
pub fn split_tiers(parts: &NodeParts, until: TierKind) -> (Vec<TierKind>, Vec<TierKind>) {
    parts
        .tiers
        .actors
        .iter()
        .map(|(k, _)| *k)
        .filter(|k| *k != TierKind::Ram)
        .partition(|k| *k <= until)
}

/// Drains `name` from its RAM copy into `kinds` in the background, reporting progress as
/// the operation "drain" in events and metrics. Stops at the first failure: the copies
/// already made stay, and the failure is logged and counted.
pub async fn drain_in_background(
    parts: NodeParts,
    name: CheckpointName,
    image_dir: PathBuf,
    files: Vec<ImageFile>,
    kinds: Vec<TierKind>,
) {
    let mut clock = PhaseClock::new(
        name.as_str(),
        "drain",
        parts.events.clone(),
        parts.metrics.clone(),
    );
    for kind in kinds {
        let stored = store_into(
            &parts,
            &mut clock,
            &name,
            &image_dir,
            &files,
            kind,
            Urgency::Background,
        );
        if let Err(e) = stored.await {
            tracing::error!(checkpoint = %name, tier = %kind, error = %e, "background drain failed; the nearer copies stay");
            clock.failed(store_phase(kind), e.metric_label());
            return;
        }
    }
    clock.succeeded();
}
