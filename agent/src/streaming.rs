//! Streamed checkpoints and restores: CRIU's images travel between CRIU and the NVMe tier's
//! chunk store over CRIU's image-streamer socket (`--stream`), never as an image set in the
//! RAM tier, when the config's `dataplane.stream` is on. A checkpoint asked for NVMe or S3
//! streams; one asked for RAM keeps the RAM path,
//! which parks the workload in host memory on purpose. A restore whose nearest copy is on NVMe
//! streams from it; a damaged chunk makes CRIU abort before the process runs, and the restore
//! falls back to the next tier that holds the checkpoint.

use std::path::PathBuf;
use std::sync::Arc;

use kybernate_dataplane::{
    CheckpointManifest, CheckpointName, NvmeTier, StoreReport, StreamCapture, TierError, TierKind,
};

use crate::blocking_work::blocking;
use crate::catalog::CheckpointRecord;
use crate::config::TimeoutsConfig;
use crate::criu::{Restore, Restored};
use crate::error::AgentError;
use crate::events::PhaseClock;
use crate::images::ImageFile;
use crate::node_parts::NodeParts;
use crate::process;
use crate::tiers::Contains;

/// The NVMe tier a checkpoint that must reach `until` streams into, if it streams.
pub fn capture_target(parts: &NodeParts, until: TierKind) -> Option<Arc<NvmeTier>> {
    if until < TierKind::Nvme || !parts.config.dataplane.stream {
        return None;
    }
    parts.tiers.nvme.clone()
}

/// Starts receiving CRIU's stream for `name` into `nvme`, in the empty private `dir`.
pub async fn start_capture(
    nvme: Arc<NvmeTier>,
    name: &CheckpointName,
    dir: PathBuf,
) -> Result<StreamCapture, AgentError> {
    let capture_name = name.clone();
    blocking(move || nvme.capture(&capture_name, &dir))
        .await?
        .map_err(|source| tier_error(name, "store_nvme", source))
}

/// Ends a capture after CRIU's dump: commits it when CRIU succeeded; otherwise discards it
/// and returns the capture's own failure, if it had one (then the cause of CRIU's failure).
pub async fn end_capture(
    capture: StreamCapture,
    dumped: bool,
) -> Result<Result<StoreReport, TierError>, AgentError> {
    blocking(move || {
        if dumped {
            capture.commit()
        } else {
            match capture.abort() {
                Some(own) => Err(own),
                None => Ok(StoreReport::default()),
            }
        }
    })
    .await
}

/// The image digests of a streamed checkpoint, taken from its manifest: the same hashes a
/// digest pass over the images would give, so a later prefetch into RAM is verified, and a
/// drain addressed, exactly as for a checkpoint taken through RAM.
pub fn files_of(manifest: &CheckpointManifest) -> Vec<ImageFile> {
    let chunk_size = usize::try_from(manifest.chunk_size).expect("u32 fits usize");
    manifest
        .files
        .iter()
        .map(|f| ImageFile {
            name: f.name.clone(),
            size: f.size,
            chunk_size,
            chunks: f.chunks.iter().map(|c| c.hash.to_hex()).collect(),
        })
        .collect()
}

/// The digests of checkpoint `name` as `nvme` holds it.
pub async fn files_in(
    nvme: Arc<NvmeTier>,
    name: &CheckpointName,
) -> Result<Vec<ImageFile>, AgentError> {
    let read_name = name.clone();
    let manifest = blocking(move || nvme.manifest(&read_name))
        .await?
        .map_err(|source| tier_error(name, "store_nvme", source))?;
    Ok(files_of(&manifest))
}

/// Stores checkpoint `name` from the NVMe tier into S3 as phase `store_s3`, uploading the
/// stored chunks as they are (no decompression, no copy in RAM).
pub async fn store_s3_from_nvme(
    parts: &NodeParts,
    clock: &mut PhaseClock,
    name: &CheckpointName,
) -> Result<StoreReport, AgentError> {
    let (Some(nvme), Some(s3)) = (parts.tiers.nvme.clone(), parts.tiers.s3.clone()) else {
        return Err(AgentError::InvalidRequest(
            "this agent has no NVMe and S3 tiers to move a checkpoint between".into(),
        ));
    };
    let millis = parts.config.timeouts.store_ms;
    let upload_name = name.clone();
    let report = clock
        .run("store_s3", async {
            let upload = blocking(move || s3.store_from_nvme(&upload_name, &nvme));
            let done = tokio::time::timeout(TimeoutsConfig::of(millis), upload)
                .await
                .map_err(|_| AgentError::Timeout {
                    name: name.to_string(),
                    phase: "store_s3".into(),
                    millis,
                })??;
            done.map(|(report, _)| report)
                .map_err(|source| tier_error(name, "store_s3", source))
        })
        .await?;
    parts.metrics.drained(TierKind::S3.as_str(), &report);
    Ok(report)
}

/// Whether the nearest of `candidates` holding `name` is NVMe and the agent can stream it.
pub async fn nearest_is_nvme(
    parts: &NodeParts,
    name: &CheckpointName,
    candidates: &[TierKind],
) -> Result<bool, AgentError> {
    if parts.tiers.nvme.is_none() || !parts.config.dataplane.stream {
        return Ok(false);
    }
    for kind in candidates {
        let Some(tier) = parts.tiers.get(*kind) else {
            continue;
        };
        let held = tier
            .send(Contains(name.clone()))
            .await?
            .map_err(|source| tier_error(name, &format!("find_{kind}"), source))?;
        if held {
            return Ok(*kind == TierKind::Nvme);
        }
    }
    Ok(false)
}

/// How a streamed restore failed.
#[derive(Debug)]
pub enum StreamedRestoreError {
    /// The NVMe copy is damaged (named in the error); CRIU aborted before the process ran,
    /// and another tier may still hold a good copy.
    Damaged(AgentError),
    /// CRIU or the agent failed for another reason.
    Failed(AgentError),
}

/// Restores `record` with CRIU reading its images straight from the NVMe tier, as phase
/// `criu_restore`. The caller has waited for the PID to be free.
pub async fn restore_from_nvme(
    parts: &NodeParts,
    record: &CheckpointRecord,
    name: &CheckpointName,
    clock: &mut PhaseClock,
) -> Result<Restored, StreamedRestoreError> {
    use StreamedRestoreError::{Damaged, Failed};
    let nvme = parts
        .tiers
        .nvme
        .clone()
        .ok_or_else(|| Failed(AgentError::Internal("no NVMe tier".into())))?;
    let dir = parts.ram.root().join(format!(
        ".partial-stream-restore-{name}-{:08x}",
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| {
        Failed(AgentError::Internal(format!(
            "cannot create {}: {e}",
            dir.display()
        )))
    })?;
    let _cleanup = RemoveOnDrop(dir.clone());
    let (serve_name, serve_dir) = (name.clone(), dir.clone());
    let serve = blocking(move || nvme.serve(&serve_name, &serve_dir))
        .await
        .map_err(Failed)?
        .map_err(|source| Damaged(tier_error(name, "load_nvme", source)))?;
    let restore = Restore {
        images_dir: dir.clone(),
        log: parts
            .config
            .logs_dir()
            .join(format!("{}-restore.log", record.name)),
        shell_job: record.shell_job,
        timeout: TimeoutsConfig::of(parts.config.timeouts.restore_ms),
        stream_check: Some(serve.action_script().to_owned()),
    };
    let _ = std::fs::create_dir_all(parts.config.logs_dir());
    let restored = clock
        .run("criu_restore", async {
            parts
                .criu
                .send(restore)
                .await?
                .map_err(|source| AgentError::Criu {
                    name: record.name.clone(),
                    source,
                    resumed: false,
                })
        })
        .await;
    let served = blocking(move || serve.finish()).await.map_err(Failed)?;
    match (restored, served) {
        (Ok(restored), Ok(report)) => {
            parts.metrics.loaded(TierKind::Nvme.as_str(), report.bytes);
            Ok(restored)
        }
        (restored, Err(source)) => {
            // CRIU's post-restore check has already refused the tree; should it ever have
            // let one through, it must not run on damaged state.
            if let Ok(restored) = restored {
                process::kill_tree(&process::tree(restored.pid));
            }
            Err(Damaged(tier_error(name, "load_nvme", source)))
        }
        (Err(e), Ok(_)) => Err(Failed(e)),
    }
}

fn tier_error(name: &CheckpointName, phase: &str, source: TierError) -> AgentError {
    AgentError::Tier {
        name: name.to_string(),
        phase: phase.into(),
        source: Box::new(source),
    }
}

/// Removes a scratch directory when the operation using it ends, however it ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kybernate_dataplane::{ChunkEncoding, ChunkHash, ChunkLocation, ChunkRef, FileEntry};

    #[test]
    fn a_manifest_gives_the_digests_a_digest_pass_would() {
        let chunk = |hash, encoding| ChunkRef {
            hash,
            encoding,
            raw_len: 4096,
            stored_len: 0,
            location: ChunkLocation::Store,
        };
        let data = ChunkHash::of(b"page");
        let manifest = CheckpointManifest {
            name: CheckpointName::new("cp").unwrap(),
            key_id: None,
            chunk_size: 4096,
            packs: Vec::new(),
            files: vec![FileEntry {
                name: "pages-1.img".into(),
                size: 8192,
                mode: 0o600,
                chunks: vec![
                    chunk(ChunkHash::ZERO, ChunkEncoding::Zero),
                    chunk(data, ChunkEncoding::Raw),
                ],
            }],
        };
        let files = files_of(&manifest);
        assert_eq!(
            files,
            vec![ImageFile {
                name: "pages-1.img".into(),
                size: 8192,
                chunk_size: 4096,
                chunks: vec![ChunkHash::ZERO.to_hex(), data.to_hex()],
            }]
        );
        let digest = crate::images::to_digest(&files).unwrap();
        assert_eq!(digest.files[0].chunks, vec![ChunkHash::ZERO, data]);
    }
}
