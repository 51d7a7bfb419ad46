//! Kybernate's data plane: where checkpoint image sets live and how they move between tiers.
//!
//! The agent's tier actors own one [`Tier`] each. A checkpoint's images are written by CRIU
//! into the RAM tier and then stored into the slower tiers, or streamed by CRIU straight into
//! the NVMe tier ([`StreamCapture`]); a restore loads them back from the nearest tier that
//! holds them, or streams them from NVMe into CRIU ([`StreamServe`]).

mod buffer;
mod chunk;
mod crypt;
mod digest;
mod error;
mod image_files;
mod local_dir;
mod manifest;
mod name;
mod nvme;
mod nvme_index;
mod nvme_reencrypt;
mod pipeline;
mod record_seal;
mod restore;
mod s3;
mod sealing;
mod service;
mod stream;
mod throttle;
mod tier;

pub use buffer::{AlignedBuf, BufferPool, PooledBuf};
pub use chunk::{ChunkConfig, ChunkEncoding, ChunkHash, DEFAULT_CHUNK_SIZE};
pub use crypt::{
    InvalidKeyId, KeyError, KeyId, KeyRing, SealError, SealKey, MAX_KEY_ID_LEN, SEAL_OVERHEAD,
};
pub use digest::{digest_image_set, verify_image_set, DigestMismatch, FileDigest, ImageDigest};
pub use error::TierError;
pub use local_dir::LocalDirTier;
pub use manifest::{
    CheckpointManifest, ChunkLocation, ChunkRef, FileEntry, ManifestError, MANIFEST_MAGIC,
    MANIFEST_VERSION, MANIFEST_VERSION_SEALED, MAX_MANIFEST_BYTES,
};
pub use name::{CheckpointName, InvalidName};
pub use nvme::NvmeTier;
pub use nvme_reencrypt::Reencrypted;
pub use pipeline::DrainStats;
pub use record_seal::{open_record, seal_record, RecordSealError, RECORD_MAGIC};
pub use s3::{
    GcReport, LeaseInfo, S3Config, S3Tier, Secret, UnfinishedUpload, MAX_PARTS, MIN_PART_SIZE,
};
pub use sealing::Sealing;
pub use service::{
    CancelToken, ClassSession, DataPlane, IoBackend, IoMode, PriorityGate, WorkClass, WorkPermit,
    IO_MODE_ENV,
};
pub use stream::{StreamCapture, StreamServe, CAPTURE_SOCKET, SERVE_SOCKET};
pub use throttle::{ByteRate, Pacing, WaitHook};
pub use tier::{LoadReport, StoreReport, Tier, TierKind, MAX_RECORD_BYTES};
