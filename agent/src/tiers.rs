//! One actor per storage tier. The actor itself only routes: bulk work (stores, loads,
//! removals, records) goes to `threads` blocking threads of its own, and metadata questions
//! (`contains`, `list`, `used bytes`) to one more thread, so they never queue behind a
//! store. The NVMe and RAM tiers answer those from memory; the S3 tier asks the bucket.
//! Tier work is blocking file and network I/O, so none of it runs on the async runtime.

use std::path::PathBuf;
use std::sync::Arc;

use actix::prelude::*;
use kybernate_dataplane::{
    CancelToken, CheckpointName, ImageDigest, LoadReport, NvmeTier, Pacing, S3Tier, StoreReport,
    Tier, TierError, TierKind,
};

/// The actor serving one tier (see the module docs).
#[derive(Debug)]
pub struct TierActor {
    bulk: Addr<TierWorker>,
    metadata: Addr<TierWorker>,
}

/// The blocking threads behind a [`TierActor`].
#[derive(Debug)]
pub struct TierWorker {
    tier: Arc<dyn Tier>,
}

impl Actor for TierWorker {
    type Context = SyncContext<Self>;
}

impl TierActor {
    /// Starts the actor of `tier`, with `threads` threads for its bulk work.
    pub fn start(tier: Arc<dyn Tier>, threads: usize) -> Addr<Self> {
        let bulk = {
            let tier = Arc::clone(&tier);
            SyncArbiter::start(threads.max(1), move || TierWorker { tier: tier.clone() })
        };
        let metadata = SyncArbiter::start(1, move || TierWorker { tier: tier.clone() });
        Self { bulk, metadata }.start()
    }
}

impl Actor for TierActor {
    type Context = Context<Self>;
}

/// Cancels a transfer's token when dropped: when the caller's timeout passes or the caller
/// itself goes away, the tier work it started stops too.
#[derive(Debug)]
pub struct CancelOnDrop(pub CancelToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// The tier's worker threads went away (the agent is shutting down).
fn unreachable_worker(e: MailboxError) -> TierError {
    TierError::Io {
        tier: TierKind::Ram,
        op: "reach the tier's worker threads",
        path: PathBuf::new(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// Forwards `msg` to `to` and hands back its answer.
fn forward<M, T>(to: &Addr<TierWorker>, msg: M) -> ResponseFuture<Result<T, TierError>>
where
    M: Message<Result = Result<T, TierError>> + Send + 'static,
    T: Send + 'static,
    TierWorker: Handler<M>,
{
    let sent = to.send(msg);
    Box::pin(async move { sent.await.unwrap_or_else(|e| Err(unreachable_worker(e))) })
}

/// Routes each message to the bulk or the metadata threads.
macro_rules! route {
    ($($msg:ty => $to:ident: $result:ty),* $(,)?) => {$(
        impl Handler<$msg> for TierActor {
            type Result = ResponseFuture<Result<$result, TierError>>;
            fn handle(&mut self, msg: $msg, _: &mut Self::Context) -> Self::Result {
                forward(&self.$to, msg)
            }
        }
    )*};
}

route! {
    Store => bulk: StoreReport,
    Load => bulk: LoadReport,
    Remove => bulk: bool,
    PutRecord => bulk: (),
    GetRecord => bulk: Option<Vec<u8>>,
    Contains => metadata: bool,
    List => metadata: Vec<CheckpointName>,
    UsedBytes => metadata: u64,
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

impl Handler<Store> for TierWorker {
    type Result = Result<StoreReport, TierError>;
    fn handle(&mut self, msg: Store, _: &mut Self::Context) -> Self::Result {
        self.tier
            .store_paced(&msg.name, &msg.image_dir, msg.digest.as_ref(), &msg.pacing)
    }
}

impl Handler<Load> for TierWorker {
    type Result = Result<LoadReport, TierError>;
    fn handle(&mut self, msg: Load, _: &mut Self::Context) -> Self::Result {
        self.tier.load_paced(&msg.name, &msg.dest, &msg.pacing)
    }
}

impl Handler<Contains> for TierWorker {
    type Result = Result<bool, TierError>;
    fn handle(&mut self, msg: Contains, _: &mut Self::Context) -> Self::Result {
        self.tier.contains(&msg.0)
    }
}

impl Handler<Remove> for TierWorker {
    type Result = Result<bool, TierError>;
    fn handle(&mut self, msg: Remove, _: &mut Self::Context) -> Self::Result {
        self.tier.remove(&msg.0)
    }
}

impl Handler<List> for TierWorker {
    type Result = Result<Vec<CheckpointName>, TierError>;
    fn handle(&mut self, _: List, _: &mut Self::Context) -> Self::Result {
        self.tier.list()
    }
}

impl Handler<UsedBytes> for TierWorker {
    type Result = Result<u64, TierError>;
    fn handle(&mut self, _: UsedBytes, _: &mut Self::Context) -> Self::Result {
        self.tier.used_bytes()
    }
}

impl Handler<PutRecord> for TierWorker {
    type Result = Result<(), TierError>;
    fn handle(&mut self, msg: PutRecord, _: &mut Self::Context) -> Self::Result {
        self.tier.put_record(&msg.name, &msg.record)
    }
}

impl Handler<GetRecord> for TierWorker {
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

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::mpsc;
    use std::sync::Mutex;

    use super::*;

    /// A tier whose stores wait until the test lets them finish; its metadata is in memory.
    #[derive(Debug)]
    struct GatedTier {
        entered: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
        release: Mutex<mpsc::Receiver<()>>,
        held: Vec<CheckpointName>,
    }

    impl Tier for GatedTier {
        fn kind(&self) -> TierKind {
            TierKind::Nvme
        }
        fn store(&self, _: &CheckpointName, _: &Path) -> Result<StoreReport, TierError> {
            if let Some(entered) = self.entered.lock().unwrap().take() {
                let _ = entered.send(());
            }
            self.release.lock().unwrap().recv().unwrap();
            Ok(StoreReport::default())
        }
        fn load(&self, _: &CheckpointName, _: &Path) -> Result<LoadReport, TierError> {
            Ok(LoadReport::default())
        }
        fn contains(&self, name: &CheckpointName) -> Result<bool, TierError> {
            Ok(self.held.contains(name))
        }
        fn remove(&self, _: &CheckpointName) -> Result<bool, TierError> {
            Ok(false)
        }
        fn list(&self) -> Result<Vec<CheckpointName>, TierError> {
            Ok(self.held.clone())
        }
        fn used_bytes(&self) -> Result<u64, TierError> {
            Ok(42)
        }
    }

    #[actix_rt::test]
    async fn list_contains_and_used_bytes_answer_while_every_bulk_thread_is_in_a_store() {
        let old = CheckpointName::new("old").unwrap();
        let (entered_tx, entered) = tokio::sync::oneshot::channel();
        let (release, release_rx) = mpsc::channel();
        let tier = GatedTier {
            entered: Mutex::new(Some(entered_tx)),
            release: Mutex::new(release_rx),
            held: vec![old.clone()],
        };
        let actor = TierActor::start(Arc::new(tier), 1);
        let store = actix_rt::spawn(actor.send(Store {
            name: CheckpointName::new("new").unwrap(),
            image_dir: PathBuf::from("/nonexistent"),
            digest: None,
            pacing: Pacing::default(),
        }));
        entered.await.unwrap();
        // The only bulk thread is inside the store and stays there until `release`.
        assert_eq!(actor.send(List).await.unwrap().unwrap(), vec![old.clone()]);
        assert!(actor.send(Contains(old)).await.unwrap().unwrap());
        assert_eq!(actor.send(UsedBytes).await.unwrap().unwrap(), 42);
        assert!(!store.is_finished(), "the store is still in progress");
        release.send(()).unwrap();
        assert_eq!(
            store.await.unwrap().unwrap().unwrap(),
            StoreReport::default()
        );
    }

    #[test]
    fn dropping_the_guard_cancels_the_transfer() {
        let token = CancelToken::new();
        drop(CancelOnDrop(token.clone()));
        assert!(token.is_cancelled());
    }
}
