//! A tier's encryption settings: which key seals what it stores now, and which checkpoints it
//! may open.

use std::sync::Arc;

use crate::crypt::{KeyId, KeyRing, SealKey};
use crate::{CheckpointName, TierError, TierKind};

/// How a tier protects what it stores.
#[derive(Clone, Debug, Default)]
pub struct Sealing {
    ring: Option<Arc<KeyRing>>,
    seal_new: bool,
    accept_plain: bool,
}

impl Sealing {
    /// No keys: stores and opens plain checkpoints only.
    pub fn plain() -> Self {
        Self {
            ring: None,
            seal_new: false,
            accept_plain: true,
        }
    }

    /// Seals new checkpoints with the ring's newest key and opens those sealed by any of its
    /// keys. Plain checkpoints written before encryption was turned on are refused (nothing
    /// authenticates them, so anyone who can write the store could have put them there)
    /// unless [`Sealing::accepting_plain`] allows them.
    pub fn sealed(ring: Arc<KeyRing>) -> Self {
        Self {
            ring: Some(ring),
            seal_new: true,
            accept_plain: false,
        }
    }

    /// Stores plain checkpoints but opens sealed ones with `ring` (a tier left out of the
    /// encrypted tiers, which may still receive sealed chunks from one that is not).
    pub fn opening_only(ring: Arc<KeyRing>) -> Self {
        Self {
            ring: Some(ring),
            seal_new: false,
            accept_plain: true,
        }
    }

    /// Whether plain checkpoints are opened too (for the time it takes to re-encrypt them).
    pub fn accepting_plain(mut self, accept: bool) -> Self {
        self.accept_plain = accept || !self.seal_new;
        self
    }

    /// Whether plain checkpoints and records are accepted.
    pub fn accepts_plain(&self) -> bool {
        self.accept_plain
    }

    /// The key ring, if one is configured.
    pub fn ring(&self) -> Option<&Arc<KeyRing>> {
        self.ring.as_ref()
    }

    /// The key new checkpoints are sealed with, `None` when they are stored plain.
    pub fn writing_key(&self) -> Option<&Arc<SealKey>> {
        match &self.ring {
            Some(ring) if self.seal_new => Some(ring.newest()),
            _ => None,
        }
    }

    /// The key that opens checkpoint `name`, which its manifest says is sealed with `id`
    /// (`None`: plain); an error names the checkpoint and the key.
    pub fn opening_key(
        &self,
        tier: TierKind,
        name: &CheckpointName,
        id: Option<&KeyId>,
    ) -> Result<Option<&Arc<SealKey>>, TierError> {
        let refuse = |detail: String| TierError::Sealing {
            tier,
            name: name.clone(),
            detail,
        };
        match (id, &self.ring) {
            (None, _) if self.accept_plain => Ok(None),
            (None, _) => Err(refuse(
                "it is stored unencrypted (manifest format 1, written before encryption at rest \
                 was turned on); set [encryption] accept_unencrypted = true to restore it, then \
                 run `kybernatectl reencrypt` on it"
                    .into(),
            )),
            (Some(id), None) => Err(refuse(format!(
                "it is encrypted with key {id:?}, and this node has no encryption key configured \
                 ([encryption] key_file)"
            ))),
            (Some(id), Some(ring)) => ring.get(id).map(Some).map_err(|e| refuse(e.to_string())),
        }
    }
}
