//! Re-encryption of one NVMe checkpoint under the newest key: its images are restored into a
//! private scratch directory, stored again sealed with the newest key, and the new manifest
//! replaces the old one in one rename. Only then are the chunks no checkpoint references any
//! more removed, so a failure at any step leaves the old checkpoint whole.

use std::fs;
use std::os::unix::fs::DirBuilderExt;

use crate::crypt::KeyId;
use crate::pipeline::{drain_image_set_on, RunOn};
use crate::restore::restore_image_set_on;
use crate::{CancelToken, CheckpointName, NvmeTier, TierError, TierKind, WorkClass};

const TIER: TierKind = TierKind::Nvme;

/// What a re-encryption did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reencrypted {
    /// The key the checkpoint was sealed with before (`None`: it was plain).
    pub from: Option<KeyId>,
    /// The key it is sealed with now.
    pub to: KeyId,
    /// Whether it was already sealed with that key (nothing was written).
    pub unchanged: bool,
}

impl NvmeTier {
    /// Seals checkpoint `name` with the newest key (see the module docs). A plain checkpoint
    /// is re-encrypted too, whatever `accept_unencrypted` says: this is the way out of it.
    pub fn reencrypt(&self, name: &CheckpointName) -> Result<Reencrypted, TierError> {
        let refuse = |detail: String| TierError::Sealing {
            tier: TIER,
            name: name.clone(),
            detail,
        };
        let Some(newest) = self.sealing().writing_key() else {
            return Err(refuse(
                "this tier does not encrypt: configure [encryption] with \"nvme\" in tiers".into(),
            ));
        };
        let old = self.manifest(name)?;
        if old.key_id.as_ref() == Some(newest.id()) {
            return Ok(Reencrypted {
                from: old.key_id,
                to: newest.id().clone(),
                unchanged: true,
            });
        }
        let old_key = match &old.key_id {
            Some(id) => Some(
                self.sealing()
                    .ring()
                    .ok_or_else(|| refuse("no key ring".into()))?
                    .get(id)
                    .map_err(|e| refuse(e.to_string()))?,
            ),
            None => None,
        };
        let scratch = self.root().join(format!(".reencrypt-{name}"));
        let _ = fs::remove_dir_all(&scratch);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&scratch)
            .map_err(|e| TierError::Io {
                tier: TIER,
                op: "create scratch directory",
                path: scratch.clone(),
                source: e,
            })?;
        let result = (|| {
            let cancel = CancelToken::new();
            let run_on = RunOn {
                gate: self.plane().gate(),
                class: WorkClass::Background,
                cancel: &cancel,
            };
            let workers = self.config().worker_count();
            restore_image_set_on(
                TIER,
                &old,
                old_key.map(|k| &**k),
                &scratch,
                self,
                self.pool(),
                workers,
                run_on,
            )?;
            let pins = crate::nvme::StorePins::new(self, name)?;
            let mut writer = self.chunk_writer(None, &cancel, &pins);
            let drained = drain_image_set_on(
                TIER,
                name,
                &scratch,
                None,
                self.config(),
                Some(newest),
                self.pool(),
                &pins,
                &mut writer,
                run_on,
            );
            // Commits the new manifest over the old one (a rename); the index still holds
            // the old references until `replaced`, so nothing is collected before.
            self.finish_store(writer, drained)?;
            let new = self.manifest(name)?;
            self.replace_in_index(&new);
            drop(pins);
            Ok(Reencrypted {
                from: old.key_id.clone(),
                to: newest.id().clone(),
                unchanged: false,
            })
        })();
        let _ = fs::remove_dir_all(&scratch);
        result
    }
}
