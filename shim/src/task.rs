//! The ttrpc Task service: each call maps onto [`TaskService`] operations.

use async_trait::async_trait;
use containerd_shim::api::{
    CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest,
    CreateTaskResponse, DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest,
    PauseRequest, PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest,
    StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse,
    UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::protos::events::task::{TaskExecAdded, TaskPaused, TaskResumed};
use containerd_shim::protos::protobuf::{EnumOrUnknown, MessageField};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc;
use containerd_shim::protos::ttrpc::r#async::TtrpcContext;

use crate::error::ShimError;
use crate::lifecycle::status_of;
use crate::process::{Process, ProcessStatus};
use crate::service::TaskService;
use crate::stdio::StdioPaths;

type TtrpcResult<T> = ttrpc::Result<T>;

#[async_trait]
impl Task for TaskService {
    async fn state(&self, _: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        self.containers
            .with(&req.id, |container| {
                let process =
                    container
                        .process(&req.exec_id)
                        .ok_or_else(|| ShimError::NotFound {
                            id: req.id.clone(),
                            what: format!("exec {}", req.exec_id),
                        })?;
                let exit = process.exit();
                Ok(StateResponse {
                    id: req.id.clone(),
                    bundle: container.bundle.display().to_string(),
                    pid: u32::try_from(process.pid).unwrap_or_default(),
                    status: EnumOrUnknown::new(status_of(process)),
                    stdin: process.stdio.stdin.clone(),
                    stdout: process.stdio.stdout.clone(),
                    stderr: process.stdio.stderr.clone(),
                    terminal: process.stdio.terminal,
                    exit_status: exit.as_ref().map_or(0, |e| e.status),
                    exited_at: exit.map_or_else(MessageField::none, |e| MessageField::some(e.at)),
                    exec_id: req.exec_id.clone(),
                    ..Default::default()
                })
            })
            .map_err(Into::into)
    }

    async fn create(
        &self,
        _: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        let pid = self.create_task(req).await?;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let pid = self.start_task(&req.id, &req.exec_id).await?;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(&self, _: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        let (pid, info) = self.delete_task(&req.id, &req.exec_id).await?;
        Ok(DeleteResponse {
            pid,
            exit_status: info.status,
            exited_at: MessageField::some(info.at),
            ..Default::default()
        })
    }

    async fn pids(&self, _: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let (runc, log, execs) = self.containers.with(&req.id, |container| {
            let execs: Vec<(i32, String)> = container
                .execs
                .iter()
                .map(|(id, p)| (p.pid, id.clone()))
                .collect();
            Ok((container.runc.clone(), container.runc_log(), execs))
        })?;
        let pids = Self::container_pids(&runc, &req.id, &log).await?;
        let processes = pids
            .into_iter()
            .map(|pid| {
                let mut info = containerd_shim::protos::types::task::ProcessInfo {
                    pid: u32::try_from(pid).unwrap_or_default(),
                    ..Default::default()
                };
                if let Some((_, exec_id)) = execs.iter().find(|(p, _)| *p == pid) {
                    let details = containerd_shim::protos::shim::oci::ProcessDetails {
                        exec_id: exec_id.clone(),
                        ..Default::default()
                    };
                    if let Ok(any) = containerd_shim::util::convert_to_any(Box::new(details)) {
                        info.info = MessageField::some(any);
                    }
                }
                info
            })
            .collect();
        Ok(PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn pause(&self, _: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        self.set_paused(&req.id, true).await?;
        Ok(Empty::new())
    }

    async fn resume(&self, _: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        self.set_paused(&req.id, false).await?;
        Ok(Empty::new())
    }

    async fn checkpoint(&self, _: &TtrpcContext, req: CheckpointTaskRequest) -> TtrpcResult<Empty> {
        self.checkpoint_task(req).await?;
        Ok(Empty::new())
    }

    async fn kill(&self, _: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        self.kill_task(&req.id, &req.exec_id, req.signal, req.all)
            .await?;
        Ok(Empty::new())
    }

    async fn exec(&self, _: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        self.containers.with(&req.id, |container| {
            if container.execs.contains_key(&req.exec_id) || req.exec_id.is_empty() {
                return Err(ShimError::State {
                    id: req.id.clone(),
                    message: format!("exec id {:?} is empty or in use", req.exec_id),
                });
            }
            if container.init.exit().is_some() {
                return Err(ShimError::State {
                    id: req.id.clone(),
                    message: "cannot exec in a stopped container".into(),
                });
            }
            let mut process = Process::new(
                &req.exec_id,
                StdioPaths {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    owner: container.init.stdio.owner,
                },
            );
            process.spec = req.spec.as_ref().map(|any| any.value.clone());
            container.execs.insert(req.exec_id.clone(), process);
            Ok(())
        })?;
        let event = TaskExecAdded {
            container_id: req.id,
            exec_id: req.exec_id,
            ..Default::default()
        };
        self.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(event));
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        self.containers.with(&req.id, |container| {
            let process = container
                .process(&req.exec_id)
                .ok_or_else(|| ShimError::NotFound {
                    id: req.id.clone(),
                    what: format!("exec {}", req.exec_id),
                })?;
            let console = process
                .io
                .console
                .as_ref()
                .ok_or_else(|| ShimError::State {
                    id: req.id.clone(),
                    message: "the process has no terminal".into(),
                })?;
            crate::stdio::resize(console, req.width, req.height)
                .map_err(|e| ShimError::io(&req.id, "resize pty", e))
        })?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        self.containers.with(&req.id, |container| {
            let process = container
                .process(&req.exec_id)
                .ok_or_else(|| ShimError::NotFound {
                    id: req.id.clone(),
                    what: format!("exec {}", req.exec_id),
                })?;
            if req.stdin {
                process
                    .io
                    .stdin
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
            }
            Ok(())
        })?;
        Ok(Empty::new())
    }

    async fn update(&self, _: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        self.update_resources(&req).await?;
        Ok(Empty::new())
    }

    async fn wait(&self, _: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let mut exited = self.containers.with(&req.id, |container| {
            Ok(container
                .process(&req.exec_id)
                .ok_or_else(|| ShimError::NotFound {
                    id: req.id.clone(),
                    what: format!("exec {}", req.exec_id),
                })?
                .exited
                .subscribe())
        })?;
        let info = exited
            .wait_for(Option::is_some)
            .await
            .map_err(|_| ShimError::State {
                id: req.id.clone(),
                message: "the process was deleted while waiting".into(),
            })?
            .clone()
            .ok_or_else(|| TaskService::not_found(&req.id))?;
        Ok(WaitResponse {
            exit_status: info.status,
            exited_at: MessageField::some(info.at),
            ..Default::default()
        })
    }

    async fn stats(&self, _: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let stats = self.stats_of(&req.id).await?;
        Ok(StatsResponse {
            stats: MessageField::some(stats),
            ..Default::default()
        })
    }

    async fn connect(&self, _: &TtrpcContext, req: ConnectRequest) -> TtrpcResult<ConnectResponse> {
        let task_pid = self
            .containers
            .with(&req.id, |c| Ok(c.init.pid))
            .unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: u32::try_from(task_pid).unwrap_or_default(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _: &TtrpcContext, req: ShutdownRequest) -> TtrpcResult<Empty> {
        self.shutdown_if_idle(req.now).await;
        Ok(Empty::new())
    }
}

impl TaskService {
    async fn set_paused(&self, id: &str, paused: bool) -> Result<(), ShimError> {
        let (from, to, command) = if paused {
            (ProcessStatus::Running, ProcessStatus::Paused, "pause")
        } else {
            (ProcessStatus::Paused, ProcessStatus::Running, "resume")
        };
        let busy = self.containers.begin(id, command)?;
        let (status, exited, runc, log) = busy.with(|c| {
            (
                c.init.status,
                c.init.exit().is_some(),
                c.runc.clone(),
                c.runc_log(),
            )
        });
        if status != from || exited {
            return Err(ShimError::State {
                id: id.to_owned(),
                message: format!("cannot {command}: the task is {status:?}").to_lowercase(),
            });
        }
        runc.run(
            id,
            &[command.into(), id.to_owned()],
            Default::default(),
            Some(&log),
        )
        .await?;
        busy.with(|c| {
            if c.init.exit().is_none() {
                c.init.status = to;
            }
        });
        drop(busy);
        if paused {
            let event = TaskPaused {
                container_id: id.to_owned(),
                ..Default::default()
            };
            self.publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(event));
        } else {
            let event = TaskResumed {
                container_id: id.to_owned(),
                ..Default::default()
            };
            self.publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(event));
        }
        Ok(())
    }
}
