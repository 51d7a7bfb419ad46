//! Restore of a container from a checkpoint: the agent stages a Kybernate checkpoint's
//! images at Create; Start runs `runc restore` (from those images or from containerd's
//! checkpoint path) and then the agent's CUDA restore + unlock. The agent is reached before
//! anything is restored, and a task whose GPU state did not come back is killed, so no task
//! runs half-restored.

use std::path::PathBuf;
use std::time::Duration;

use kybernate_proto::agent::v1 as pb;
use oci_spec::runtime::Spec;

use crate::agent_link::GpuAgent;
use crate::checkpoint::{criu_errors, phase_error};
use crate::config::millis;
use crate::error::{Result, ShimError};
use crate::gpu::GpuPlacement;
use crate::process::{RestoreSource, Target};
use crate::runc_cli::read_pid;
use crate::service::TaskService;
use crate::stdio::{PreparedIo, ProcessIo};

impl TaskService {
    /// Create with the restore annotation: the agent stages the images (never an empty
    /// container in their place).
    pub async fn stage_restore(&self, id: &str, reference: &str, spec: &Spec) -> Result<PathBuf> {
        let timeouts = &self.config.timeouts;
        let agent = self
            .agents
            .connect(millis(timeouts.agent_ms))
            .await
            .map_err(|e| phase_error(id, "restore", e))?;
        self.check_gpus(
            agent.as_ref(),
            id,
            "restore",
            &GpuPlacement::from_spec(spec),
        )
        .await?;
        let staged = agent
            .restore_stage(
                pb::ContainerRestoreStageRequest {
                    checkpoint_ref: reference.to_owned(),
                    container_id: id.to_owned(),
                    from_tier: String::new(),
                    target: crate::pod_identity::of(spec),
                },
                millis(timeouts.restore_ms.saturating_add(timeouts.agent_ms)),
            )
            .await
            .map_err(|e| phase_error(id, "restore", e))?;
        crate::failpoints::hit("shim.restore.after_stage", id).map_err(|message| {
            ShimError::Phase {
                id: id.to_owned(),
                operation: "restore",
                phase: "failpoint",
                message,
            }
        })?;
        Ok(PathBuf::from(staged.image_dir))
    }

    /// A staged restore that never started: the agent drops the staged images.
    pub async fn release_staged(&self, id: &str, reference: &str) {
        let timeout = millis(self.config.timeouts.agent_ms);
        let released = match self.agents.connect(timeout).await {
            Ok(agent) => agent
                .restore_end(
                    pb::ContainerRestoreEndRequest {
                        checkpoint_ref: reference.to_owned(),
                        pids: Vec::new(),
                        restored: false,
                    },
                    timeout,
                )
                .await
                .map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = released {
            log::warn!("container {id}: releasing staged checkpoint {reference}: {e}");
        }
    }

    /// Start of a staged restore: `runc restore`, then (for Kybernate checkpoints) the
    /// agent's CUDA restore + unlock.
    pub async fn runc_restore(
        &self,
        container: &Target,
        source: &RestoreSource,
    ) -> Result<(i32, ProcessIo)> {
        let id = container.id.as_str();
        let (images, reference) = match source {
            RestoreSource::Images(p) => (p.clone(), None),
            RestoreSource::Kybernate { reference, images } => (images.clone(), Some(reference)),
        };
        let timeouts = &self.config.timeouts;
        // The agent first: a task restored while the agent cannot be reached would run with
        // its GPU state neither restored nor unlocked.
        let agent = match reference {
            Some(_) => Some(
                self.agents
                    .connect(millis(timeouts.agent_ms))
                    .await
                    .map_err(|e| phase_error(id, "restore", e))?,
            ),
            None => None,
        };
        let work = container.bundle.join("criu-work");
        std::fs::create_dir_all(&work)
            .map_err(|e| ShimError::io(id, format!("create {}", work.display()), e))?;
        let pid_file = container.bundle.join("init.pid");
        let (prepared, stdio) = PreparedIo::new(id, &container.stdio)?;
        let mut args: Vec<String> = vec![
            "restore".into(),
            "--detach".into(),
            "--no-subreaper".into(),
            "--bundle".into(),
            container.bundle.display().to_string(),
            "--image-path".into(),
            images.display().to_string(),
            "--work-path".into(),
            work.display().to_string(),
            "--pid-file".into(),
            pid_file.display().to_string(),
        ];
        args.extend(container.runc.create_flags(true));
        if let Some(socket) = prepared.console_socket() {
            args.push("--console-socket".into());
            args.push(socket.display().to_string());
        }
        args.push(id.to_owned());
        let deadline = millis(timeouts.restore_ms);
        let log = container.runc_log();
        // Past the deadline runc and its CRIU are killed with their process group, so
        // nothing goes on restoring after the shim gave up.
        let run = container
            .runc
            .run_within(id, &args, stdio, Some(&log), Some(deadline))
            .await;
        let restored = match run {
            Err(e @ ShimError::Timeout { .. }) => Err(e.to_string()),
            Err(e) => Err(format!("{e}{}", criu_errors(&work.join("restore.log")))),
            Ok(_) => Ok(()),
        };
        if let Err(message) = restored {
            prepared.abandon();
            if let (Some(agent), Some(reference)) = (&agent, reference) {
                release(agent.as_ref(), reference, millis(timeouts.agent_ms)).await;
            }
            return Err(ShimError::Phase {
                id: id.to_owned(),
                operation: "restore",
                phase: "criu_restore",
                message,
            });
        }
        let started = prepared
            .finish()
            .and_then(|io| Ok((read_pid(id, &pid_file)?, io)));
        let (pid, io) = match started {
            Ok(started) => started,
            Err(e) => {
                kill_restored(container).await;
                if let (Some(agent), Some(reference)) = (&agent, reference) {
                    release(agent.as_ref(), reference, millis(timeouts.agent_ms)).await;
                }
                return Err(e);
            }
        };
        if let (Some(agent), Some(reference)) = (&agent, reference) {
            // An error here is an End that never comes; the restored task is killed as for
            // any failed End.
            if let Err(message) = crate::failpoints::hit("shim.restore.before_end", id) {
                kill_restored(container).await;
                return Err(ShimError::Phase {
                    id: id.to_owned(),
                    operation: "restore",
                    phase: "failpoint",
                    message,
                });
            }
            let pids = match Self::container_pids(&container.runc, id, &log).await {
                Ok(pids) => pids,
                Err(e) => {
                    kill_restored(container).await;
                    release(agent.as_ref(), reference, millis(timeouts.agent_ms)).await;
                    return Err(e);
                }
            };
            let ended = agent
                .restore_end(
                    pb::ContainerRestoreEndRequest {
                        checkpoint_ref: reference.clone(),
                        pids,
                        restored: true,
                    },
                    millis(timeouts.cuda_ms.saturating_add(timeouts.agent_ms)),
                )
                .await;
            if let Err(e) = ended {
                // A task whose GPU state did not come back must not run half-restored.
                kill_restored(container).await;
                return Err(phase_error(id, "restore", e));
            }
        }
        Ok((pid, io))
    }
}

/// Kills every process of a restored task that must not run (`runc kill --all … 9`).
async fn kill_restored(container: &Target) {
    let id = container.id.as_str();
    let kill = [
        "kill".to_owned(),
        "--all".to_owned(),
        id.to_owned(),
        "9".to_owned(),
    ];
    if let Err(e) = container
        .runc
        .run(id, &kill, Default::default(), None)
        .await
    {
        log::error!("container {id}: killing the half-restored task: {e}");
    }
}

/// Tells the agent a restore of `reference` did not happen, so it drops what it staged and
/// unlocks nothing; failures are logged (the restore's own error is the one reported).
async fn release(agent: &dyn GpuAgent, reference: &str, timeout: Duration) {
    let ended = agent
        .restore_end(
            pb::ContainerRestoreEndRequest {
                checkpoint_ref: reference.to_owned(),
                pids: Vec::new(),
                restored: false,
            },
            timeout,
        )
        .await;
    if let Err(e) = ended {
        log::warn!("releasing restore {reference}: {}", e.message);
    }
}
