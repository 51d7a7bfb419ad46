//! Key ids: the names under which keys are found, recorded in every sealed chunk and manifest.

use std::fmt;

/// Longest key id, in bytes.
pub const MAX_KEY_ID_LEN: usize = 64;

/// The id of one key: its file name, 1–64 bytes of `[A-Za-z0-9._-]`, not starting with `.`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    /// Validates `id` (it arrives from file names and from manifests read off a store).
    pub fn new(id: &str) -> Result<Self, InvalidKeyId> {
        let ok = !id.is_empty()
            && id.len() <= MAX_KEY_ID_LEN
            && !id.starts_with('.')
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(id.to_owned()))
        } else {
            Err(InvalidKeyId {
                id: id.chars().take(MAX_KEY_ID_LEN + 8).collect(),
            })
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A key id that is not a valid name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid encryption key id {id:?}: use 1-64 letters, digits, '.', '_' or '-', not starting with '.'")]
pub struct InvalidKeyId {
    /// The rejected id.
    pub id: String,
}
