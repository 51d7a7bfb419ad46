//! The receiving side of `criu dump --stream`: CRIU's images flow from their pipes straight
//! into the NVMe tier's chunk store, with no copy of the image set in tmpfs or host RAM.
//!
//! One reader thread per open image fills chunk-sized buffers from its pipe (small images in
//! ordinary memory, page images in pinned pool buffers). The tier's workers skip zero chunks,
//! hash the rest, deduplicate them against the tier, compress them adaptively into pinned
//! buffers, and the collector hands new chunks to the tier's io_uring writer. The manifest is
//! written only when the caller says CRIU's dump succeeded ([`StreamCapture::commit`]); any
//! failure (a pipe, the disk, the protocol, or CRIU itself) removes every chunk the capture
//! added. A failure on our side closes the pipes and the socket, so CRIU's next write fails
//! at once and CRIU resumes the workload instead of waiting on a stream nobody reads.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, Scope, ScopedJoinHandle};

use crate::chunk::{ChunkConfig, ChunkEncoding, ChunkHash};
use crate::manifest::{CheckpointManifest, ChunkLocation, ChunkRef, FileEntry};
use crate::nvme::StorePins;
use crate::pipeline::{ChunkWriter, DrainStats, StoredChunk};
use crate::stream::barrier::{tell, CommitBarrier};
use crate::stream::chunker::{read_image, stream_error, work, Done, Failure, Job, Outcome, Shared};
use crate::stream::wire::{self, CAPTURE_SOCKET};
use crate::{CancelToken, CheckpointName, NvmeTier, StoreReport, Tier, TierError, TierKind};

const TIER: TierKind = TierKind::Nvme;
/// Permission bits of every streamed image, as CRIU creates image files (`CR_FD_PERM`).
const IMAGE_MODE: u32 = 0o600;
/// A streamed store in progress; see the module docs.
#[derive(Debug)]
pub struct StreamCapture {
    tier: Arc<NvmeTier>,
    name: CheckpointName,
    socket: PathBuf,
    script: PathBuf,
    verdict: Option<SyncSender<bool>>,
    stop: Arc<AtomicBool>,
    session: Option<JoinHandle<SessionResult>>,
}

/// How a capture session ended; `Err(None)` means discarded on the caller's word, with
/// nothing wrong on this side.
type SessionResult = Result<(StoreReport, DrainStats), Option<TierError>>;

impl NvmeTier {
    /// Starts receiving `criu dump --stream` for checkpoint `name`: listens on CRIU's capture
    /// socket in `images_dir` (an existing private directory; no image is written there).
    /// Start CRIU with `--stream -D images_dir --action-script <action_script()>` after this
    /// returns; the script makes CRIU's post-dump step the commit point (see `barrier`). Then
    /// call [`StreamCapture::commit`] if CRIU succeeded and [`StreamCapture::abort`] if not.
    pub fn capture(
        self: &Arc<Self>,
        name: &CheckpointName,
        images_dir: &Path,
    ) -> Result<StreamCapture, TierError> {
        if self.manifest_path(name).exists() {
            return Err(stream_error(name, "the tier already holds this checkpoint"));
        }
        let socket = images_dir.join(CAPTURE_SOCKET);
        let io = |op, source| TierError::Io {
            tier: TIER,
            op,
            path: socket.clone(),
            source,
        };
        match std::fs::remove_file(&socket) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io("remove", e)),
            _ => {}
        }
        let listener = UnixListener::bind(&socket).map_err(|e| io("listen on", e))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io("chmod", e))?;
        // CRIU's socket, once connected: reaching post-dump ends its request loop.
        let connected: Arc<Mutex<Option<UnixStream>>> = Arc::default();
        let barrier = {
            let connected = Arc::clone(&connected);
            CommitBarrier::create(images_dir, move || {
                let sock = connected.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(sock) = sock.as_ref() {
                    let _ = sock.shutdown(std::net::Shutdown::Read);
                }
            })
            .map_err(|e| TierError::Io {
                tier: TIER,
                op: "create the commit barrier in",
                path: images_dir.to_owned(),
                source: e,
            })?
        };
        let script = barrier.script().to_owned();
        let (verdict_tx, verdict_rx) = sync_channel(1);
        let stop = Arc::new(AtomicBool::new(false));
        let session = {
            let session = Session {
                tier: Arc::clone(self),
                name: name.clone(),
                dir: images_dir.to_owned(),
                listener,
                verdict: verdict_rx,
                stop: Arc::clone(&stop),
                barrier,
                connected,
            };
            std::thread::Builder::new()
                .name("kyb-stream-capture".into())
                .spawn(move || session.run())
                .map_err(|e| io("start capture thread for", e))?
        };
        Ok(StreamCapture {
            tier: Arc::clone(self),
            name: name.clone(),
            socket,
            script,
            verdict: Some(verdict_tx),
            stop,
            session: Some(session),
        })
    }
}

impl StreamCapture {
    /// The socket CRIU connects to.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The script to pass to CRIU as `--action-script`.
    pub fn action_script(&self) -> &Path {
        &self.script
    }

    /// CRIU's dump succeeded: waits for the stream to end and every chunk to be durable, then
    /// writes the manifest, which makes the checkpoint exist in the tier (done already if CRIU
    /// ran the action script).
    pub fn commit(mut self) -> Result<StoreReport, TierError> {
        if let Some(verdict) = self.verdict.take() {
            let _ = verdict.send(true);
        }
        self.join()
            .map(|(report, _)| report)
            .map_err(|e| e.unwrap_or_else(|| stream_error(&self.name, "the capture was discarded")))
    }

    /// CRIU's dump failed (or was stopped): ends the capture and removes every chunk it added
    /// (and the checkpoint, if CRIU failed after its post-dump step committed it). Returns the
    /// capture's own failure, if it had one: a full disk or an unreadable pipe, which is then
    /// why CRIU failed.
    pub fn abort(mut self) -> Option<TierError> {
        self.stop_session()
    }

    fn stop_session(&mut self) -> Option<TierError> {
        self.stop.store(true, Ordering::SeqCst);
        self.verdict.take();
        // Wakes the session if CRIU never connected.
        let _ = UnixStream::connect(&self.socket);
        match self.join() {
            Ok(_) => self.tier.remove(&self.name).err(),
            Err(e) => e,
        }
    }

    fn join(&mut self) -> SessionResult {
        let result = match self.session.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(Some(stream_error(
                &self.name,
                "the capture thread panicked",
            ))),
            None => Err(Some(stream_error(&self.name, "the capture already ended"))),
        };
        let _ = std::fs::remove_file(&self.socket);
        result
    }
}

impl Drop for StreamCapture {
    fn drop(&mut self) {
        if self.session.is_some() {
            let _ = self.stop_session();
        }
    }
}

/// What the capture thread owns.
struct Session {
    tier: Arc<NvmeTier>,
    name: CheckpointName,
    dir: PathBuf,
    listener: UnixListener,
    verdict: Receiver<bool>,
    stop: Arc<AtomicBool>,
    barrier: CommitBarrier,
    connected: Arc<Mutex<Option<UnixStream>>>,
}

impl Session {
    /// Pins what the capture uses in the tier from the first byte to the commit.
    fn run(mut self) -> SessionResult {
        let tier = &*self.tier;
        let name = &self.name;
        let pins = StorePins::new(tier, name).map_err(Some)?;
        // The capture stops through `stop` and the failure path, which also end CRIU's side.
        let never = CancelToken::new();
        let mut writer = tier.chunk_writer(None, &never, &pins);
        let mut never_connected = false;
        let received = self
            .listener
            .accept()
            .map_err(|e| TierError::Io {
                tier: TIER,
                op: "accept CRIU on",
                path: self.dir.join(CAPTURE_SOCKET),
                source: e,
            })
            .and_then(|(sock, _)| {
                if self.stop.load(Ordering::SeqCst) {
                    never_connected = true;
                    return Err(stream_error(name, "stopped before CRIU connected"));
                }
                *self.connected.lock().unwrap_or_else(|e| e.into_inner()) = sock.try_clone().ok();
                receive(tier, &pins, name, &self.dir, sock, &mut writer)
            });
        if let Some(fifo) = self.barrier.finish() {
            // CRIU waits in its post-dump step: commit now, before it ends or resumes the tree.
            let done = tier.finish_store(writer, received);
            tell(fifo, done.is_ok());
            return done.map_err(Some);
        }
        let discarded = never_connected || (received.is_ok() && self.verdict.recv() != Ok(true));
        let decided = received.and_then(|done| {
            if discarded {
                Err(stream_error(
                    name,
                    "CRIU's dump failed; the stream is discarded",
                ))
            } else {
                Ok(done)
            }
        });
        match tier.finish_store(writer, decided) {
            Ok(done) => Ok(done),
            Err(_) if discarded => Err(None),
            Err(e) => Err(Some(e)),
        }
    }
}

/// What one image's reader learned.
struct ImageMeta {
    name: String,
    size: u64,
}

fn receive(
    tier: &NvmeTier,
    pins: &StorePins<'_>,
    name: &CheckpointName,
    dir: &Path,
    sock: UnixStream,
    writer: &mut dyn ChunkWriter,
) -> Result<(CheckpointManifest, DrainStats), TierError> {
    let config = tier.config();
    let workers = config.worker_count();
    let shared = Shared {
        name,
        dir,
        config,
        key: tier.sealing().writing_key().map(|k| &**k),
        staging: tier.plane().staging().clone(),
        failure: Failure {
            failed: AtomicBool::new(false),
            first: Mutex::new(None),
            socket: sock.try_clone().map_err(|e| TierError::Io {
                tier: TIER,
                op: "clone CRIU's socket",
                path: dir.join(CAPTURE_SOCKET),
                source: e,
            })?,
        },
    };
    let backlog = writer.backlog();
    let _running = tier.plane().gate().session(crate::WorkClass::Foreground);
    let mut stats = DrainStats::default();
    let mut slots: Vec<Vec<Option<ChunkRef>>> = Vec::new();
    let images = std::thread::scope(|s| {
        let (job_tx, job_rx) = sync_channel::<Job>(workers * 2);
        let (done_tx, done_rx) = sync_channel::<Result<Done, TierError>>(workers * 2);
        let job_rx = Arc::new(Mutex::new(job_rx));
        for _ in 0..workers {
            let job_rx = Arc::clone(&job_rx);
            let done_tx = done_tx.clone();
            let (shared, backlog) = (&shared, backlog.as_deref());
            let gate = tier.plane().gate();
            s.spawn(move || work(shared, &job_rx, &done_tx, tier.pool(), pins, backlog, gate));
        }
        drop(done_tx);
        drop(job_rx);
        let shared = &shared;
        let control = s.spawn(move || serve_requests(s, shared, sock, job_tx));
        let mut written: std::collections::HashMap<ChunkHash, StoredChunk> =
            std::collections::HashMap::new();
        for msg in done_rx {
            let done = match msg {
                Ok(done) if !shared.failure.is_set() => done,
                Ok(_) => continue,
                Err(e) => {
                    shared.failure.fail(e);
                    continue;
                }
            };
            let raw = u64::from(done.raw_len);
            stats.raw_bytes += raw;
            let stored = match done.outcome {
                Outcome::Zero => {
                    stats.zero_bytes += raw;
                    StoredChunk {
                        encoding: ChunkEncoding::Zero,
                        stored_len: 0,
                        location: ChunkLocation::Store,
                    }
                }
                Outcome::Known(stored) => {
                    stats.dedup_bytes += raw;
                    stored
                }
                Outcome::New(encoding, buf) => {
                    if let Some(stored) = written.get(&done.hash) {
                        stats.dedup_bytes += raw;
                        *stored
                    } else {
                        let len = u64::try_from(buf.as_slice().len()).expect("fits");
                        match writer.put(done.hash, encoding, buf) {
                            Ok(stored) => {
                                stats.new_chunks += 1;
                                stats.new_stored_bytes += len;
                                written.insert(done.hash, stored);
                                stored
                            }
                            Err(e) => {
                                shared.failure.fail(e);
                                continue;
                            }
                        }
                    }
                }
            };
            if slots.len() <= done.file {
                slots.resize_with(done.file + 1, Vec::new);
            }
            let file = &mut slots[done.file];
            if file.len() <= done.index {
                file.resize(done.index + 1, None);
            }
            file[done.index] = Some(ChunkRef {
                hash: done.hash,
                encoding: stored.encoding,
                raw_len: done.raw_len,
                stored_len: stored.stored_len,
                location: stored.location,
            });
        }
        control
            .join()
            .unwrap_or_else(|_| Err(stream_error(name, "the request loop panicked")))
    });
    if let Some(e) = shared.failure.take() {
        return Err(e);
    }
    let images = images?;
    let mut manifest = build_manifest(name, config, images, slots)?;
    manifest.key_id = shared.key.map(|k| k.id().clone());
    Ok((manifest, stats))
}

fn build_manifest(
    name: &CheckpointName,
    config: &ChunkConfig,
    images: Vec<ImageMeta>,
    mut slots: Vec<Vec<Option<ChunkRef>>>,
) -> Result<CheckpointManifest, TierError> {
    slots.resize_with(images.len(), Vec::new);
    let chunk_size = u64::try_from(config.chunk_size).expect("fits");
    let mut files = images
        .into_iter()
        .zip(slots)
        .map(|(image, chunks)| {
            let want = usize::try_from(image.size.div_ceil(chunk_size)).expect("fits usize");
            let chunks: Option<Vec<ChunkRef>> = chunks.into_iter().collect();
            match chunks {
                Some(chunks) if chunks.len() == want => Ok(FileEntry {
                    name: image.name,
                    size: image.size,
                    mode: IMAGE_MODE,
                    chunks,
                }),
                _ => Err(stream_error(
                    name,
                    format!("image {}: a chunk was not processed", image.name),
                )),
            }
        })
        .collect::<Result<Vec<_>, TierError>>()?;
    files.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(pair) = files.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(stream_error(
            name,
            format!("CRIU sent image {} twice", pair[0].name),
        ));
    }
    Ok(CheckpointManifest {
        name: name.clone(),
        key_id: None,
        chunk_size: u32::try_from(config.chunk_size).expect("validated chunk size"),
        packs: Vec::new(),
        files,
    })
}

/// Takes CRIU's requests until it closes the socket, with one reader per image; returns the
/// images once every reader has finished.
fn serve_requests<'scope>(
    s: &'scope Scope<'scope, '_>,
    shared: &'scope Shared<'scope>,
    mut sock: UnixStream,
    jobs: SyncSender<Job>,
) -> Result<Vec<ImageMeta>, TierError> {
    let mut readers: Vec<(String, ScopedJoinHandle<'scope, Result<u64, TierError>>)> = Vec::new();
    let protocol = |e: io::Error| stream_error(shared.name, format!("CRIU's request: {e}"));
    loop {
        let request = wire::read_request(&mut sock).and_then(|name| match name {
            Some(name) => wire::recv_pipe(&sock).map(|pipe| Some((name, pipe))),
            None => Ok(None),
        });
        match request {
            Ok(Some((image, pipe))) => {
                let file = readers.len();
                let jobs = jobs.clone();
                let path = shared.dir.join(&image);
                let reader = s.spawn(move || read_image(shared, file, &path, pipe, &jobs));
                readers.push((image, reader));
            }
            Ok(None) => break,
            // A shutdown on failure ends the loop; that failure is the one reported.
            Err(_) if shared.failure.is_set() => break,
            Err(e) => {
                shared.failure.fail(protocol(e));
                break;
            }
        }
    }
    drop(jobs);
    drop(sock);
    let mut first_error = None;
    let mut images = Vec::with_capacity(readers.len());
    for (name, reader) in readers {
        let size = reader
            .join()
            .unwrap_or_else(|_| Err(stream_error(shared.name, "an image reader panicked")));
        match size {
            Ok(size) => images.push(ImageMeta { name, size }),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(images),
    }
}
