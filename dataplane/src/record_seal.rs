//! Authenticated checkpoint records: the agent's record of a checkpoint, as kept beside it on
//! a shared tier, carries a MAC under a sub-key of the sealing key, bound to the checkpoint's
//! name, so no one who can write the bucket but holds no key can change a record, forge one,
//! or move one under another checkpoint's name.
//!
//! Layout: [`RECORD_MAGIC`] (8 bytes), key id length (1 byte), key id, MAC (32 bytes), the
//! record's bytes. A record without the magic is a plain record from before encryption.

use crate::crypt::{KeyId, KeyRing, SealKey};
use crate::CheckpointName;

/// First bytes of an authenticated record.
pub const RECORD_MAGIC: [u8; 8] = *b"KYBREC\x00\x02";

/// Why a stored record is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordSealError {
    /// The envelope is cut short or its key id is not a valid id.
    #[error("authenticated record is malformed: {0}")]
    Malformed(String),
    /// The MAC does not match: changed, forged, or another checkpoint's record.
    #[error("record authentication failed under key {0}: it was changed, or belongs to another checkpoint")]
    Forged(KeyId),
    /// The key it names is not at hand.
    #[error("record is authenticated with key {0:?}: {1}")]
    Key(String, String),
    /// A plain record where only authenticated ones are accepted.
    #[error("record is not authenticated (written before encryption at rest was turned on); set [encryption] accept_unencrypted = true to adopt it")]
    Plain,
}

fn mac_input(name: &CheckpointName, body: &[u8]) -> Vec<u8> {
    let mut input = Vec::with_capacity(2 + name.as_str().len() + body.len());
    input.push(u8::try_from(name.as_str().len()).expect("names are at most 128 bytes"));
    input.extend_from_slice(name.as_str().as_bytes());
    input.extend_from_slice(body);
    input
}

/// Wraps the record of `name` with a MAC under `key`.
pub fn seal_record(key: &SealKey, name: &CheckpointName, body: &[u8]) -> Vec<u8> {
    let id = key.id().as_str().as_bytes();
    let mut out = Vec::with_capacity(8 + 1 + id.len() + 32 + body.len());
    out.extend_from_slice(&RECORD_MAGIC);
    out.push(u8::try_from(id.len()).expect("key ids are at most 64 bytes"));
    out.extend_from_slice(id);
    out.extend_from_slice(&key.record_mac(&mac_input(name, body)));
    out.extend_from_slice(body);
    out
}

/// The record bytes of `name` from what a tier kept: an authenticated record is checked with
/// `ring`; a plain one is returned only when `accept_plain`. Pure: no I/O, for fuzzing too.
pub fn open_record(
    name: &CheckpointName,
    stored: &[u8],
    ring: Option<&KeyRing>,
    accept_plain: bool,
) -> Result<Vec<u8>, RecordSealError> {
    let Some(rest) = stored.strip_prefix(&RECORD_MAGIC[..]) else {
        return if accept_plain {
            Ok(stored.to_vec())
        } else {
            Err(RecordSealError::Plain)
        };
    };
    let short = || RecordSealError::Malformed("cut short".into());
    let (&id_len, rest) = rest.split_first().ok_or_else(short)?;
    let id_len = usize::from(id_len);
    if rest.len() < id_len + 32 {
        return Err(short());
    }
    let (id, rest) = rest.split_at(id_len);
    let (mac, body) = rest.split_at(32);
    let id_text = String::from_utf8_lossy(id).into_owned();
    let id = KeyId::new(&id_text).map_err(|e| RecordSealError::Malformed(e.to_string()))?;
    let ring = ring.ok_or_else(|| {
        RecordSealError::Key(id_text.clone(), "no encryption key is configured".into())
    })?;
    let key = ring
        .get(&id)
        .map_err(|e| RecordSealError::Key(id_text, e.to_string()))?;
    let want = key.record_mac(&mac_input(name, body));
    if want.iter().zip(mac).fold(0u8, |acc, (a, b)| acc | (a ^ b)) != 0 {
        return Err(RecordSealError::Forged(id));
    }
    Ok(body.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn records_round_trip_and_every_change_is_caught() {
        let ring = KeyRing::from_keys(Path::new("/k"), &[("k1", [1; 32])]).unwrap();
        let name = CheckpointName::new("cp").unwrap();
        let body = br#"{"name":"cp","origin":{"namespace":"tenant-a"}}"#;
        let sealed = seal_record(ring.newest(), &name, body);
        assert_eq!(
            open_record(&name, &sealed, Some(&ring), false).unwrap(),
            body
        );
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x04;
            assert!(
                open_record(&name, &bad, Some(&ring), false).is_err(),
                "flip at {i}"
            );
        }
        for cut in 0..sealed.len() {
            assert!(open_record(&name, &sealed[..cut], Some(&ring), false).is_err());
        }
        let other = CheckpointName::new("cp-b").unwrap();
        assert!(matches!(
            open_record(&other, &sealed, Some(&ring), false),
            Err(RecordSealError::Forged(_))
        ));
        let err = open_record(&name, &sealed, None, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"k1\"") && err.contains("no encryption key"),
            "{err}"
        );
        assert_eq!(
            open_record(&name, body, Some(&ring), false),
            Err(RecordSealError::Plain)
        );
        assert_eq!(open_record(&name, body, Some(&ring), true).unwrap(), body);
    }
}
