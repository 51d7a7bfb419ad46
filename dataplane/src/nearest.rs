//! Restore from the nearest tier that holds a good copy.
//!
//! Tiers are tried nearest first (RAM, NVMe, S3). A tier whose copy fails (a chunk that does
//! not verify, a missing chunk, an unreachable server) is skipped after its partial output is
//! cleared, and the next one is tried, so a damaged copy never yields a silently wrong restore.

use std::fs;
use std::path::Path;

use crate::{CheckpointName, LoadReport, Tier, TierError, TierKind};

/// A successful [`load_nearest`].
#[derive(Debug)]
pub struct NearestLoad {
    /// The tier the image set came from.
    pub tier: TierKind,
    /// What it wrote.
    pub report: LoadReport,
    /// Nearer tiers that held the checkpoint but failed, with their errors.
    pub skipped: Vec<TierError>,
}

/// Loads `name` into the empty directory `dest` from the first of `tiers` (nearest first)
/// that holds a good copy.
pub fn load_nearest(
    tiers: &[&dyn Tier],
    name: &CheckpointName,
    dest: &Path,
) -> Result<NearestLoad, TierError> {
    let mut skipped = Vec::new();
    for tier in tiers {
        match tier.contains(name) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                skipped.push(e);
                continue;
            }
        }
        match tier.load(name, dest) {
            Ok(report) => {
                for e in &skipped {
                    tracing::warn!(checkpoint = %name, error = %e, "skipped a bad copy");
                }
                return Ok(NearestLoad {
                    tier: tier.kind(),
                    report,
                    skipped,
                });
            }
            Err(e) => {
                tracing::warn!(checkpoint = %name, tier = %tier.kind(), error = %e, "load failed; trying the next tier");
                clear_dir(dest).map_err(|source| TierError::Io {
                    tier: tier.kind(),
                    op: "clear restore directory",
                    path: dest.to_owned(),
                    source,
                })?;
                skipped.push(e);
            }
        }
    }
    if skipped.is_empty() {
        return Err(TierError::NotFound {
            tier: tiers.last().map_or(TierKind::S3, |t| t.kind()),
            name: name.clone(),
        });
    }
    Err(TierError::NoGoodCopy {
        name: name.clone(),
        failures: skipped
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "),
    })
}

fn clear_dir(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            fs::remove_dir_all(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}
