//! Handing a checkpoint's images to the agent after containerd's call has returned.
//! containerd (`ctr`, the CRI) wants the images in a directory of its own, which it archives
//! into its content store after the shim's Checkpoint returns, holding the task paused all
//! the while. So CRIU dumps straight into that directory, exactly as runc's shim does; a first
//! ContainerCheckpointEnd (`images_follow`) gives the GPUs back at once, and the images reach
//! the agent's RAM tier once containerd has resumed the task, so that the copy does not slow
//! containerd's archive down: copied through handles opened before Checkpoint returned
//! (containerd deletes its directory when it is done), then committed with a second
//! ContainerCheckpointEnd. The shim does not exit before its handoffs end.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kybernate_proto::agent::v1 as pb;
use tokio::sync::Mutex;
use tokio::task::JoinSet;

use crate::agent_link::GpuAgent;
use crate::containers::ContainerTable;

/// How often a handoff looks whether containerd has resumed the task.
const RESUME_POLL: Duration = Duration::from_millis(20);

/// Containers by id, as the task service keeps them.
pub type Containers = Arc<ContainerTable>;

/// Copies of a flat CRIU image directory, holding every source file open.
#[derive(Debug)]
pub struct ImageCopy {
    files: Vec<(std::ffi::OsString, std::fs::File)>,
    to: PathBuf,
}

impl ImageCopy {
    /// Opens every image in `from`, to be copied into `to`.
    pub fn open(from: &Path, to: &Path) -> std::io::Result<Self> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                files.push((entry.file_name(), std::fs::File::open(entry.path())?));
            }
        }
        Ok(Self {
            files,
            to: to.to_owned(),
        })
    }

    /// Copies every opened image.
    pub fn run(self) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.to)?;
        for (name, mut file) in self.files {
            let mut copy = std::fs::File::create(self.to.join(name))?;
            std::io::copy(&mut file, &mut copy)?;
        }
        Ok(())
    }
}

/// One checkpoint's images on their way to the agent.
#[derive(Debug)]
pub struct Handoff {
    /// The task service's containers, to see when containerd resumes the task.
    pub containers: Containers,
    /// The container.
    pub id: String,
    /// At most this long to wait for the resume.
    pub wait: Duration,
    /// The agent.
    pub agent: Arc<dyn GpuAgent>,
    /// The opened images.
    pub copy: ImageCopy,
    /// The End committing the images.
    pub end: pb::ContainerCheckpointEndRequest,
    /// Deadline of that End.
    pub timeout: Duration,
}

/// Handoffs still running, awaited before the shim exits.
#[derive(Debug, Default)]
pub struct Handoffs {
    running: Mutex<JoinSet<()>>,
}

impl Handoffs {
    /// Once the container is no longer paused (or after `handoff.wait`), copies the images
    /// into the agent's directory and ends the checkpoint: committed when the copy succeeded,
    /// dropped when not. Either way containerd's own copy of the checkpoint stands.
    pub async fn start(&self, handoff: Handoff) {
        let Handoff {
            containers,
            id,
            wait,
            agent,
            copy,
            end,
            timeout,
        } = handoff;
        let task = async move {
            wait_until_resumed(&containers, &id, wait).await;
            let copied = tokio::task::spawn_blocking(move || copy.run())
                .await
                .map_err(std::io::Error::other)
                .and_then(|copied| copied);
            let request = match &copied {
                Ok(()) => end,
                Err(e) => pb::ContainerCheckpointEndRequest {
                    dumped: false,
                    failure: format!("copy the images into the agent's RAM tier: {e}"),
                    ..end
                },
            };
            let reference = request.checkpoint_ref.clone();
            match (agent.checkpoint_end(request, timeout).await, copied) {
                (Ok(reply), Ok(())) => log::info!(
                    "checkpointed {id} as {} ({} bytes, tiers {:?})",
                    reply.checkpoint_ref,
                    reply.raw_bytes,
                    reply.tiers
                ),
                (Ok(_), Err(e)) => log::error!(
                    "container {id}: containerd holds the checkpoint, but the agent's copy \
                     {reference} failed and was dropped: {e}"
                ),
                (Err(e), _) => log::error!(
                    "container {id}: containerd holds the checkpoint, but the agent could not \
                     end {reference} in phase {}: {}",
                    e.phase,
                    e.message
                ),
            }
        };
        self.running.lock().await.spawn(task);
    }

    /// Waits for every running handoff, at most `limit`.
    /// (A handoff of a task that stays paused waits its own `wait` first.)
    pub async fn finish(&self, limit: Duration) {
        let mut running = self.running.lock().await;
        let all = async { while running.join_next().await.is_some() {} };
        if tokio::time::timeout(limit, all).await.is_err() {
            log::error!(
                "{} checkpoint handoffs to the agent did not end within {} ms",
                running.len(),
                limit.as_millis()
            );
        }
    }
}

/// Returns once container `id` is gone or not paused, or after `wait`.
async fn wait_until_resumed(containers: &Containers, id: &str, wait: Duration) {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if !containers.is_paused(id) {
            return;
        }
        tokio::time::sleep(RESUME_POLL).await;
    }
}
