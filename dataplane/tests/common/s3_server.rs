//! A real S3 HTTP server over loopback (s3s + s3s-fs), started by the tests, with a fault
//! switch on UploadPart: fail with 503 after N parts, or stop the whole server mid-upload,
//! and one on PutObject: stop the whole server when a given key is written.
//!
//! Two S3 semantics s3s-fs 0.14 lacks are added here, as AWS S3 has them:
//! - conditional writes (`If-None-Match` / `If-Match` on PutObject and
//!   CompleteMultipartUpload) are atomic: s3s-fs checks and then writes, so two racing
//!   creates could both succeed; here they are serialised;
//! - ListMultipartUploads, answered from s3s-fs's own files of the open uploads.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::dto::*;
use s3s::service::S3ServiceBuilder;
use s3s::{s3_error, S3Request, S3Response, S3Result, S3};
use tokio::sync::Notify;

/// Access key the server accepts.
pub const ACCESS_KEY: &str = "AKIAKYBERNATETEST";
/// Secret key the server accepts.
pub const SECRET_KEY: &str = "kybernate-test-secret";
/// Bucket created at start.
pub const BUCKET: &str = "checkpoints";

/// What UploadPart does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartFault {
    /// Works.
    None,
    /// The first N calls work, later ones answer 503.
    FailAfter(usize),
    /// The first N calls work; the next one stops the whole server.
    StopAfter(usize),
}

/// Counters and the fault switch, shared with the test.
#[derive(Debug)]
pub struct Faults {
    pub mode: Mutex<PartFault>,
    pub part_calls: AtomicUsize,
    pub creates: AtomicUsize,
    pub aborts: AtomicUsize,
    /// (part number, content length) of every UploadPart call.
    pub parts: Mutex<Vec<(i32, i64)>>,
    /// Keys of every DeleteObject call.
    pub deleted_keys: Mutex<Vec<String>>,
    /// Keys of every GetObject call.
    pub get_keys: Mutex<Vec<String>>,
    /// Keys of the conditional writes refused because the condition failed (HTTP 412).
    pub refused_keys: Mutex<Vec<String>>,
    /// A PutObject whose key contains this stops the whole server instead.
    pub stop_on_put: Mutex<Option<String>>,
    stop: Arc<Notify>,
}

struct FaultyFs {
    inner: s3s_fs::FileSystem,
    root: PathBuf,
    faults: Arc<Faults>,
    /// Held across every conditional write, so that its check and its write are atomic.
    conditional: tokio::sync::Mutex<()>,
}

impl FaultyFs {
    fn note_refusal<T>(&self, key: &str, result: &S3Result<T>) {
        if let Err(e) = result {
            if *e.code() == s3s::S3ErrorCode::PreconditionFailed {
                self.faults
                    .refused_keys
                    .lock()
                    .unwrap()
                    .push(key.to_owned());
            }
        }
    }
}

#[async_trait::async_trait]
impl S3 for FaultyFs {
    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.inner.head_bucket(req).await
    }
    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        self.inner.head_object(req).await
    }
    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        self.faults
            .get_keys
            .lock()
            .unwrap()
            .push(req.input.key.clone());
        self.inner.get_object(req).await
    }
    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let stop = self.faults.stop_on_put.lock().unwrap().clone();
        if stop.is_some_and(|k| req.input.key.contains(&k)) {
            self.faults.stop.notify_one();
            return Err(s3_error!(ServiceUnavailable, "injected: server stopping"));
        }
        if req.input.if_none_match.is_none() && req.input.if_match.is_none() {
            return self.inner.put_object(req).await;
        }
        let key = req.input.key.clone();
        let _atomic = self.conditional.lock().await;
        let result = self.inner.put_object(req).await;
        self.note_refusal(&key, &result);
        result
    }
    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        self.faults
            .deleted_keys
            .lock()
            .unwrap()
            .push(req.input.key.clone());
        self.inner.delete_object(req).await
    }
    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        self.inner.list_objects_v2(req).await
    }
    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        self.faults.creates.fetch_add(1, Ordering::SeqCst);
        self.inner.create_multipart_upload(req).await
    }
    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        let n = self.faults.part_calls.fetch_add(1, Ordering::SeqCst);
        let len = req.input.content_length.unwrap_or(-1);
        self.faults
            .parts
            .lock()
            .unwrap()
            .push((req.input.part_number, len));
        match *self.faults.mode.lock().unwrap() {
            PartFault::FailAfter(k) if n >= k => {
                return Err(s3_error!(
                    ServiceUnavailable,
                    "injected: server is not taking parts"
                ));
            }
            PartFault::StopAfter(k) if n >= k => {
                self.faults.stop.notify_one();
                return Err(s3_error!(ServiceUnavailable, "injected: server stopping"));
            }
            _ => {}
        }
        self.inner.upload_part(req).await
    }
    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        if req.input.if_none_match.is_none() && req.input.if_match.is_none() {
            return self.inner.complete_multipart_upload(req).await;
        }
        let key = req.input.key.clone();
        let _atomic = self.conditional.lock().await;
        let result = self.inner.complete_multipart_upload(req).await;
        self.note_refusal(&key, &result);
        result
    }
    async fn list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        let input = req.input;
        let prefix = input.prefix.clone().unwrap_or_default();
        let uploads = open_uploads(&self.root)
            .into_iter()
            .filter(|u| u.bucket == input.bucket && u.key.starts_with(&prefix))
            .map(|u| MultipartUpload {
                key: Some(u.key),
                upload_id: Some(u.upload_id),
                initiated: Some(Timestamp::from(u.initiated)),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(ListMultipartUploadsOutput {
            bucket: Some(input.bucket),
            prefix: input.prefix,
            uploads: Some(uploads),
            is_truncated: Some(false),
            ..Default::default()
        }))
    }
    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        self.faults.aborts.fetch_add(1, Ordering::SeqCst);
        self.inner.abort_multipart_upload(req).await
    }
}

/// A running server; stopped on drop.
pub struct S3Server {
    pub addr: SocketAddr,
    pub root: PathBuf,
    pub faults: Arc<Faults>,
    rt: Option<tokio::runtime::Runtime>,
    stopped: Arc<Notify>,
}

impl S3Server {
    /// Starts a server on a free loopback port with a fresh root holding [`BUCKET`].
    pub fn start(root: &Path) -> Self {
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        Self::start_at(root, "127.0.0.1:0".parse().unwrap())
    }

    /// Starts a server on `addr` serving the objects under `root` (for restarts).
    pub fn start_at(root: &Path, addr: SocketAddr) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let stop = Arc::new(Notify::new());
        let stopped = Arc::new(Notify::new());
        let faults = Arc::new(Faults {
            mode: Mutex::new(PartFault::None),
            part_calls: AtomicUsize::new(0),
            creates: AtomicUsize::new(0),
            aborts: AtomicUsize::new(0),
            parts: Mutex::new(Vec::new()),
            get_keys: Mutex::new(Vec::new()),
            deleted_keys: Mutex::new(Vec::new()),
            refused_keys: Mutex::new(Vec::new()),
            stop_on_put: Mutex::new(None),
            stop: Arc::clone(&stop),
        });
        let fs = FaultyFs {
            inner: s3s_fs::FileSystem::new(root).unwrap(),
            root: root.to_owned(),
            faults: Arc::clone(&faults),
            conditional: tokio::sync::Mutex::new(()),
        };
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = builder.build();
        let listener = rt.block_on(tokio::net::TcpListener::bind(addr)).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop2 = Arc::clone(&stop);
        let stopped2 = Arc::clone(&stopped);
        rt.spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((socket, _)) = accepted else { continue };
                        let service = service.clone();
                        conns.spawn(async move {
                            let http = ConnBuilder::new(TokioExecutor::new());
                            let _ = http.serve_connection(TokioIo::new(socket), service).await;
                        });
                    }
                    () = stop2.notified() => break,
                }
            }
            drop(listener);
            conns.abort_all();
            while conns.join_next().await.is_some() {}
            stopped2.notify_one();
        });
        Self {
            addr,
            root: root.to_owned(),
            faults,
            rt: Some(rt),
            stopped,
        }
    }

    /// Endpoint URL for clients.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets the UploadPart fault.
    pub fn set_fault(&self, fault: PartFault) {
        *self.faults.mode.lock().unwrap() = fault;
    }

    /// Waits until a stop triggered by [`PartFault::StopAfter`] has closed every connection.
    pub fn wait_stopped(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.block_on(self.stopped.notified());
            rt.shutdown_background();
        }
    }

    /// Stops the whole server when a PutObject's key contains `key_part`.
    pub fn stop_on_put(&self, key_part: &str) {
        *self.faults.stop_on_put.lock().unwrap() = Some(key_part.to_owned());
    }

    /// Files of unfinished multipart uploads left in the server's storage.
    pub fn leftover_upload_files(&self) -> Vec<String> {
        std::fs::read_dir(&self.root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(".upload"))
            .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            self.faults.stop.notify_one();
            rt.shutdown_background();
        }
    }
}

/// An open multipart upload in s3s-fs's storage.
pub struct OpenUpload {
    pub bucket: String,
    pub key: String,
    pub upload_id: String,
    pub initiated: std::time::SystemTime,
}

/// The open multipart uploads under `root`: s3s-fs keeps, for each, a file
/// `.upload-<id>.json` and a metadata file
/// `.bucket-<base64url bucket>.object-<base64url key>.upload-<id>.metadata.json` whose
/// modification time is when the upload was created.
pub fn open_uploads(root: &Path) -> Vec<OpenUpload> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let e = e.ok()?;
            let file = e.file_name().into_string().ok()?;
            let rest = file
                .strip_prefix(".bucket-")?
                .strip_suffix(".metadata.json")?;
            let (bucket, rest) = rest.split_once(".object-")?;
            let (key, upload_id) = rest.split_once(".upload-")?;
            if !root.join(format!(".upload-{upload_id}.json")).exists() {
                return None;
            }
            Some(OpenUpload {
                bucket: String::from_utf8(base64url_decode(bucket)?).ok()?,
                key: String::from_utf8(base64url_decode(key)?).ok()?,
                upload_id: upload_id.to_owned(),
                initiated: e.metadata().ok()?.modified().ok()?,
            })
        })
        .collect()
}

/// Decodes unpadded URL-safe base64, as s3s-fs writes it into file names.
fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        Some(u32::from(v))
    };
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in text.as_bytes() {
        acc = (acc << 6) | value(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).unwrap());
        }
    }
    Some(out)
}
