//! GPU-aware checkpoint of a container (restore: [`crate::restore`]). GPU placement from the OCI
//! spec, checked against the node's GPUs as the agent reports them → the agent's CUDA phase
//! (lock + checkpoint, image dir in the RAM tier) → `runc checkpoint` → the agent commits
//! and stores the images. When containerd wants the images in a directory of its own (`ctr`,
//! the CRI), CRIU dumps there and the images reach the agent after the call returns (see
//! [`crate::handoff`]). Any failure up to the dump rolls back (CUDA resume) and the container
//! keeps running; the error names the failed phase. The agent holds the checkpoint under a
//! lease until End: the dump is started and run only while the lease lasts, so a shim that
//! was stalled never dumps (and, in stop mode, ends) a container the agent has given back.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use containerd_shim::api::CheckpointTaskRequest;
use containerd_shim::protos::events::task::TaskCheckpointed;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim::oci::CheckpointOptions;
use containerd_shim::protos::topics;
use kybernate_proto::agent::v1 as pb;
use oci_spec::runtime::Spec;

use crate::agent_link::{AgentCallError, GpuAgent};
use crate::config::millis;
use crate::error::{Result, ShimError};
use crate::gpu::{GpuPlacement, NodeGpus};
use crate::handoff::{Handoff, ImageCopy};
use crate::process::{ProcessStatus, Target};
use crate::runc_cli::RuncCli;
use crate::service::{read_spec, TaskService};

pub(crate) fn phase_error(id: &str, operation: &'static str, e: AgentCallError) -> ShimError {
    ShimError::Phase {
        id: id.to_owned(),
        operation,
        phase: e.phase,
        message: e.message,
    }
}

/// Parses containerd's checkpoint options (defaults when absent).
pub fn checkpoint_options(id: &str, req: &CheckpointTaskRequest) -> Result<CheckpointOptions> {
    match req.options.as_ref() {
        Some(any) if !any.value.is_empty() => CheckpointOptions::parse_from_bytes(&any.value)
            .map_err(|e| ShimError::Invalid {
                id: id.to_owned(),
                message: format!("checkpoint options ({}): {e}", any.type_url),
            }),
        _ => Ok(CheckpointOptions::default()),
    }
}

/// `runc checkpoint` arguments for `options`, writing into `images`.
pub fn dump_args(id: &str, options: &CheckpointOptions, images: &Path, work: &Path) -> Vec<String> {
    let mut args = vec![
        "checkpoint".to_owned(),
        "--image-path".to_owned(),
        images.display().to_string(),
        "--work-path".to_owned(),
        work.display().to_string(),
    ];
    if !options.exit {
        args.push("--leave-running".into());
    }
    if options.open_tcp {
        args.push("--tcp-established".into());
    }
    if options.external_unix_sockets {
        args.push("--ext-unix-sk".into());
    }
    if options.terminal {
        args.push("--shell-job".into());
    }
    if options.file_locks {
        args.push("--file-locks".into());
    }
    if !options.cgroups_mode.is_empty() {
        args.push("--manage-cgroups-mode".into());
        args.push(options.cgroups_mode.clone());
    }
    for ns in &options.empty_namespaces {
        args.push("--empty-ns".into());
        args.push(ns.clone());
    }
    args.push(id.to_owned());
    args
}

/// CRIU's work directory (its logs) for a dump: the client's `work_path` (`ctr c checkpoint
/// --work-path`), as with runc's shim, else one in the bundle.
pub fn dump_work_dir(options: &CheckpointOptions, bundle: &Path) -> PathBuf {
    if options.work_path.is_empty() {
        bundle.join("criu-work")
    } else {
        PathBuf::from(&options.work_path)
    }
}

/// The last lines of a CRIU log mentioning an error, for messages.
pub fn criu_errors(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error") || l.contains("error"))
        .collect();
    let tail = &lines[lines.len().saturating_sub(3)..];
    if tail.is_empty() {
        String::new()
    } else {
        format!(" (CRIU log {}: {})", log.display(), tail.join(" | "))
    }
}

impl TaskService {
    /// containerd's task Checkpoint.
    pub async fn checkpoint_task(&self, req: CheckpointTaskRequest) -> Result<()> {
        let id = req.id.clone();
        let options = checkpoint_options(&id, &req)?;
        let busy = self.containers.begin(&id, "checkpoint")?;
        let (status, exited, target) =
            busy.with(|c| (c.init.status, c.init.exit().is_some(), c.target()));
        // containerd's client pauses the task around a checkpoint (to snapshot the rootfs).
        let live = matches!(status, ProcessStatus::Running | ProcessStatus::Paused);
        if exited || !live {
            return Err(ShimError::State {
                id,
                message: format!(
                    "cannot checkpoint: the task is {status:?}, not running or paused"
                )
                .to_lowercase(),
            });
        }
        let was_paused = status == ProcessStatus::Paused;
        let reference = self
            .checkpoint_container(
                &target,
                was_paused,
                &options,
                images_wanted_at(&options, &req.path),
            )
            .await?;
        drop(busy);
        let event = TaskCheckpointed {
            container_id: id,
            checkpoint: reference,
            ..Default::default()
        };
        self.publish(topics::TASK_CHECKPOINTED_EVENT_TOPIC, Box::new(event));
        Ok(())
    }

    async fn checkpoint_container(
        &self,
        container: &Target,
        was_paused: bool,
        options: &CheckpointOptions,
        wanted_at: &str,
    ) -> Result<String> {
        let id = container.id.as_str();
        let timeouts = &self.config.timeouts;
        let spec = read_spec(id, &container.bundle)?;
        let placement = GpuPlacement::from_spec(&spec);
        let agent = self
            .agents
            .connect(millis(timeouts.agent_ms))
            .await
            .map_err(|e| phase_error(id, "checkpoint", e))?;
        self.check_gpus(agent.as_ref(), id, "checkpoint", &placement)
            .await?;
        let pids = Self::container_pids(&container.runc, id, &container.runc_log()).await?;

        let begin = agent
            .checkpoint_begin(
                pb::ContainerCheckpointBeginRequest {
                    name: String::new(),
                    container_id: id.to_owned(),
                    pod_uid: pod_uid(&spec),
                    pids,
                    gpu_group: placement.group(),
                    gpu_seat: String::new(),
                    cuda_timeout_ms: timeouts.cuda_ms,
                    leave_running: !options.exit,
                    pod: crate::pod_identity::of(&spec),
                },
                millis(timeouts.cuda_ms.saturating_add(timeouts.agent_ms)),
            )
            .await
            .map_err(|e| phase_error(id, "checkpoint", e))?;
        let lease_ends =
            (begin.lease_ms > 0).then(|| Instant::now() + Duration::from_millis(begin.lease_ms));
        let images = PathBuf::from(&begin.image_dir);
        let containerd_dir = (!wanted_at.is_empty() && Path::new(wanted_at) != images)
            .then(|| PathBuf::from(wanted_at));
        let work = dump_work_dir(options, &container.bundle);
        let started = Instant::now();
        let dumped = match self.dump_deadline(id, lease_ends) {
            Ok(deadline) => {
                self.dump_with_rootfs_diff(
                    container,
                    was_paused,
                    options,
                    &images,
                    self.dump(
                        container,
                        was_paused,
                        options,
                        containerd_dir.as_deref().unwrap_or(&images),
                        &work,
                        deadline,
                    ),
                )
                .await
            }
            Err(e) => Err(e),
        };
        if dumped.is_ok() {
            // An error here is an End that never comes: the agent's lease settles it.
            crate::failpoints::hit("shim.checkpoint.after_dump", id).map_err(|message| {
                ShimError::Phase {
                    id: id.to_owned(),
                    operation: "checkpoint",
                    phase: "failpoint",
                    message,
                }
            })?;
        }
        let dump_millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let end = |dumped: bool, failure: String| pb::ContainerCheckpointEndRequest {
            checkpoint_ref: begin.checkpoint_ref.clone(),
            dumped,
            failure,
            dump_millis,
            images_follow: false,
        };
        let handoff = dumped.and_then(|()| {
            containerd_dir
                .as_deref()
                .map(|dir| ImageCopy::open(dir, &images))
                .transpose()
                .map_err(|e| ShimError::Phase {
                    id: id.to_owned(),
                    operation: "checkpoint",
                    phase: "open_images",
                    message: format!("open the images in {wanted_at}: {e}"),
                })
        });
        let handoff = match handoff {
            Ok(handoff) => handoff,
            Err(e) => {
                let rollback = agent
                    .checkpoint_end(end(false, e.to_string()), millis(timeouts.agent_ms))
                    .await;
                return Err(match rollback {
                    Ok(_) => e,
                    Err(r) => ShimError::Phase {
                        id: id.to_owned(),
                        operation: "checkpoint",
                        phase: r.phase,
                        message: format!("{e}; and the rollback failed: {}", r.message),
                    },
                });
            }
        };
        if let Some(copy) = handoff {
            // The GPUs come back now; the images follow once containerd resumed the task.
            let images_follow = pb::ContainerCheckpointEndRequest {
                images_follow: true,
                ..end(true, String::new())
            };
            agent
                .checkpoint_end(images_follow, millis(timeouts.agent_ms))
                .await
                .map_err(|e| phase_error(id, "checkpoint", e))?;
            self.handoffs
                .start(Handoff {
                    containers: self.containers.clone(),
                    id: id.to_owned(),
                    wait: millis(timeouts.handoff_wait_ms),
                    agent,
                    copy,
                    end: end(true, String::new()),
                    timeout: millis(timeouts.agent_ms),
                })
                .await;
            return Ok(begin.checkpoint_ref);
        }
        let reply = agent
            .checkpoint_end(end(true, String::new()), millis(timeouts.agent_ms))
            .await
            .map_err(|e| phase_error(id, "checkpoint", e))?;
        log::info!(
            "checkpointed {id} as {} ({} bytes, tiers {:?})",
            reply.checkpoint_ref,
            reply.raw_bytes,
            reply.tiers
        );
        Ok(reply.checkpoint_ref)
    }

    /// The dump's deadline: the configured one, cut short so that the dump ends within the
    /// agent's lease on the checkpoint (ending at `lease_ends`) with time left for the End.
    /// Fails when the lease has (nearly) run out: the agent has given the container's GPUs
    /// back, so dumping it now would checkpoint a workload nobody holds.
    fn dump_deadline(&self, id: &str, lease_ends: Option<Instant>) -> Result<Duration> {
        crate::failpoints::hit("shim.checkpoint.after_begin", id).map_err(|message| {
            ShimError::Phase {
                id: id.to_owned(),
                operation: "checkpoint",
                phase: "failpoint",
                message,
            }
        })?;
        let configured = millis(self.config.timeouts.dump_ms);
        let Some(ends) = lease_ends else {
            return Ok(configured);
        };
        let left = ends.saturating_duration_since(Instant::now());
        let usable = left.saturating_sub(lease_margin(left));
        if usable.is_zero() {
            return Err(ShimError::Phase {
                id: id.to_owned(),
                operation: "checkpoint",
                phase: "agent_lease",
                message: "the agent's lease on this checkpoint ran out before the dump could \
                          start; nothing was dumped and the container keeps running"
                    .into(),
            });
        }
        Ok(configured.min(usable))
    }

    async fn dump(
        &self,
        container: &Target,
        was_paused: bool,
        options: &CheckpointOptions,
        images: &Path,
        work: &Path,
        deadline: Duration,
    ) -> Result<()> {
        let id = container.id.as_str();
        std::fs::create_dir_all(work)
            .map_err(|e| ShimError::io(id, format!("create {}", work.display()), e))?;
        let args = dump_args(id, options, images, work);
        let log = container.runc_log();
        let run = container
            .runc
            .run_within(id, &args, Default::default(), Some(&log), Some(deadline))
            .await;
        match run {
            Err(e @ ShimError::Timeout { .. }) => {
                let thawed = if was_paused {
                    String::from("; the task stays paused as it was")
                } else {
                    Self::thaw_after_killed_dump(&container.runc, id, &log).await
                };
                Err(ShimError::Phase {
                    id: id.to_owned(),
                    operation: "checkpoint",
                    phase: "criu_dump",
                    message: format!("{e}{thawed}"),
                })
            }
            Err(e) => Err(ShimError::Phase {
                id: id.to_owned(),
                operation: "checkpoint",
                phase: "criu_dump",
                message: format!("{e}{}", criu_errors(&work.join("dump.log"))),
            }),
            Ok(_) => Ok(()),
        }
    }

    /// CRIU freezes the container's cgroup while it dumps; killed mid-dump it leaves the
    /// cgroup frozen, so the container is resumed here (it was running before the dump).
    async fn thaw_after_killed_dump(runc: &RuncCli, id: &str, log: &Path) -> String {
        if runc.status(id).await.as_deref() != Some("paused") {
            return "; the container kept running".into();
        }
        match runc
            .run(
                id,
                &["resume".into(), id.to_owned()],
                Default::default(),
                Some(log),
            )
            .await
        {
            Ok(_) => "; the container was resumed and keeps running".into(),
            Err(e) => format!("; resuming the container failed: {e}"),
        }
    }

    pub(crate) async fn check_gpus(
        &self,
        agent: &dyn GpuAgent,
        id: &str,
        operation: &'static str,
        placement: &GpuPlacement,
    ) -> Result<()> {
        if placement.is_empty() {
            return Ok(());
        }
        let devices = agent
            .node_devices(millis(self.config.timeouts.agent_ms))
            .await
            .map_err(|e| phase_error(id, operation, e))?;
        let node = NodeGpus {
            indices: devices.gpu_indices.into_iter().collect(),
            uuids: devices.gpu_uuids.into_iter().collect(),
        };
        placement
            .validate(&node)
            .map_err(|message| ShimError::Phase {
                id: id.to_owned(),
                operation,
                phase: "gpu_validate",
                message,
            })
    }

    /// Host pids of every process in the container (`runc ps`).
    pub async fn container_pids(runc: &RuncCli, id: &str, log: &Path) -> Result<Vec<i32>> {
        let out = runc
            .run(
                id,
                &["ps".into(), "--format".into(), "json".into(), id.to_owned()],
                Default::default(),
                Some(log),
            )
            .await?;
        serde_json::from_str::<Option<Vec<i32>>>(out.stdout.trim())
            .map(Option::unwrap_or_default)
            .map_err(|e| ShimError::Runc {
                id: id.to_owned(),
                command: "ps".into(),
                output: format!("unreadable output {:?}: {e}", out.stdout),
            })
    }
}

/// Time kept back from a lease for the End to reach the agent.
fn lease_margin(left: Duration) -> Duration {
    (left / 4).min(Duration::from_secs(2))
}

/// Where the caller wants the images besides the agent's tiers. An `image_path` in the
/// options wins, as with runc's shim: containerd then hands over a directory of its own that
/// it archives into its content store, and that stays empty. The agent names its RAM-tier
/// directory this way, so a checkpoint it asked for is neither copied nor archived.
fn images_wanted_at<'a>(options: &'a CheckpointOptions, containerd_path: &'a str) -> &'a str {
    if options.image_path.is_empty() {
        containerd_path
    } else {
        &options.image_path
    }
}

fn pod_uid(spec: &Spec) -> String {
    spec.annotations()
        .as_ref()
        .and_then(|a| a.get("io.kubernetes.cri.sandbox-uid"))
        .cloned()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_args_follow_containerd_options() {
        let mut options = CheckpointOptions::default();
        let args = dump_args("c", &options, Path::new("/i"), Path::new("/w"));
        assert!(args.contains(&"--leave-running".to_owned()));
        assert_eq!(args.last().unwrap(), "c");
        options.exit = true;
        options.open_tcp = true;
        options.terminal = true;
        options.empty_namespaces = vec!["network".into()];
        let args = dump_args("c", &options, Path::new("/i"), Path::new("/w"));
        assert!(!args.contains(&"--leave-running".to_owned()));
        for flag in ["--tcp-established", "--shell-job", "--empty-ns", "network"] {
            assert!(
                args.contains(&flag.to_owned()),
                "{flag} missing from {args:?}"
            );
        }
    }

    #[test]
    fn the_lease_keeps_a_margin_for_the_end() {
        assert_eq!(
            lease_margin(Duration::from_secs(360)),
            Duration::from_secs(2)
        );
        assert_eq!(
            lease_margin(Duration::from_secs(2)),
            Duration::from_millis(500)
        );
        assert_eq!(lease_margin(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn the_clients_work_path_replaces_the_bundles() {
        let mut options = CheckpointOptions::default();
        assert_eq!(
            dump_work_dir(&options, Path::new("/b")),
            PathBuf::from("/b/criu-work")
        );
        options.work_path = "/logs/here".into();
        assert_eq!(
            dump_work_dir(&options, Path::new("/b")),
            PathBuf::from("/logs/here")
        );
    }

    #[test]
    fn criu_errors_quote_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("dump.log");
        std::fs::write(&log, "ok\n(00.1) Error (criu/x.c:1): boom\nfine\n").unwrap();
        let text = criu_errors(&log);
        assert!(text.contains("boom") && text.contains("dump.log"), "{text}");
        assert_eq!(criu_errors(&dir.path().join("none")), "");
    }
}
