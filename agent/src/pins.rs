//! Pins: checkpoints an operator keeps in a tier (`kybernatectl pin NAME --tier ram`), e.g.
//! a parked job that must come back in seconds. A pinned copy is never demoted but counts
//! against its tier's budget. Pins live in one JSON file in the state directory, so they
//! survive a restart of the agent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kybernate_dataplane::{CheckpointName, TierKind};

/// Largest pins file the agent reads.
const MAX_PINS_BYTES: u64 = 4 << 20;

/// The pins file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PinsError {
    /// Reading or writing the file failed.
    #[error("pins file {}: {source}", path.display())]
    Io {
        /// The pins file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a pins file.
    #[error("pins file {} is corrupt: {detail}", path.display())]
    Corrupt {
        /// The pins file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// Every pin, by checkpoint name.
#[derive(Debug)]
pub struct Pins {
    path: PathBuf,
    pinned: BTreeMap<String, TierKind>,
}

impl Pins {
    /// Opens the pins kept in `path` (none when the file does not exist).
    pub fn open(path: &Path) -> Result<Self, PinsError> {
        let io = |source| PinsError::Io {
            path: path.to_owned(),
            source,
        };
        let corrupt = |detail: String| PinsError::Corrupt {
            path: path.to_owned(),
            detail,
        };
        let mut pins = Self {
            path: path.to_owned(),
            pinned: BTreeMap::new(),
        };
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(pins),
            Err(e) => return Err(io(e)),
        };
        if meta.len() > MAX_PINS_BYTES {
            return Err(corrupt(format!("{} bytes is too large", meta.len())));
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        let raw: BTreeMap<String, String> =
            serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        for (name, tier) in raw {
            let kind = TierKind::parse(&tier)
                .ok_or_else(|| corrupt(format!("{name} is pinned to unknown tier {tier:?}")))?;
            pins.pinned.insert(name, kind);
        }
        Ok(pins)
    }

    /// No pins, saved to `path` once one is made.
    pub fn empty(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            pinned: BTreeMap::new(),
        }
    }

    /// The tier `name` is pinned to.
    pub fn tier_of(&self, name: &CheckpointName) -> Option<TierKind> {
        self.pinned.get(name.as_str()).copied()
    }

    /// Every checkpoint pinned to `tier`.
    pub fn pinned_to(&self, tier: TierKind) -> Vec<CheckpointName> {
        self.pinned
            .iter()
            .filter(|(_, t)| **t == tier)
            .filter_map(|(name, _)| CheckpointName::new(name).ok())
            .collect()
    }

    /// Pins `name` to `tier` (replacing an earlier pin) and saves.
    pub fn pin(&mut self, name: &CheckpointName, tier: TierKind) -> Result<(), PinsError> {
        let before = self.pinned.insert(name.to_string(), tier);
        self.save().inspect_err(|_| {
            match before {
                Some(t) => self.pinned.insert(name.to_string(), t),
                None => self.pinned.remove(name.as_str()),
            };
        })
    }

    /// Removes the pin of `name` and saves; returns the tier it was pinned to.
    pub fn unpin(&mut self, name: &CheckpointName) -> Result<Option<TierKind>, PinsError> {
        let Some(tier) = self.pinned.remove(name.as_str()) else {
            return Ok(None);
        };
        self.save()
            .inspect_err(|_| {
                self.pinned.insert(name.to_string(), tier);
            })
            .map(|()| Some(tier))
    }

    /// Writes the file atomically (temp file + rename).
    fn save(&self) -> Result<(), PinsError> {
        let io = |source| PinsError::Io {
            path: self.path.clone(),
            source,
        };
        let raw: BTreeMap<&str, &str> = self
            .pinned
            .iter()
            .map(|(n, t)| (n.as_str(), t.as_str()))
            .collect();
        let text = serde_json::to_string_pretty(&raw).map_err(|e| io(std::io::Error::other(e)))?;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_survive_a_reopen_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pins.json");
        let name = CheckpointName::new("parked").unwrap();
        let mut pins = Pins::open(&path).unwrap();
        assert_eq!(pins.tier_of(&name), None);
        pins.pin(&name, TierKind::Ram).unwrap();
        let mut again = Pins::open(&path).unwrap();
        assert_eq!(again.tier_of(&name), Some(TierKind::Ram));
        assert_eq!(again.pinned_to(TierKind::Ram), vec![name.clone()]);
        assert!(again.pinned_to(TierKind::Nvme).is_empty());
        assert_eq!(again.unpin(&name).unwrap(), Some(TierKind::Ram));
        assert_eq!(again.unpin(&name).unwrap(), None);
        assert_eq!(Pins::open(&path).unwrap().tier_of(&name), None);

        std::fs::write(&path, "{\"x\": \"tape\"}").unwrap();
        let err = Pins::open(&path).unwrap_err().to_string();
        assert!(err.contains("unknown tier \"tape\""), "{err}");
        assert!(err.contains("pins.json"), "{err}");
    }
}
