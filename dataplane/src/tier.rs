//! The interface every storage tier implements.

use std::fmt;
use std::path::Path;

use crate::{CheckpointName, DrainStats, ImageDigest, Pacing, TierError};

/// The storage tiers, nearest (fastest to restore from) first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TierKind {
    /// tmpfs: where CRIU writes and reads images.
    Ram,
    /// Local disk.
    Nvme,
    /// Object storage.
    S3,
}

impl TierKind {
    /// Stable lower-case name used in the API, the CLI and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            TierKind::Ram => "ram",
            TierKind::Nvme => "nvme",
            TierKind::S3 => "s3",
        }
    }

    /// Parses the name produced by [`TierKind::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ram" => Some(TierKind::Ram),
            "nvme" => Some(TierKind::Nvme),
            "s3" => Some(TierKind::S3),
            _ => None,
        }
    }
}

impl fmt::Display for TierKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What storing an image set cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreReport {
    /// Bytes of the image set as CRIU wrote it.
    pub raw_bytes: u64,
    /// Bytes this store added to the tier.
    pub stored_bytes: u64,
    /// Raw bytes of the chunks this store compressed: neither zero nor already held by the
    /// tier. 0 for a tier that keeps files as they are (RAM). With
    /// `compression_output_bytes`, the compression ratio the agent exports per tier.
    pub compression_input_bytes: u64,
    /// Bytes those chunks took once compressed (what the store wrote for them).
    pub compression_output_bytes: u64,
    /// Raw bytes of chunks the tier already held, so this store did not write them again:
    /// what content addressing saved.
    pub dedup_bytes: u64,
    /// Raw bytes of zero chunks, recorded in the manifest and never stored.
    pub zero_bytes: u64,
}

impl From<&DrainStats> for StoreReport {
    /// The report of a store that ran the chunk pipeline.
    fn from(stats: &DrainStats) -> Self {
        Self {
            raw_bytes: stats.raw_bytes,
            stored_bytes: stats.new_stored_bytes,
            compression_input_bytes: stats
                .raw_bytes
                .saturating_sub(stats.zero_bytes)
                .saturating_sub(stats.dedup_bytes),
            compression_output_bytes: stats.new_stored_bytes,
            dedup_bytes: stats.dedup_bytes,
            zero_bytes: stats.zero_bytes,
        }
    }
}

/// What loading an image set produced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Bytes written into the destination directory.
    pub bytes: u64,
}

/// A place that can hold checkpoint image sets.
///
/// Implementations are blocking; the agent runs each tier on threads of its own.
/// A store is atomic: until it returns `Ok`, the tier does not report the checkpoint as held.
pub trait Tier: Send + Sync + fmt::Debug {
    /// Which tier this is.
    fn kind(&self) -> TierKind;

    /// Stores the image set in the directory `image_dir` under `name`, replacing nothing:
    /// storing a name the tier already holds is an error-free no-op returning the held size.
    fn store(&self, name: &CheckpointName, image_dir: &Path) -> Result<StoreReport, TierError>;

    /// [`Tier::store`] as the agent runs it: with the chunk hashes taken once right after the
    /// dump (`digest`), so a chunked tier does not hash every byte again, and under the
    /// byte-rate limits of `pacing`, which a tier honours for the disk or network it writes
    /// to. A tier that keeps plain files in memory (RAM) needs neither.
    fn store_paced(
        &self,
        name: &CheckpointName,
        image_dir: &Path,
        digest: Option<&ImageDigest>,
        pacing: &Pacing,
    ) -> Result<StoreReport, TierError> {
        let _ = (digest, pacing);
        self.store(name, image_dir)
    }

    /// Writes the image set of `name` into `dest`, an existing empty directory.
    fn load(&self, name: &CheckpointName, dest: &Path) -> Result<LoadReport, TierError>;

    /// [`Tier::load`] under the byte-rate limits of `pacing` (see [`Tier::store_paced`]).
    fn load_paced(
        &self,
        name: &CheckpointName,
        dest: &Path,
        pacing: &Pacing,
    ) -> Result<LoadReport, TierError> {
        let _ = pacing;
        self.load(name, dest)
    }

    /// Whether the tier holds a complete copy of `name`.
    fn contains(&self, name: &CheckpointName) -> Result<bool, TierError>;

    /// Drops the tier's copy of `name`; returns whether there was one.
    fn remove(&self, name: &CheckpointName) -> Result<bool, TierError>;

    /// Every checkpoint the tier holds completely.
    fn list(&self) -> Result<Vec<CheckpointName>, TierError>;

    /// Bytes the tier currently uses.
    fn used_bytes(&self) -> Result<u64, TierError>;

    /// Keeps `record`, the agent's own description of checkpoint `name` (opaque to the data
    /// plane, at most [`MAX_RECORD_BYTES`]), so that another node sharing this tier can restore
    /// the checkpoint without having taken it. Only a tier other nodes read needs it: a
    /// node-local tier keeps nothing, because the node's own catalog already has the record.
    fn put_record(&self, name: &CheckpointName, record: &[u8]) -> Result<(), TierError> {
        let _ = (name, record);
        Ok(())
    }

    /// The record [`Tier::put_record`] kept for `name`, if the tier keeps records and has one.
    fn get_record(&self, name: &CheckpointName) -> Result<Option<Vec<u8>>, TierError> {
        let _ = name;
        Ok(None)
    }
}

/// Largest checkpoint record a tier keeps or hands back; anything bigger is not one of ours.
pub const MAX_RECORD_BYTES: u64 = 16 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipeline_store_reports_compression_dedup_and_zero_bytes() {
        let stats = DrainStats {
            raw_bytes: 100,
            zero_bytes: 30,
            dedup_bytes: 20,
            new_stored_bytes: 10,
            ..DrainStats::default()
        };
        let report = StoreReport::from(&stats);
        assert_eq!(report.raw_bytes, 100);
        assert_eq!(report.stored_bytes, 10);
        assert_eq!(report.compression_input_bytes, 50);
        assert_eq!(report.compression_output_bytes, 10);
        assert_eq!(report.dedup_bytes, 20);
        assert_eq!(report.zero_bytes, 30);
    }
}
