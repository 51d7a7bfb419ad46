//! One checkpoint's new chunks as one multipart upload of a pack object.
//!
//! Chunks are appended to pinned part buffers; a full buffer becomes `Bytes` without a copy
//! and is uploaded by a task on the tier's runtime while the pipeline goes on. The part pool
//! has `parts_in_flight + 1` buffers, so at most that many parts are in flight and memory stays
//! flat. Each part is retried with backoff; if one fails for good the upload is aborted, so no
//! orphaned parts remain (or, if the server is gone, the abort is retried on the next store).

use std::sync::Arc;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use tokio::task::JoinHandle;

use super::request::{remote, retrying};
use super::S3Tier;
use crate::buffer::{BufferPool, PooledBuf};
use crate::chunk::{ChunkEncoding, ChunkHash};
use crate::manifest::ChunkLocation;
use crate::pipeline::{ChunkWriter, StoredChunk};
use crate::{ByteRate, TierError, TierKind};

/// Writer of the pack object of one store.
pub(crate) struct PackUpload<'a> {
    tier: &'a S3Tier,
    key: String,
    /// Index of this pack in the store's pack table.
    pack_id: u32,
    part_pool: BufferPool,
    upload_id: Option<String>,
    current: Option<PooledBuf>,
    next_part: i32,
    offset: u64,
    tasks: Vec<JoinHandle<Result<CompletedPart, TierError>>>,
    parts: Vec<CompletedPart>,
    /// The upload limit, when one applies to this store.
    rate: Option<Arc<ByteRate>>,
}

impl<'a> PackUpload<'a> {
    pub fn new(
        tier: &'a S3Tier,
        key: String,
        pack_id: u32,
        part_pool: BufferPool,
        rate: Option<Arc<ByteRate>>,
    ) -> Self {
        Self {
            tier,
            key,
            pack_id,
            part_pool,
            upload_id: None,
            current: None,
            next_part: 1,
            offset: 0,
            tasks: Vec::new(),
            parts: Vec::new(),
            rate,
        }
    }

    fn upload_id(&mut self) -> Result<String, TierError> {
        if let Some(id) = &self.upload_id {
            return Ok(id.clone());
        }
        let t = self.tier;
        let out =
            t.rt.block_on(retrying(&t.config, "create multipart upload", || {
                t.client
                    .create_multipart_upload()
                    .bucket(&t.config.bucket)
                    .key(&self.key)
                    .send()
            }))
            .map_err(|(e, n)| remote("create multipart upload for", &self.key, &e, n))?;
        let id = out
            .upload_id()
            .map(str::to_owned)
            .ok_or_else(|| TierError::Remote {
                tier: TierKind::S3,
                op: "create multipart upload for".into(),
                key: self.key.clone(),
                detail: "the server returned no upload id".into(),
            })?;
        self.upload_id = Some(id.clone());
        Ok(id)
    }

    /// Fails early when a part already failed for good.
    fn check_failed(&mut self) -> Result<(), TierError> {
        while let Some(i) = self.tasks.iter().position(|t| t.is_finished()) {
            let done = self.tasks.swap_remove(i);
            match self.tier.rt.block_on(done) {
                Ok(Ok(part)) => self.parts.push(part),
                Ok(Err(e)) => return Err(e),
                Err(join) => return Err(task_panicked(&self.key, &join)),
            }
        }
        Ok(())
    }

    fn send_current(&mut self) -> Result<(), TierError> {
        let Some(buf) = self.current.take() else {
            return Ok(());
        };
        if buf.as_slice().is_empty() {
            return Ok(());
        }
        let upload_id = self.upload_id()?;
        let part_number = self.next_part;
        self.next_part += 1;
        let bytes = buf.into_bytes();
        let t = self.tier;
        let (client, config, key) = (t.client.clone(), t.config.clone(), self.key.clone());
        let rate = self.rate.clone();
        self.tasks.push(t.rt.spawn(async move {
            let len = i64::try_from(bytes.len()).expect("part fits i64");
            if let Some(rate) = rate {
                rate.pace(u64::try_from(len).expect("non-negative")).await;
            }
            let out = retrying(&config, "upload part", || {
                client
                    .upload_part()
                    .bucket(&config.bucket)
                    .key(&key)
                    .upload_id(&upload_id)
                    .part_number(part_number)
                    .content_length(len)
                    .body(ByteStream::from(bytes.clone()))
                    .send()
            })
            .await
            .map_err(|(e, n)| remote(format!("upload part {part_number} of"), &key, &e, n))?;
            Ok(CompletedPart::builder()
                .part_number(part_number)
                .set_e_tag(out.e_tag().map(str::to_owned))
                .build())
        }));
        Ok(())
    }

    /// Waits for every part and completes the upload; on any failure aborts it instead.
    /// Returns whether a pack object now exists.
    pub fn finish(mut self) -> Result<bool, TierError> {
        let sent = self.send_current();
        let mut parts = std::mem::take(&mut self.parts);
        let mut failure = sent.err();
        for task in std::mem::take(&mut self.tasks) {
            match self.tier.rt.block_on(task) {
                Ok(Ok(part)) => parts.push(part),
                Ok(Err(e)) => {
                    failure.get_or_insert(e);
                }
                Err(join) => {
                    failure.get_or_insert(task_panicked(&self.key, &join));
                }
            }
        }
        let Some(upload_id) = self.upload_id.take() else {
            return failure.map_or(Ok(false), Err);
        };
        if let Some(e) = failure {
            return Err(self.abort_after(&upload_id, e));
        }
        parts.sort_by_key(|p| p.part_number());
        let t = self.tier;
        let done = CompletedMultipartUpload::builder()
            .set_parts(Some(parts))
            .build();
        let completed =
            t.rt.block_on(retrying(&t.config, "complete multipart upload", || {
                t.client
                    .complete_multipart_upload()
                    .bucket(&t.config.bucket)
                    .key(&self.key)
                    .upload_id(&upload_id)
                    .multipart_upload(done.clone())
                    .send()
            }));
        match completed {
            Ok(_) => Ok(true),
            Err((e, n)) => {
                let err = remote("complete multipart upload of", &self.key, &e, n);
                Err(self.abort_after(&upload_id, err))
            }
        }
    }

    /// Aborts the upload after `cause`; the returned error says whether the abort worked.
    pub fn abort(mut self, cause: TierError) -> TierError {
        for task in std::mem::take(&mut self.tasks) {
            let _ = self.tier.rt.block_on(task);
        }
        match self.upload_id.take() {
            Some(id) => self.abort_after(&id, cause),
            None => cause,
        }
    }

    fn abort_after(&self, upload_id: &str, cause: TierError) -> TierError {
        match self.tier.abort_upload(&self.key, upload_id) {
            Ok(()) => {
                tracing::warn!(key = %self.key, error = %cause, "multipart upload aborted");
                cause
            }
            Err(abort) => {
                self.tier.remember_abort(&self.key, upload_id);
                TierError::Remote {
                    tier: TierKind::S3,
                    op: "upload".into(),
                    key: self.key.clone(),
                    detail: format!(
                        "{cause}; aborting the multipart upload failed too ({abort}); \
                         the abort is retried on the next store"
                    ),
                }
            }
        }
    }
}

fn task_panicked(key: &str, join: &tokio::task::JoinError) -> TierError {
    TierError::Remote {
        tier: TierKind::S3,
        op: "upload part of".into(),
        key: key.to_owned(),
        detail: format!("upload task failed: {join}"),
    }
}

impl ChunkWriter for PackUpload<'_> {
    fn put(
        &mut self,
        _hash: ChunkHash,
        encoding: ChunkEncoding,
        data: PooledBuf,
    ) -> Result<StoredChunk, TierError> {
        self.check_failed()?;
        let offset = self.offset;
        let mut rest = data.as_slice();
        while !rest.is_empty() {
            let part_size = self.part_pool.buf_size();
            let current = self.current.get_or_insert_with(|| self.part_pool.take());
            let used = current.as_slice().len();
            let n = rest.len().min(part_size - used);
            current.spare_mut()[used..used + n].copy_from_slice(&rest[..n]);
            current.set_len(used + n);
            rest = &rest[n..];
            if used + n == part_size {
                self.send_current()?;
            }
        }
        let stored_len = u32::try_from(data.as_slice().len()).expect("chunk below 4 GiB");
        self.offset += u64::from(stored_len);
        Ok(StoredChunk {
            encoding,
            stored_len,
            location: ChunkLocation::Pack {
                pack: self.pack_id,
                offset,
            },
        })
    }
}
