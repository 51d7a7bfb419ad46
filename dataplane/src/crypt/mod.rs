//! Encryption at rest: the key ring and what each key does (chunk addresses, sealed chunks,
//! manifest and record MACs). It knows nothing of chunks or tiers; `chunk`, `manifest` and
//! `sealing` build on it, so every tier (NVMe, S3, the streamed dump) seals and opens chunks
//! the same way.

mod derive;
mod key_id;
mod keys;

pub use derive::{SealError, SealKey, SEAL_OVERHEAD};
pub use key_id::{InvalidKeyId, KeyId, MAX_KEY_ID_LEN};
pub use keys::{KeyError, KeyRing};
