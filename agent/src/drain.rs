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
use crate::tiers::{CancelOnDrop, Store};

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
    crate::failpoints::failpoint(&format!("store.{kind}.before"))?;
    if kind == TierKind::S3 && !image_dir.exists() && parts.tiers.nvme.is_some() {
        // A streamed checkpoint has no RAM copy: S3 takes the NVMe tier's chunks as they are.
        return crate::streaming::store_s3_from_nvme(parts, clock, name).await;
    }
    let Some(tier) = parts.tiers.get(kind) else {
        return Err(AgentError::InvalidRequest(format!(
            "this agent has no {kind} tier"
        )));
    };
    let chunk_size = parts.config.dataplane.chunk_config().chunk_size;
    let digest = images::to_digest(files)
        .ok()
        .filter(|d| d.chunk_size == chunk_size && !d.files.is_empty());
    let pacing = parts.bandwidth.pacing(urgency);
    // A store that times out, or whose caller goes away, stops and keeps nothing.
    let _cancel = CancelOnDrop(pacing.cancel.clone());
    let store = Store {
        name: name.clone(),
        image_dir: image_dir.to_owned(),
        digest,
        pacing,
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
    crate::failpoints::failpoint(&format!("store.{kind}.after"))?;
    Ok(report)
}

/// What storing a fresh checkpoint into its foreground tiers gave: a report per tier that
/// holds it (RAM first), and the first failure with its phase, after which nothing more was
/// tried.
#[derive(Debug)]
pub struct Foreground {
    /// Tiers that hold the checkpoint, with what each stored.
    pub stored: Vec<(TierKind, StoreReport)>,
    /// The phase that failed and why.
    pub failure: Option<(&'static str, AgentError)>,
}

impl Foreground {
    /// Bytes the tiers past RAM hold.
    pub fn stored_bytes(&self) -> u64 {
        self.stored
            .iter()
            .filter(|(k, _)| *k != TierKind::Ram)
            .map(|(_, r)| r.stored_bytes)
            .sum()
    }

    /// The tiers that hold the checkpoint.
    pub fn kinds(&self) -> Vec<TierKind> {
        self.stored.iter().map(|(k, _)| *k).collect()
    }
}

/// Stores a checkpoint committed to RAM (`ram`) into every tier up to and including `until`,
/// in order, as the caller waits (so under the foreground bandwidth rules).
pub async fn store_foreground(
    parts: &NodeParts,
    clock: &mut PhaseClock,
    name: &CheckpointName,
    files: &[ImageFile],
    ram: StoreReport,
    until: TierKind,
) -> Foreground {
    let image_dir = parts.ram.dir_of(name);
    let mut done = Foreground {
        stored: vec![(TierKind::Ram, ram)],
        failure: None,
    };
    for kind in split_tiers(parts, until).0 {
        let stored = store_into(
            parts,
            clock,
            name,
            &image_dir,
            files,
            kind,
            Urgency::Foreground,
        );
        match stored.await {
            Ok(report) => done.stored.push((kind, report)),
            Err(e) => {
                done.failure = Some((store_phase(kind), e));
                break;
            }
        }
    }
    done
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

/// The tiers a recorded checkpoint is still owed, given which tiers hold which checkpoints
/// (`held`, nearest tier first): every tier slower than the slowest one holding it. A drain
/// goes nearest first, so one cut off (the agent killed, a tier failing) leaves a prefix of
/// the tiers; a demotion drops a nearer copy only once a slower tier holds it, so its gaps
/// lie before the slowest copy and are owed nothing. A checkpoint no tier holds is owed
/// nothing either: there is nothing to drain from.
pub fn owed_tiers(
    held: &[(TierKind, Vec<CheckpointName>)],
    name: &CheckpointName,
) -> Vec<TierKind> {
    let Some(slowest) = held.iter().rposition(|(_, names)| names.contains(name)) else {
        return Vec::new();
    };
    held[slowest + 1..].iter().map(|(kind, _)| *kind).collect()
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
    if let Err(e) = crate::failpoints::failpoint("drain.before") {
        tracing::error!(checkpoint = %name, error = %e, "background drain failed; the nearer copies stay");
        clock.failed("drain", e.metric_label());
        return;
    }
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
    if let Err(e) = crate::failpoints::failpoint("drain.after") {
        tracing::error!(checkpoint = %name, error = %e, "background drain failed after storing");
        clock.failed("drain", e.metric_label());
        return;
    }
    clock.succeeded();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<CheckpointName> {
        list.iter()
            .map(|n| CheckpointName::new(n).unwrap())
            .collect()
    }

    #[test]
    fn a_cut_off_drain_owes_the_tiers_past_its_slowest_copy() {
        let held = vec![
            (TierKind::Ram, names(&["ram-only", "both", "demoted"])),
            (TierKind::Nvme, names(&["both", "nvme-only"])),
            (TierKind::S3, names(&["demoted", "done"])),
        ];
        let owed = |n: &str| owed_tiers(&held, &CheckpointName::new(n).unwrap());
        assert_eq!(owed("ram-only"), [TierKind::Nvme, TierKind::S3]);
        assert_eq!(owed("both"), [TierKind::S3]);
        assert_eq!(owed("nvme-only"), [TierKind::S3]);
        // RAM and S3 hold it: the NVMe copy was demoted, not lost.
        assert!(owed("demoted").is_empty());
        assert!(owed("done").is_empty());
        assert!(owed("nowhere").is_empty());
    }
}
