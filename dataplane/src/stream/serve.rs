//! The serving side of `criu restore --stream`: CRIU reads each image straight from the NVMe
//! tier's chunks, decompressed into its pipe, with no staging copy in tmpfs.
//!
//! Every chunk is hash-checked before any of its bytes are written to CRIU. A chunk that fails
//! stops its image there, and the serve records the failure in a marker file before it closes
//! the pipe. CRIU runs [`StreamServe::action_script`] at its post-restore step, after all
//! memory is read and before the restored tree runs; the script fails while the marker
//! exists, and CRIU then kills the tree it built. So a bad chunk never reaches a running
//! process, even when CRIU itself would have accepted a short image.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::manifest::CheckpointManifest;
use crate::stream::readahead::feed_image;
use crate::stream::wire::{self, SERVE_SOCKET};
use crate::{CheckpointName, LoadReport, NvmeTier, TierError, TierKind};

const TIER: TierKind = TierKind::Nvme;
/// Name of the marker a failed chunk leaves in the images directory.
const FAILED_MARKER: &str = "stream-failed";
/// Name of the action script in the images directory.
const ACTION_SCRIPT: &str = "stream-check";

/// A streamed restore in progress; see the module docs.
#[derive(Debug)]
pub struct StreamServe {
    name: CheckpointName,
    socket: PathBuf,
    script: PathBuf,
    stop: Arc<AtomicBool>,
    session: Option<JoinHandle<Result<LoadReport, TierError>>>,
}

impl NvmeTier {
    /// Starts serving checkpoint `name` to `criu restore --stream -D images_dir`: reads and
    /// checks the manifest, writes the action script and listens on CRIU's serve socket in
    /// `images_dir` (an existing private directory). Run CRIU with
    /// `--action-script <action_script()>`, then call [`StreamServe::finish`].
    pub fn serve(
        self: &Arc<Self>,
        name: &CheckpointName,
        images_dir: &Path,
    ) -> Result<StreamServe, TierError> {
        let manifest = self.manifest(name)?;
        let marker = images_dir.join(FAILED_MARKER);
        let script = images_dir.join(ACTION_SCRIPT);
        let socket = images_dir.join(SERVE_SOCKET);
        let io = |op, path: &Path, source| TierError::Io {
            tier: TIER,
            op,
            path: path.to_owned(),
            source,
        };
        let marker_text = marker
            .to_str()
            .filter(|p| !p.contains('\''))
            .ok_or_else(|| TierError::Config {
                tier: TIER,
                detail: format!(
                    "restore directory {} must be UTF-8 without quotes",
                    images_dir.display()
                ),
            })?;
        for stale in [&marker, &script, &socket] {
            match fs::remove_file(stale) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(io("remove", stale, e))
                }
                _ => {}
            }
        }
        let text = format!(
            "#!/bin/sh\n# Kybernate's restore stream: fail CRIU's post-restore step, so the \
             restored tree is killed before it runs, when a chunk failed its check.\n\
             [ \"$CRTOOLS_SCRIPT_ACTION\" != post-restore ] || [ ! -e '{marker_text}' ]\n"
        );
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o700)
            .open(&script)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| io("write action script", &script, e))?;
        let listener = UnixListener::bind(&socket).map_err(|e| io("listen on", &socket, e))?;
        fs::set_permissions(&socket, fs::Permissions::from_mode(0o600))
            .map_err(|e| io("chmod", &socket, e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let session = {
            let tier = Arc::clone(self);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("kyb-stream-serve".into())
                .spawn(move || run(&tier, &manifest, &listener, &marker, &stop))
                .map_err(|e| io("start serve thread for", &socket, e))?
        };
        Ok(StreamServe {
            name: name.clone(),
            socket,
            script,
            stop,
            session: Some(session),
        })
    }
}

impl StreamServe {
    /// The socket CRIU connects to.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The script to pass to CRIU as `--action-script` (see the module docs).
    pub fn action_script(&self) -> &Path {
        &self.script
    }

    /// Call once CRIU has exited: ends serving and reports the first chunk that failed, naming
    /// the checkpoint, image and chunk, or the bytes served.
    pub fn finish(mut self) -> Result<LoadReport, TierError> {
        self.end()
    }

    fn end(&mut self) -> Result<LoadReport, TierError> {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the session if CRIU never connected.
        let _ = UnixStream::connect(&self.socket);
        let result = match self.session.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(TierError::Stream {
                tier: TIER,
                name: self.name.clone(),
                detail: "the serve thread panicked".into(),
            }),
            None => Ok(LoadReport::default()),
        };
        let _ = fs::remove_file(&self.socket);
        result
    }
}

impl Drop for StreamServe {
    fn drop(&mut self) {
        if self.session.is_some() {
            let _ = self.end();
        }
    }
}

fn run(
    tier: &NvmeTier,
    manifest: &CheckpointManifest,
    listener: &UnixListener,
    marker: &Path,
    stop: &AtomicBool,
) -> Result<LoadReport, TierError> {
    let stream_error = |detail: String| TierError::Stream {
        tier: TIER,
        name: manifest.name.clone(),
        detail,
    };
    let (mut sock, _) = listener
        .accept()
        .map_err(|e| stream_error(format!("accepting CRIU: {e}")))?;
    if stop.load(Ordering::SeqCst) {
        return Ok(LoadReport::default());
    }
    let first_error: Mutex<Option<TierError>> = Mutex::new(None);
    let served = AtomicU64::new(0);
    // CRIU waits on every image: background work yields until the restore has its images.
    let _running = tier.plane().gate().session(crate::WorkClass::Foreground);
    let failed = |e: TierError| {
        // The marker goes first: CRIU may only see the short image after it exists.
        let _ = File::create(marker);
        let mut first = first_error.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(e);
    };
    std::thread::scope(|s| loop {
        let request = match wire::read_request(&mut sock) {
            Ok(Some(name)) => name,
            Ok(None) => break,
            Err(e) => {
                failed(stream_error(format!("CRIU's request: {e}")));
                break;
            }
        };
        let entry = manifest
            .files
            .binary_search_by(|f| f.name.as_str().cmp(&request))
            .ok()
            .map(|i| &manifest.files[i]);
        let sent = wire::write_reply(&mut sock, entry.is_some())
            .and_then(|()| entry.map(|_| wire::recv_pipe(&sock)).transpose());
        let pipe = match sent {
            Ok(pipe) => pipe,
            Err(e) => {
                failed(stream_error(format!("answering CRIU for {request}: {e}")));
                break;
            }
        };
        if let (Some(entry), Some(pipe)) = (entry, pipe) {
            let (failed, served) = (&failed, &served);
            let workers = tier.config().worker_count();
            s.spawn(move || {
                let mut pipe = File::from(pipe);
                match feed_image(tier, manifest, entry, &mut pipe, workers) {
                    Ok(n) => {
                        served.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(e) => failed(e),
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    Ok(LoadReport {
        bytes: served.into_inner(),
    })
}
