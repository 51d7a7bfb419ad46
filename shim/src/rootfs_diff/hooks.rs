//! Where the rootfs diff meets the task service: around the dump at checkpoint, and after
//! the agent staged the images at a restore through the annotation.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Instant;

use containerd_shim::protos::shim::oci::CheckpointOptions;

use crate::error::{Result, ShimError};
use crate::process::Target;
use crate::service::{read_spec, TaskService};

impl TaskService {
    /// Runs `dump` (the `runc checkpoint` of `container` into `images`) and writes the
    /// writable layer's diff beside the images while the container cannot write: a task that
    /// stays running is paused around dump + diff (CRIU checks the size of the files a
    /// process holds open at restore, so a write after the dump would break it); a paused
    /// task (containerd's client pauses around its checkpoint) or one the dump ends is
    /// diffed as it is. A rootfs that is not an overlay is logged and carries no diff.
    pub async fn dump_with_rootfs_diff(
        &self,
        container: &Target,
        was_paused: bool,
        options: &CheckpointOptions,
        images: &Path,
        dump: impl Future<Output = Result<()>>,
    ) -> Result<()> {
        let id = container.id.as_str();
        let Some((upper, excluded)) = self.writable_layer(container) else {
            return dump.await;
        };
        let pause = !options.exit && !was_paused;
        let begin = Instant::now();
        if pause {
            self.runc_freeze(container, "pause").await?;
        }
        let paused_at = Instant::now();
        let dumped = dump.await;
        let dumped_at = Instant::now();
        let diffed = match dumped {
            Ok(()) => {
                let out = images.to_owned();
                tokio::task::spawn_blocking(move || super::capture(&upper, &excluded, &out))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                    .map_err(|message| ShimError::Phase {
                        id: id.to_owned(),
                        operation: "checkpoint",
                        phase: "rootfs_diff",
                        message,
                    })
            }
            Err(e) => Err(e),
        };
        let diffed_at = Instant::now();
        let thawed = if pause {
            self.runc_freeze(container, "resume").await
        } else {
            Ok(())
        };
        if let Ok(summary) = &diffed {
            let ms = |from: Instant, to: Instant| to.duration_since(from).as_secs_f64() * 1e3;
            log::info!(
                "container {id}: rootfs diff of {} entries, {} deletions, {} bytes: diff {:.1} ms; \
                 paused by the shim: {pause} (pause {:.1} ms, dump {:.1} ms, resume {:.1} ms)",
                summary.entries,
                summary.deletions,
                summary.tar_bytes,
                ms(dumped_at, diffed_at),
                ms(begin, paused_at),
                ms(paused_at, dumped_at),
                ms(diffed_at, Instant::now())
            );
        }
        let diffed = diffed.map(drop);
        match (diffed, thawed) {
            (Ok(()), thawed) => thawed,
            (Err(e), Ok(())) => Err(e),
            (Err(e), Err(t)) => Err(ShimError::State {
                id: id.to_owned(),
                message: format!("{e}; and then {t}"),
            }),
        }
    }

    /// The overlay upper dir of the container's rootfs and the spec's mount points; `None`
    /// (logged) when the rootfs is no overlay with an upper dir, e.g. the native snapshotter's
    /// bind mount, where the shim cannot tell the container's changes from the image.
    fn writable_layer(
        &self,
        container: &Target,
    ) -> Option<(PathBuf, std::collections::BTreeSet<PathBuf>)> {
        let id = container.id.as_str();
        let rootfs = container.bundle.join("rootfs");
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        match super::overlay_upper(&mountinfo, &rootfs) {
            Ok(upper) => {
                let excluded = read_spec(id, &container.bundle)
                    .map(|spec| super::mount_points(&spec))
                    .unwrap_or_default();
                Some((upper, excluded))
            }
            Err(fstype) => {
                log::warn!(
                    "container {id}: the rootfs {} is {fstype}, not an overlay with an upper \
                     dir; the checkpoint carries no rootfs diff, and files written into the \
                     rootfs are not restored",
                    rootfs.display()
                );
                None
            }
        }
    }

    /// `runc pause` / `runc resume`; a resume of a container that already runs (a dump that
    /// ran past its deadline is thawed by the dump's own clean-up) is fine.
    async fn runc_freeze(&self, container: &Target, verb: &str) -> Result<()> {
        let id = container.id.as_str();
        let log = container.runc_log();
        let freeze = [verb.to_owned(), id.to_owned()];
        let done = container
            .runc
            .run(id, &freeze, Default::default(), Some(&log))
            .await;
        if done.is_err()
            && verb == "resume"
            && container.runc.status(id).await.as_deref() == Some("running")
        {
            return Ok(());
        }
        done.map(drop).map_err(|e| ShimError::Phase {
            id: id.to_owned(),
            operation: "checkpoint",
            phase: "rootfs_freeze",
            message: format!("{verb} around the rootfs diff: {e}"),
        })
    }

    /// Applies the staged checkpoint's rootfs diff (if it has one) onto `bundle/rootfs`
    /// before `runc restore`; on failure the staged images are released and Create fails
    /// naming the checkpoint, so no half-restored container starts.
    pub async fn apply_rootfs_diff(
        &self,
        id: &str,
        reference: &str,
        images: &Path,
        bundle: &Path,
    ) -> Result<()> {
        let images = images.to_owned();
        let rootfs = bundle.join("rootfs");
        let applied = tokio::task::spawn_blocking(move || {
            if super::present(&images)? {
                super::apply(&images, &rootfs).map(Some)
            } else {
                Ok(None)
            }
        })
        .await;
        let failure = match applied {
            Ok(Ok(Some(summary))) => {
                log::info!(
                    "container {id}: applied the rootfs diff of {reference} ({} entries, {} \
                     deletions)",
                    summary.entries,
                    summary.deletions
                );
                return Ok(());
            }
            Ok(Ok(None)) => {
                log::info!("container {id}: checkpoint {reference} carries no rootfs diff");
                return Ok(());
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        self.release_staged(id, reference).await;
        Err(ShimError::Phase {
            id: id.to_owned(),
            operation: "restore",
            phase: "rootfs_apply",
            message: format!("rootfs diff of checkpoint {reference}: {failure}"),
        })
    }
}
