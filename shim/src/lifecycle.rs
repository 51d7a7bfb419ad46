//! Create, Start, Delete and Kill of containers and exec processes.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use containerd_shim::api::CreateTaskRequest;
use containerd_shim::protos::events::task::{TaskCreate, TaskDelete, TaskIO, TaskStart};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::topics;

use crate::containers::Busy;
use crate::error::{Result, ShimError};
use crate::process::{Container, ExitInfo, Process, ProcessStatus, RestoreSource};
use crate::runc_cli::{read_pid, RuncCli};
use crate::runtime_options::RuncOptions;
use crate::service::TaskService;
use crate::stdio::{PreparedIo, StdioPaths};

use kybernate_api::RESTORE_FROM_ANNOTATION;

impl TaskService {
    /// Create: mounts the rootfs, then `runc create` (or stages a restore for Start). The
    /// container is listed (busy) from the start, so a second Create of the id is refused
    /// at once, and no lock is held while the restore is staged or runc runs.
    pub async fn create_task(&self, req: CreateTaskRequest) -> Result<u32> {
        let id = req.id.clone();
        let bundle = PathBuf::from(&req.bundle);
        let spec = crate::service::read_spec(&id, &bundle)?;
        let options = match req.options.as_ref() {
            Some(any) => RuncOptions::from_any(&id, any)?,
            None => RuncOptions::default(),
        }
        .with_spec(&spec);
        let runc = self.runc.for_container(&options);
        options.check(&id, &runc.root)?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            owner: options.io_owner,
        };
        let busy = self.containers.insert_busy(
            Container::new(
                &id,
                bundle.clone(),
                Process::new("", stdio.clone()),
                runc.clone(),
            ),
            "create",
        )?;
        let created = self
            .create_unlisted(&req, &options, &runc, &stdio, &busy)
            .await;
        let pid = match created {
            Ok(pid) => pid,
            Err(e) => {
                self.containers.remove(&id);
                return Err(e);
            }
        };
        drop(busy);
        self.settle_early_exit(&id, "", pid);
        let event = TaskCreate {
            container_id: id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin,
                stdout: req.stdout,
                stderr: req.stderr,
                terminal: req.terminal,
                ..Default::default()
            }),
            checkpoint: req.checkpoint,
            pid: u32::try_from(pid).unwrap_or_default(),
            ..Default::default()
        };
        self.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(event));
        Ok(u32::try_from(pid).unwrap_or_default())
    }

    /// The work of Create once the id is reserved; on failure the caller drops the entry.
    async fn create_unlisted(
        &self,
        req: &CreateTaskRequest,
        options: &RuncOptions,
        runc: &RuncCli,
        stdio: &StdioPaths,
        busy: &Busy,
    ) -> Result<i32> {
        let id = busy.id().to_owned();
        let bundle = PathBuf::from(&req.bundle);
        if let Some(cgroup) = &options.shim_cgroup {
            let unified = crate::resources::unified_cgroups();
            crate::resources::join_cgroup(cgroup, std::process::id(), unified).map_err(|e| {
                ShimError::Invalid {
                    id: id.clone(),
                    message: format!("runtime option ShimCgroup = {cgroup:?}: {e}"),
                }
            })?;
        }
        options.save(&id, &bundle)?;
        let rootfs = bundle.join("rootfs");
        let mounted_rootfs = !req.rootfs.is_empty();
        let undo_mount = || {
            if mounted_rootfs {
                unmount(&rootfs);
            }
        };
        for m in &req.rootfs {
            std::fs::create_dir_all(&rootfs)
                .map_err(|e| ShimError::io(&id, format!("create {}", rootfs.display()), e))
                .inspect_err(|_| undo_mount())?;
            containerd_shim::mount::mount_rootfs(
                Some(m.type_.as_str()),
                Some(m.source.as_str()),
                &m.options,
                &rootfs,
            )
            .map_err(|e| ShimError::State {
                id: id.clone(),
                message: format!("mount rootfs {} at {}: {e}", m.source, rootfs.display()),
            })
            .inspect_err(|_| undo_mount())?;
        }
        let restore = self
            .restore_source(&id, &bundle, &req.checkpoint)
            .await
            .inspect_err(|_| undo_mount())?;
        let mut started = None;
        if restore.is_none() {
            started = Some(
                self.runc_create(runc, &id, &bundle, stdio)
                    .await
                    .inspect_err(|_| undo_mount())?,
            );
        }
        Ok(busy.with(|c| {
            c.mounted_rootfs = mounted_rootfs;
            c.restore = restore;
            if let Some((pid, io)) = started {
                c.init.pid = pid;
                c.init.io = io;
            }
            c.init.pid
        }))
    }

    async fn runc_create(
        &self,
        runc: &RuncCli,
        id: &str,
        bundle: &Path,
        stdio: &StdioPaths,
    ) -> Result<(i32, crate::stdio::ProcessIo)> {
        let pid_file = bundle.join("init.pid");
        let (prepared, command_stdio) = PreparedIo::new(id, stdio)?;
        let mut args: Vec<String> = vec![
            "create".into(),
            "--bundle".into(),
            bundle.display().to_string(),
            "--pid-file".into(),
            pid_file.display().to_string(),
        ];
        args.extend(runc.create_flags(false));
        if let Some(socket) = prepared.console_socket() {
            args.push("--console-socket".into());
            args.push(socket.display().to_string());
        }
        args.push(id.to_owned());
        let log = bundle.join("log.json");
        if let Err(e) = runc.run(id, &args, command_stdio, Some(&log)).await {
            prepared.abandon();
            return Err(e);
        }
        let io = prepared.finish()?;
        Ok((read_pid(id, &pid_file)?, io))
    }

    /// Start: `runc start`, or `runc restore` for a staged restore; exec processes too.
    pub async fn start_task(&self, id: &str, exec_id: &str) -> Result<u32> {
        if !exec_id.is_empty() {
            return self.start_exec(id, exec_id).await;
        }
        let busy = self.containers.begin(id, "start")?;
        let (status, restore, target, pid) =
            busy.with(|c| (c.init.status, c.restore.clone(), c.target(), c.init.pid));
        if status != ProcessStatus::Created {
            return Err(ShimError::State {
                id: id.to_owned(),
                message: "the task was started already".into(),
            });
        }
        let pid = match restore {
            Some(source) => {
                let (pid, io) = self.runc_restore(&target, &source).await?;
                busy.with(|c| {
                    c.init.pid = pid;
                    c.init.io = io;
                    c.restore = None;
                });
                pid
            }
            None => {
                target
                    .runc
                    .run(
                        id,
                        &["start".into(), id.to_owned()],
                        Default::default(),
                        Some(&target.runc_log()),
                    )
                    .await?;
                pid
            }
        };
        busy.with(|c| {
            if c.init.exit().is_none() {
                c.init.status = ProcessStatus::Running;
            }
        });
        drop(busy);
        self.settle_early_exit(id, "", pid);
        let event = TaskStart {
            container_id: id.to_owned(),
            pid: u32::try_from(pid).unwrap_or_default(),
            ..Default::default()
        };
        self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(event));
        let spec = crate::service::read_spec(id, &target.bundle).ok();
        let proc_cgroup =
            std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let unified = crate::resources::unified_cgroups();
        match crate::resources::oom_counter_file(spec.as_ref(), &proc_cgroup, unified) {
            Some(counter) => self.watch_oom(id, counter, unified),
            None => log::warn!("container {id}: its cgroup is unknown, so no OOM events"),
        }
        Ok(u32::try_from(pid).unwrap_or_default())
    }

    /// Delete: removes an exited (or never started) process; for init, the container.
    pub async fn delete_task(&self, id: &str, exec_id: &str) -> Result<(u32, ExitInfo)> {
        if !exec_id.is_empty() {
            return self.containers.with(id, |container| {
                let process = container
                    .execs
                    .get(exec_id)
                    .ok_or_else(|| ShimError::NotFound {
                        id: id.to_owned(),
                        what: format!("exec {exec_id}"),
                    })?;
                refuse_running_delete(id, exec_id, process)?;
                let process = container
                    .execs
                    .remove(exec_id)
                    .ok_or_else(|| Self::not_found(id))?;
                let info = process.exit().unwrap_or_else(|| ExitInfo {
                    status: 0,
                    at: crate::process::now(),
                });
                Ok((u32::try_from(process.pid).unwrap_or_default(), info))
            });
        }
        let busy = self.containers.begin(id, "delete")?;
        let (pid, staged, never_started, mut exited, target) = busy.with(|c| {
            refuse_running_delete(id, "", &c.init)?;
            Ok::<_, ShimError>((
                c.init.pid,
                c.restore.is_some(),
                c.init.status == ProcessStatus::Created,
                c.init.exited.subscribe(),
                c.target(),
            ))
        })?;
        let deleted = target
            .runc
            .run(
                id,
                &["delete".into(), "--force".into(), id.to_owned()],
                Default::default(),
                Some(&target.runc_log()),
            )
            .await;
        // A staged restore usually never reached runc; when its start failed after `runc
        // restore` (the task was killed), runc's state is removed here all the same.
        if !staged {
            deleted?;
        }
        if never_started && pid > 0 {
            // runc delete killed the waiting `runc init`; its exit arrives from the reaper.
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                exited.wait_for(Option::is_some),
            )
            .await;
        }
        let cell = self
            .containers
            .remove(id)
            .ok_or_else(|| Self::not_found(id))?;
        drop(busy);
        let (mounted_rootfs, restore, exit) = {
            let container = crate::containers::lock(&cell);
            (
                container.mounted_rootfs,
                container.restore.clone(),
                container.init.exit(),
            )
        };
        if mounted_rootfs {
            unmount(&target.bundle.join("rootfs"));
        }
        if let Some(RestoreSource::Kybernate { reference, .. }) = &restore {
            self.release_staged(id, reference).await;
        }
        let info = exit.unwrap_or_else(|| ExitInfo {
            status: 0,
            at: crate::process::now(),
        });
        let event = TaskDelete {
            container_id: id.to_owned(),
            pid: u32::try_from(pid).unwrap_or_default(),
            exit_status: info.status,
            exited_at: MessageField::some(info.at.clone()),
            id: id.to_owned(),
            ..Default::default()
        };
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(event));
        Ok((u32::try_from(pid).unwrap_or_default(), info))
    }

    /// Kill: signals the init process (`runc kill`, all processes with `all`) or an exec.
    /// Never waits for an operation in progress: a kill must reach a container even while it
    /// checkpoints.
    pub async fn kill_task(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let (pid, staged, runc, log) = self.containers.with(id, |container| {
            let process = container
                .process(exec_id)
                .ok_or_else(|| ShimError::NotFound {
                    id: id.to_owned(),
                    what: format!("exec {exec_id}"),
                })?;
            if process.exit().is_some() && !all {
                return Err(ShimError::NotFound {
                    id: id.to_owned(),
                    what: "process (it has already finished)".into(),
                });
            }
            Ok((
                process.pid,
                container.restore.is_some(),
                container.runc.clone(),
                container.runc_log(),
            ))
        })?;
        if !exec_id.is_empty() {
            let signal = i32::try_from(signal).map_err(|_| ShimError::Invalid {
                id: id.to_owned(),
                message: format!("signal {signal} is out of range"),
            })?;
            if pid <= 0 {
                return Err(ShimError::State {
                    id: id.to_owned(),
                    message: format!("exec {exec_id} is not started"),
                });
            }
            // SAFETY: kill(2) with a pid we started and a signal number; no memory involved.
            let rc = unsafe { libc::kill(pid, signal) };
            if rc != 0 {
                return Err(ShimError::io(
                    id,
                    format!("signal exec {exec_id}"),
                    std::io::Error::last_os_error(),
                ));
            }
            return Ok(());
        }
        if staged {
            return Err(ShimError::State {
                id: id.to_owned(),
                message: "the task is not started (a restore is staged)".into(),
            });
        }
        let mut args: Vec<String> = vec!["kill".into()];
        if all {
            args.push("--all".into());
        }
        args.push(id.to_owned());
        args.push(signal.to_string());
        runc.run(id, &args, Default::default(), Some(&log)).await?;
        Ok(())
    }
}

/// A running (or paused) process cannot be deleted.
fn refuse_running_delete(id: &str, exec_id: &str, process: &Process) -> Result<()> {
    let running = matches!(
        process.status,
        ProcessStatus::Running | ProcessStatus::Paused
    ) || process.starting;
    if running && process.exit().is_none() {
        return Err(ShimError::State {
            id: id.to_owned(),
            message: format!(
                "cannot delete {} while it runs; kill it first",
                if exec_id.is_empty() {
                    "the task"
                } else {
                    exec_id
                }
            ),
        });
    }
    Ok(())
}

/// Lazily unmounts `target`; errors are logged (the path may not be mounted).
pub fn unmount(target: &Path) {
    let Ok(path) = CString::new(target.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: `path` is a valid NUL-terminated string for the duration of the call.
    let rc = unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        log::debug!(
            "umount {}: {}",
            target.display(),
            std::io::Error::last_os_error()
        );
    }
}

impl TaskService {
    async fn restore_source(
        &self,
        id: &str,
        bundle: &Path,
        checkpoint: &str,
    ) -> Result<Option<RestoreSource>> {
        if !checkpoint.is_empty() {
            let path = PathBuf::from(checkpoint);
            if !path.join("inventory.img").is_file() {
                return Err(ShimError::Phase {
                    id: id.to_owned(),
                    operation: "restore",
                    phase: "validate",
                    message: format!(
                        "checkpoint {} holds no CRIU images (inventory.img missing)",
                        path.display()
                    ),
                });
            }
            return Ok(Some(RestoreSource::Images(path)));
        }
        let spec = crate::service::read_spec(id, bundle)?;
        let reference = spec
            .annotations()
            .as_ref()
            .and_then(|a| a.get(RESTORE_FROM_ANNOTATION))
            .cloned();
        match reference {
            None => Ok(None),
            Some(reference) => {
                let images = self.stage_restore(id, &reference, &spec).await?;
                self.apply_rootfs_diff(id, &reference, &images, bundle)
                    .await?;
                Ok(Some(RestoreSource::Kybernate { reference, images }))
            }
        }
    }
}

/// The process state containerd's API reports.
pub fn status_of(process: &Process) -> containerd_shim::api::Status {
    use containerd_shim::api::Status;
    match process.status {
        ProcessStatus::Created => Status::CREATED,
        ProcessStatus::Running => Status::RUNNING,
        ProcessStatus::Paused => Status::PAUSED,
        ProcessStatus::Stopped => Status::STOPPED,
    }
}
