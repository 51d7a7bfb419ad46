//! Kybernate's data plane: where checkpoint image sets live and how they move between tiers.
//!
//! The agent's tier actors own one [`Tier`] each. A checkpoint's images are written by CRIU
//! into the RAM tier and then stored into the slower tiers; a restore loads them back from the
//! nearest tier that holds them.

mod error;
mod local_dir;
mod name;
mod tier;

pub use error::TierError;
pub use local_dir::LocalDirTier;
pub use name::{CheckpointName, InvalidName};
pub use tier::{LoadReport, StoreReport, Tier, TierKind};
