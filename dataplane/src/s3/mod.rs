//! The S3 tier: each checkpoint is a manifest object plus, for its new chunks, one pack object
//! written as one multipart upload. Chunks already held in any pack under the prefix (from
//! earlier checkpoints, or other nodes' replicas of the same model) are referenced, not
//! uploaded again. Restores fetch chunks with parallel ranged GETs. Beside them the bucket
//! keeps the agent's record of each checkpoint, for restores on other nodes.
//!
//! Many nodes share one bucket and prefix, with no lock between them. Correctness comes
//! from four rules:
//! - A manifest is created with `If-None-Match: *`, so no node overwrites another's
//!   checkpoint: a different checkpoint under a taken name is an error naming it.
//! - Before its first part a store writes an upload lease ([`lease`]) naming the pack it
//!   writes and the packs it may reference, renews it while it runs, and deletes it after its
//!   commit or abort.
//! - Garbage collection ([`gc`]) marks a pack only when it is older than the grace period,
//!   referenced by no checkpoint and named by no live lease, and deletes it only when the mark
//!   is older than the grace period and the pack is still neither referenced nor leased. A
//!   store reads the marks after writing its lease and references no marked pack, so a pack
//!   that a store may use is either leased when collection looks, or was marked before the
//!   store looked and is then never used by it.
//! - Per-checkpoint index objects ([`index`]) list each checkpoint's packs and chunks, so
//!   neither stores nor collection read every manifest each time.

mod config;
mod from_nvme;
mod gc;
mod index;
mod lease;
mod objects;
mod records;
mod request;
mod store;
mod upload;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;

pub use config::{S3Config, Secret, MAX_PARTS, MIN_PART_SIZE};
pub use gc::{GcReport, UnfinishedUpload};
pub use lease::LeaseInfo;
use request::{remote, retrying, status};
use upload::PackUpload;

use crate::buffer::{AlignedBuf, BufferPool};
use crate::chunk::{ChunkConfig, ChunkEncoding, ChunkHash};
use crate::manifest::{CheckpointManifest, ChunkLocation, ChunkRef, MAX_MANIFEST_BYTES};
use crate::pipeline::{drain_image_set, ChunkIndex, DrainStats, StoredChunk};
use crate::restore::{restore_image_set, ChunkFetch};
use crate::{CheckpointName, LoadReport, StoreReport, Tier, TierError, TierKind};

const TIER: TierKind = TierKind::S3;

/// Object-storage tier (see the module docs). Blocking like every [`Tier`]; it runs its own
/// small tokio runtime, so it must not be called from inside an async task.
#[derive(Debug)]
pub struct S3Tier {
    config: S3Config,
    prefix: String,
    client: Client,
    rt: OwnRuntime,
    chunk: ChunkConfig,
    pool: BufferPool,
    /// This node's name in leases and pack keys ([`S3Config::node_id`] or the host name).
    node_id: String,
    /// Index objects and manifests read before, by (kind, checkpoint), with the
    /// LastModified (ms) they had: they never change within a generation of a checkpoint.
    index_cache: Mutex<IndexCache>,
    /// Multipart uploads whose abort failed (server unreachable): (key, upload id).
    pending_aborts: Mutex<Vec<(String, String)>>,
    /// Which key seals new checkpoints and which ones may be opened.
    sealing: crate::Sealing,
}

/// The tier's private runtime; dropping it never blocks, so the tier may be dropped anywhere,
/// even inside an async task.
#[derive(Debug)]
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl std::ops::Deref for OwnRuntime {
    type Target = tokio::runtime::Runtime;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("runtime present until drop")
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

type IndexCache = HashMap<(char, CheckpointName), (i64, Arc<CheckpointManifest>)>;

/// Which chunks the packs under the prefix hold, with global pack numbers.
#[derive(Default)]
struct PackIndex {
    packs: Vec<String>,
    chunks: HashMap<ChunkHash, (ChunkEncoding, u32, u32, u64)>,
}

impl PackIndex {
    /// Stops offering the chunks of the packs in `gone` (relative keys).
    fn forget_packs(&mut self, gone: &BTreeSet<String>) {
        let ids: BTreeSet<u32> = self
            .packs
            .iter()
            .enumerate()
            .filter(|(_, p)| gone.contains(*p))
            .map(|(i, _)| u32::try_from(i).expect("fewer than 4G packs"))
            .collect();
        self.chunks.retain(|_, c| !ids.contains(&c.2));
    }

    /// Relative keys of the packs that still hold offered chunks.
    fn offered_packs(&self) -> Vec<String> {
        let ids: BTreeSet<u32> = self.chunks.values().map(|c| c.2).collect();
        ids.into_iter()
            .map(|i| self.packs[usize::try_from(i).expect("fits")].clone())
            .collect()
    }
}

/// One object from a listing.
struct ListedObject {
    key: String,
    size: i64,
    /// LastModified in ms since the Unix epoch.
    modified_ms: i64,
}

/// Outcome of a create-only PUT.
enum Put {
    Created,
    /// `If-None-Match: *` failed: the key exists.
    Exists,
}

/// Wall-clock milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A string no other call on this node returns: time in ns and a counter, in hex.
fn unique_nonce() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{nanos:x}{:x}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// The configured node id, or this host's name cut to the characters a node id may have.
fn resolve_node_id(configured: &str) -> String {
    if !configured.is_empty() {
        return configured.to_owned();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let id: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    if id.is_empty() {
        "node".into()
    } else {
        id
    }
}

impl ChunkIndex for PackIndex {
    fn lookup(&self, hash: &ChunkHash, _raw_len: u32) -> Result<Option<StoredChunk>, TierError> {
        Ok(self
            .chunks
            .get(hash)
            .map(|&(encoding, stored_len, pack, offset)| StoredChunk {
                encoding,
                stored_len,
                location: ChunkLocation::Pack { pack, offset },
            }))
    }
}

impl S3Tier {
    /// Builds the client and checks that the bucket exists and the credentials work, so a bad
    /// configuration fails at start-up with a clear error.
    pub fn connect(config: S3Config, chunk: ChunkConfig) -> Result<Self, TierError> {
        Self::connect_sealed(config, chunk, crate::Sealing::plain())
    }

    /// [`S3Tier::connect`] with encryption at rest: new checkpoints are sealed as `sealing`
    /// says, and sealed ones are opened with its keys.
    pub fn connect_sealed(
        config: S3Config,
        chunk: ChunkConfig,
        sealing: crate::Sealing,
    ) -> Result<Self, TierError> {
        config.validate()?;
        chunk
            .validate()
            .map_err(|detail| TierError::Config { tier: TIER, detail })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kyb-s3")
            .enable_all()
            .build()
            .map_err(|e| TierError::Io {
                tier: TIER,
                op: "start S3 runtime",
                path: Default::default(),
                source: e,
            })?;
        let creds = Credentials::new(
            config.access_key_id.clone(),
            config.secret_access_key.expose().to_owned(),
            config.session_token.as_ref().map(|t| t.expose().to_owned()),
            None,
            "kybernate-config",
        );
        let mut builder = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .http_client(https_client())
            .region(Region::new(config.region.clone()))
            .credentials_provider(creds)
            .force_path_style(config.force_path_style)
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(config.connect_timeout_secs))
                    .build(),
            )
            // Integrity is end to end: every chunk is verified against its BLAKE3 on restore.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if !config.endpoint.is_empty() {
            builder = builder.endpoint_url(config.endpoint.clone());
        }
        let client = Client::from_conf(builder.build());
        let tier = Self {
            prefix: config.normalized_prefix(),
            node_id: resolve_node_id(&config.node_id),
            index_cache: Mutex::new(HashMap::new()),
            pool: BufferPool::new(
                chunk.chunk_size + crate::SEAL_OVERHEAD,
                config.fetch_concurrency + chunk.worker_count() * 2 + 8,
            ),
            config,
            client,
            rt: OwnRuntime(Some(rt)),
            chunk,
            pending_aborts: Mutex::new(Vec::new()),
            sealing,
        };
        tier.check_bucket()?;
        Ok(tier)
    }

    fn check_bucket(&self) -> Result<(), TierError> {
        let bucket = &self.config.bucket;
        let result = self.rt.block_on(retrying(&self.config, "head bucket", || {
            self.client.head_bucket().bucket(bucket).send()
        }));
        match result {
            Ok(_) => Ok(()),
            Err((e, _)) if status(&e) == Some(404) => Err(TierError::Remote {
                tier: TIER,
                op: "open bucket".into(),
                key: bucket.clone(),
                detail: format!("bucket {bucket} does not exist (HTTP 404)"),
            }),
            Err((e, n)) => Err(remote("open bucket", bucket, &e, n)),
        }
    }

    /// The settings in use.
    pub fn config(&self) -> &S3Config {
        &self.config
    }

    /// Object key of the manifest of `name`.
    pub fn manifest_key(&self, name: &CheckpointName) -> String {
        format!("{}manifests/{name}", self.prefix)
    }

    fn packs_prefix(&self) -> String {
        format!("{}packs/", self.prefix)
    }

    /// Reads and validates the manifest of `name`.
    pub fn manifest(&self, name: &CheckpointName) -> Result<CheckpointManifest, TierError> {
        let key = self.manifest_key(name);
        let corrupt = |detail: String| TierError::Corrupt {
            tier: TIER,
            name: name.clone(),
            detail: format!("manifest {key}: {detail}"),
        };
        let body = self
            .get_small("get manifest", &key, MAX_MANIFEST_BYTES + 64, corrupt)?
            .ok_or_else(|| TierError::NotFound {
                tier: TIER,
                name: name.clone(),
            })?;
        let manifest = self.parse_manifest(name, &key, &body)?;
        if &manifest.name != name {
            return Err(corrupt(format!("names checkpoint {}", manifest.name)));
        }
        Ok(manifest)
    }

    /// Which key seals new checkpoints and which ones may be opened.
    pub fn sealing(&self) -> &crate::Sealing {
        &self.sealing
    }

    /// The key that opens `manifest`'s chunks (`None`: plain), or why it cannot be opened.
    pub fn opening_key(
        &self,
        manifest: &CheckpointManifest,
    ) -> Result<Option<&std::sync::Arc<crate::SealKey>>, TierError> {
        self.sealing
            .opening_key(TIER, &manifest.name, manifest.key_id.as_ref())
    }

    /// Parses the manifest or index object `key` of `name` with this tier's keys; a key this
    /// node lacks is [`TierError::Sealing`], anything else wrong [`TierError::Corrupt`].
    pub(super) fn parse_manifest(
        &self,
        name: &CheckpointName,
        key: &str,
        body: &[u8],
    ) -> Result<CheckpointManifest, TierError> {
        CheckpointManifest::read_with_keys(body, self.sealing.ring().map(|r| &**r)).map_err(|e| {
            let detail = format!("{key}: {e}");
            match e {
                crate::ManifestError::Key(..) => TierError::Sealing {
                    tier: TIER,
                    name: name.clone(),
                    detail,
                },
                _ => TierError::Corrupt {
                    tier: TIER,
                    name: name.clone(),
                    detail,
                },
            }
        })
    }

    /// `manifest` (or an index object) as the bytes of its object, authenticated under its
    /// key when it is sealed.
    pub(super) fn encode(&self, manifest: &CheckpointManifest) -> Result<bytes::Bytes, TierError> {
        let mut buf = Vec::new();
        let encoded =
            match self
                .sealing
                .opening_key(TIER, &manifest.name, manifest.key_id.as_ref())?
            {
                Some(key) => manifest.write_sealed(&mut buf, key),
                None => manifest.write_to(&mut buf),
            };
        encoded.map_err(|e| TierError::Corrupt {
            tier: TIER,
            name: manifest.name.clone(),
            detail: format!("cannot be encoded: {e}"),
        })?;
        Ok(bytes::Bytes::from(buf))
    }

    /// The body of the small object `key` (a manifest or a record), `None` when it does not
    /// exist. A body over `max` bytes or cut short is reported through `corrupt`.
    fn get_small(
        &self,
        op: &str,
        key: &str,
        max: u64,
        corrupt: impl Fn(String) -> TierError,
    ) -> Result<Option<bytes::Bytes>, TierError> {
        let out = self.rt.block_on(retrying(&self.config, op, || {
            self.client
                .get_object()
                .bucket(&self.config.bucket)
                .key(key)
                .send()
        }));
        let out = match out {
            Ok(out) => out,
            Err((e, _)) if status(&e) == Some(404) => return Ok(None),
            Err((e, n)) => return Err(remote(op, key, &e, n)),
        };
        let len = out.content_length().unwrap_or(0);
        if u64::try_from(len).map_or(true, |l| l > max) {
            return Err(corrupt(format!("size {len} is out of bounds")));
        }
        let body = self
            .rt
            .block_on(out.body.collect())
            .map_err(|e| corrupt(format!("reading the body failed: {e}")))?;
        Ok(Some(body.into_bytes()))
    }

    /// The node id this tier writes into leases and pack keys.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Writes `body` at `key`; with `create_only`, only if nothing is there
    /// (`If-None-Match: *`), which S3 evaluates atomically.
    fn put_object(
        &self,
        key: &str,
        body: bytes::Bytes,
        create_only: bool,
    ) -> Result<Put, TierError> {
        let op = if create_only { "create" } else { "put" };
        let result = self.rt.block_on(retrying(&self.config, op, || {
            self.client
                .put_object()
                .bucket(&self.config.bucket)
                .key(key)
                .set_if_none_match(create_only.then(|| "*".to_owned()))
                .body(ByteStream::from(body.clone()))
                .send()
        }));
        match result {
            Ok(_) => Ok(Put::Created),
            Err((e, _)) if create_only && status(&e) == Some(412) => Ok(Put::Exists),
            Err((e, n)) => Err(remote(op, key, &e, n)),
        }
    }

    fn list_keys(&self, prefix: &str) -> Result<Vec<ListedObject>, TierError> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = self
                .rt
                .block_on(retrying(&self.config, "list objects", || {
                    self.client
                        .list_objects_v2()
                        .bucket(&self.config.bucket)
                        .prefix(prefix)
                        .set_continuation_token(token.clone())
                        .send()
                }))
                .map_err(|(e, n)| remote("list", prefix, &e, n))?;
            for obj in out.contents() {
                if let Some(key) = obj.key() {
                    let modified_ms = obj.last_modified().map_or(0, |t| {
                        t.secs() * 1000 + i64::from(t.subsec_nanos() / 1_000_000)
                    });
                    keys.push(ListedObject {
                        key: key.to_owned(),
                        size: obj.size().unwrap_or(0),
                        modified_ms,
                    });
                }
            }
            match out.next_continuation_token() {
                Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => return Ok(keys),
            }
        }
    }

    /// Aborts multipart uploads whose abort failed earlier; returns how many were aborted.
    pub fn abort_pending_uploads(&self) -> Result<usize, TierError> {
        let pending = std::mem::take(
            &mut *self
                .pending_aborts
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        let mut done = 0;
        let mut first_err = None;
        for (key, id) in pending {
            match self.abort_upload(&key, &id) {
                Ok(()) => done += 1,
                Err(e) => {
                    self.remember_abort(&key, &id);
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(done), Err)
    }

    fn abort_upload(&self, key: &str, upload_id: &str) -> Result<(), TierError> {
        let result = self
            .rt
            .block_on(retrying(&self.config, "abort multipart upload", || {
                self.client
                    .abort_multipart_upload()
                    .bucket(&self.config.bucket)
                    .key(key)
                    .upload_id(upload_id)
                    .send()
            }));
        match result {
            Ok(_) => Ok(()),
            // Already gone (aborted or never created): nothing is left.
            Err((e, _)) if status(&e) == Some(404) => Ok(()),
            Err((e, n)) => Err(remote("abort multipart upload of", key, &e, n)),
        }
    }

    fn remember_abort(&self, key: &str, upload_id: &str) {
        let mut pending = self
            .pending_aborts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        pending.push((key.to_owned(), upload_id.to_owned()));
    }
}

/// The S3 client's HTTPS stack on rustls with ring, the one TLS crypto backend of the whole
/// tree (kube's client uses it too). The SDK's default client would pull in aws-lc-rs as a
/// second backend and its C build.
fn https_client() -> aws_sdk_s3::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}
