//! One actor per storage tier. Tier work is blocking file (and later network) I/O, so each
//! tier actor runs on threads of its own (a `SyncArbiter`), never on the async runtime.

use std::path::PathBuf;
use std::sync::Arc;

use actix::prelude::*;
use kybernate_dataplane::{
    CheckpointName, ImageDigest, LoadReport, NvmeTier, Pacing, S3Tier, StoreReport, Tier,
    TierError, TierKind,
};

/// The actor serving one tier.
#[derive(Debug)]
pub struct TierActor {
    tier: Arc<dyn Tier>,
}

impl TierActor {
    /// Starts `threads` threads serving `tier`.
    pub fn start(tier: Arc<dyn Tier>, threads: usize) -> Addr<Self> {
        SyncArbiter::start(threads, move || Self { tier: tier.clone() })
    }
}

impl Actor for TierActor {
    type Context = SyncContext<Self>;
}

/// Store the image set in `image_dir` under `name`.
#[derive(Debug, Message)]
#[rtype(result = "Result<StoreReport, TierError>")]
pub struct Store {
    /// Checkpoint to store.
    pub name: CheckpointName,
    /// Where its images are now.
    pub image_dir: PathBuf,
    /// Their chunk hashes from the checkpoint's one hashing pass, when they fit this tier.
    pub digest: Option<ImageDigest>,
    /// The byte-rate limits the store runs under.
    pub pacing: Pacing,
}

/// Write the image set of `name` into `dest`.
#[derive(Debug, Message)]
#[rtype(result = "Result<LoadReport, TierError>")]
pub struct Load {
    /// Checkpoint to load.
    pub name: CheckpointName,
    /// Existing empty directory.
    pub dest: PathBuf,
    /// The byte-rate limits the load runs under.
    pub pacing: Pacing,
}

/// Whether the tier holds `name`.
#[derive(Debug, Message)]
#[rtype(result = "Result<bool, TierError>")]
pub struct Contains(pub CheckpointName);

/// Drop the tier's copy of `name`.
#[derive(Debug, Message)]
#[rtype(result = "Result<bool, TierError>")]
pub struct Remove(pub CheckpointName);

/// Every checkpoint the tier holds.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<CheckpointName>, TierError>")]
pub struct List;

/// Bytes in use.
#[derive(Debug, Message)]
#[rtype(result = "Result<u64, TierError>")]
pub struct UsedBytes;

/// Keep the agent's record of a checkpoint with the tier (see [`Tier::put_record`]).
#[derive(Debug, Message)]
#[rtype(result = "Result<(), TierError>")]
pub struct PutRecord {
    /// Checkpoint the record describes.
    pub name: CheckpointName,
    /// The record, serialised.
    pub record: Vec<u8>,
}

/// The record the tier keeps for a checkpoint, if any.
#[derive(Debug, Message)]
#[rtype(result = "Result<Option<Vec<u8>>, TierError>")]
pub struct GetRecord(pub CheckpointName);

impl Handler<Store> for TierActor {
    type Result = Result<StoreReport, TierError>;
    fn handle(&mut self, msg: Store, _: &mut Self::Context) -> Self::Result {
        self.tier
            .store_paced(&msg.name, &msg.image_dir, msg.digest.as_ref(), &msg.pacing)
    }
}

impl Handler<Load> for TierActor {
    type Result = Result<LoadReport, TierError>;
    fn handle(&mut self, msg: Load, _: &mut Self::Context) -> Self::Result {
        self.tier.load_paced(&msg.name, &msg.dest, &msg.pacing)
    }
}

impl Handler<Contains> for TierActor {
    type Result = Result<bool, TierError>;
    fn handle(&mut self, msg: Contains, _: &mut Self::Context) -> Self::Result {
        self.tier.contains(&msg.0)
    }
}

impl Handler<Remove> for TierActor {
    type Result = Result<bool, TierError>;
    fn handle(&mut self, msg: Remove, _: &mut Self::Context) -> Self::Result {
        self.tier.remove(&msg.0)
    }
}

impl Handler<List> for TierActor {
    type Result = Result<Vec<CheckpointName>, TierError>;
    fn handle(&mut self, _: List, _: &mut Self::Context) -> Self::Result {
        self.tier.list()
    }
}

impl Handler<UsedBytes> for TierActor {
    type Result = Result<u64, TierError>;
    fn handle(&mut self, _: UsedBytes, _: &mut Self::Context) -> Self::Result {
        self.tier.used_bytes()
    }
}

impl Handler<PutRecord> for TierActor {
    type Result = Result<(), TierError>;
    fn handle(&mut self, msg: PutRecord, _: &mut Self::Context) -> Self::Result {
        self.tier.put_record(&msg.name, &msg.record)
    }
}

impl Handler<GetRecord> for TierActor {
    type Result = Result<Option<Vec<u8>>, TierError>;
    fn handle(&mut self, msg: GetRecord, _: &mut Self::Context) -> Self::Result {
        self.tier.get_record(&msg.0)
    }
}

/// The agent's tiers, nearest first, each with its actor.
#[derive(Clone, Debug)]
pub struct Tiers {
    /// In nearest-first order; the first is always RAM.
    pub actors: Vec<(TierKind, Addr<TierActor>)>,
    /// The NVMe tier itself, for the streams CRIU reads and writes directly
    /// ([`crate::streaming`]); the same tier its actor serves.
    pub nvme: Option<Arc<NvmeTier>>,
    /// The S3 tier itself, for uploads straight from NVMe chunks.
    pub s3: Option<Arc<S3Tier>>,
}

impl Tiers {
    /// The kinds of tiers the agent has, nearest first.
    pub fn kinds(&self) -> Vec<TierKind> {
        self.actors.iter().map(|(k, _)| *k).collect()
    }

    /// The actor of `kind`, if the agent has that tier.
    pub fn get(&self, kind: TierKind) -> Option<&Addr<TierActor>> {
        self.actors.iter().find(|(k, _)| *k == kind).map(|(_, a)| a)
    }
}
