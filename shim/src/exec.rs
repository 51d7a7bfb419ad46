//! Start of exec processes (`runc exec --detach`).

use containerd_shim::protos::events::task::TaskExecStarted;
use containerd_shim::protos::topics;

use crate::error::{Result, ShimError};
use crate::process::{ProcessStatus, Target};
use crate::runc_cli::read_pid;
use crate::service::TaskService;
use crate::stdio::{PreparedIo, StdioPaths};

impl TaskService {
    /// Start of an exec process: `runc exec --detach` without any lock held; the exec is
    /// marked starting meanwhile, so it is neither started twice nor deleted under runc.
    pub(crate) async fn start_exec(&self, id: &str, exec_id: &str) -> Result<u32> {
        let (target, stdio, spec) = self.containers.with(id, |container| {
            if container.init.exit().is_some() {
                return Err(ShimError::State {
                    id: id.to_owned(),
                    message: format!("cannot start exec {exec_id}: the container has exited"),
                });
            }
            if let Some(running) = container.busy {
                return Err(ShimError::State {
                    id: id.to_owned(),
                    message: format!("cannot start exec {exec_id}: a {running} is in progress"),
                });
            }
            let target = container.target();
            let process = container
                .execs
                .get_mut(exec_id)
                .ok_or_else(|| ShimError::NotFound {
                    id: id.to_owned(),
                    what: format!("exec {exec_id}"),
                })?;
            if process.status != ProcessStatus::Created || process.starting {
                return Err(ShimError::State {
                    id: id.to_owned(),
                    message: format!("exec {exec_id} was started already"),
                });
            }
            process.starting = true;
            Ok((target, process.stdio.clone(), process.spec.clone()))
        })?;
        let ran = self.runc_exec(&target, exec_id, &stdio, spec).await;
        let (pid, io) = match ran {
            Ok(started) => started,
            Err(e) => {
                let _ = self.containers.with(id, |c| {
                    if let Some(p) = c.execs.get_mut(exec_id) {
                        p.starting = false;
                    }
                    Ok(())
                });
                return Err(e);
            }
        };
        self.containers.with(id, |c| {
            let process = c.execs.get_mut(exec_id).ok_or_else(|| ShimError::State {
                id: id.to_owned(),
                message: format!("exec {exec_id} vanished while it started"),
            })?;
            process.io = io;
            process.pid = pid;
            process.starting = false;
            if process.exit().is_none() {
                process.status = ProcessStatus::Running;
            }
            Ok(())
        })?;
        self.settle_early_exit(id, exec_id, pid);
        let event = TaskExecStarted {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            pid: u32::try_from(pid).unwrap_or_default(),
            ..Default::default()
        };
        self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(event));
        Ok(u32::try_from(pid).unwrap_or_default())
    }

    /// `runc exec --detach` of one exec process; its pid and the shim's end of its streams.
    async fn runc_exec(
        &self,
        target: &Target,
        exec_id: &str,
        stdio: &StdioPaths,
        spec: Option<Vec<u8>>,
    ) -> Result<(i32, crate::stdio::ProcessIo)> {
        let id = target.id.as_str();
        let spec_file = target.bundle.join(format!("exec-{exec_id}.json"));
        let pid_file = target.bundle.join(format!("exec-{exec_id}.pid"));
        std::fs::write(&spec_file, spec.unwrap_or_default())
            .map_err(|e| ShimError::io(id, format!("write {}", spec_file.display()), e))?;
        let (prepared, command_stdio) = PreparedIo::new(id, stdio)?;
        let mut args: Vec<String> = vec![
            "exec".into(),
            "--detach".into(),
            "--pid-file".into(),
            pid_file.display().to_string(),
            "--process".into(),
            spec_file.display().to_string(),
        ];
        if let Some(socket) = prepared.console_socket() {
            args.push("--console-socket".into());
            args.push(socket.display().to_string());
        }
        args.push(id.to_owned());
        let ran = target
            .runc
            .run(id, &args, command_stdio, Some(&target.runc_log()))
            .await;
        let _ = std::fs::remove_file(&spec_file);
        if let Err(e) = ran {
            prepared.abandon();
            return Err(e);
        }
        let io = prepared.finish()?;
        let pid = read_pid(id, &pid_file)?;
        let _ = std::fs::remove_file(&pid_file);
        Ok((pid, io))
    }
}
