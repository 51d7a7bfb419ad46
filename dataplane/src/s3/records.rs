//! The agent's checkpoint records kept beside the checkpoints in the bucket
//! (`<prefix>records/<checkpoint>.json`), so a node that never took a checkpoint can restore it.

use super::*;
use crate::MAX_RECORD_BYTES;

impl S3Tier {
    /// Object key of the record of `name`.
    pub fn record_key(&self, name: &CheckpointName) -> String {
        format!("{}records/{name}.json", self.prefix)
    }

    pub(super) fn write_record(
        &self,
        name: &CheckpointName,
        record: &[u8],
    ) -> Result<(), TierError> {
        let key = self.record_key(name);
        let sealed;
        let record = match self.sealing.writing_key() {
            Some(seal_key) => {
                sealed = crate::seal_record(seal_key, name, record);
                &sealed[..]
            }
            None => record,
        };
        if u64::try_from(record.len()).map_or(true, |l| l > MAX_RECORD_BYTES) {
            return Err(TierError::Corrupt {
                tier: TIER,
                name: name.clone(),
                detail: format!(
                    "record of {} bytes is larger than {MAX_RECORD_BYTES}",
                    record.len()
                ),
            });
        }
        self.rt
            .block_on(retrying(&self.config, "put record", || {
                self.client
                    .put_object()
                    .bucket(&self.config.bucket)
                    .key(&key)
                    .content_type("application/json")
                    .body(ByteStream::from(record.to_vec()))
                    .send()
            }))
            .map(|_| ())
            .map_err(|(e, n)| remote("put record", &key, &e, n))
    }

    pub(super) fn read_record(&self, name: &CheckpointName) -> Result<Option<Vec<u8>>, TierError> {
        let key = self.record_key(name);
        let corrupt = |detail: String| TierError::Corrupt {
            tier: TIER,
            name: name.clone(),
            detail: format!("record {key}: {detail}"),
        };
        let Some(body) = self.get_small("get record", &key, MAX_RECORD_BYTES, corrupt)? else {
            return Ok(None);
        };
        let opened = crate::open_record(
            name,
            &body,
            self.sealing.ring().map(|r| &**r),
            self.sealing.accepts_plain(),
        );
        match opened {
            Ok(record) => Ok(Some(record)),
            Err(e @ (crate::RecordSealError::Key(..) | crate::RecordSealError::Plain)) => {
                Err(TierError::Sealing {
                    tier: TIER,
                    name: name.clone(),
                    detail: format!("record {key}: {e}"),
                })
            }
            Err(e) => Err(corrupt(e.to_string())),
        }
    }

    /// Deletes the record of `name`; a missing one is no error.
    pub(super) fn delete_record(&self, name: &CheckpointName) -> Result<(), TierError> {
        let key = self.record_key(name);
        self.rt
            .block_on(retrying(&self.config, "delete record", || {
                self.client
                    .delete_object()
                    .bucket(&self.config.bucket)
                    .key(&key)
                    .send()
            }))
            .map(|_| ())
            .map_err(|(e, n)| remote("delete", &key, &e, n))
    }
}
