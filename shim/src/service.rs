//! The task service (containerd task API v2) for runc containers: the shared state, the
//! exit watcher and event publishing. The operations live in [`crate::lifecycle`],
//! [`crate::exec`] and [`crate::checkpoint`].

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;

use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::monitor::{monitor_subscribe, Subject, Topic};
use containerd_shim::protos::events::task::TaskExit;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::ttrpc::context::Context;
use containerd_shim::ExitSignal;
use tokio::sync::Mutex;

use crate::config::{millis, ShimConfig};
use crate::error::{Result, ShimError};
use crate::handoff::Handoffs;
use crate::process::Container;
use crate::resources::OomWatches;
use crate::runc_cli::RuncCli;

/// Exits of pids no process claimed yet (a process can exit before runc's pid file is read).
const UNCLAIMED_EXITS: usize = 1024;

/// The task service of one shim process.
#[derive(Clone)]
pub struct TaskService {
    /// containerd namespace of this shim.
    pub namespace: String,
    /// Shim configuration.
    pub config: Arc<ShimConfig>,
    /// runc, rooted per namespace.
    pub runc: RuncCli,
    /// Containers by id.
    pub containers: Arc<Mutex<HashMap<String, Container>>>,
    unclaimed: Arc<std::sync::Mutex<VecDeque<(i32, i32)>>>,
    publisher: Arc<RemotePublisher>,
    exit_signal: Arc<ExitSignal>,
    /// Checkpoints whose images still go to the agent after containerd's call returned.
    pub handoffs: Arc<Handoffs>,
    /// OOM kills per container, as reported.
    pub ooms: Arc<OomWatches>,
}

impl std::fmt::Debug for TaskService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskService")
            .field("namespace", &self.namespace)
            .field("runc", &self.runc)
            .finish_non_exhaustive()
    }
}

impl TaskService {
    /// A service publishing to `publisher`; `exit_signal` ends the shim on Shutdown.
    pub async fn new(
        namespace: &str,
        config: ShimConfig,
        publisher: RemotePublisher,
        exit_signal: Arc<ExitSignal>,
    ) -> Self {
        let runc = RuncCli {
            binary: config.runc.clone(),
            root: config.runc_root.join(namespace),
            systemd_cgroup: false,
            criu: None,
            no_pivot: false,
            no_new_keyring: false,
        };
        let service = Self {
            namespace: namespace.to_owned(),
            config: Arc::new(config),
            runc,
            containers: Arc::new(Mutex::new(HashMap::new())),
            unclaimed: Arc::new(std::sync::Mutex::new(VecDeque::new())),
            publisher: Arc::new(publisher),
            exit_signal,
            handoffs: Arc::new(Handoffs::default()),
            ooms: Arc::new(OomWatches::default()),
        };
        service.watch_exits().await;
        service
    }

    async fn watch_exits(&self) {
        let subscription = match monitor_subscribe(Topic::Pid).await {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot watch process exits: {e}");
                return;
            }
        };
        let service = self.clone();
        let mut rx = subscription.rx;
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                if let Subject::Pid(pid) = event.subject {
                    service.on_exit(pid, event.exit_code).await;
                }
            }
        });
    }

    async fn on_exit(&self, pid: i32, code: i32) {
        let event = {
            let mut containers = self.containers.lock().await;
            claim(&mut containers, pid, code)
        };
        match event {
            Some(event) => {
                if event.id == event.container_id {
                    self.publish_ooms(&event.container_id).await;
                }
                self.publish(TOPIC_EXIT, Box::new(event)).await
            }
            None => {
                let mut unclaimed = self.unclaimed.lock().unwrap_or_else(|p| p.into_inner());
                unclaimed.push_back((pid, code));
                if unclaimed.len() > UNCLAIMED_EXITS {
                    unclaimed.pop_front();
                }
            }
        }
    }

    /// After a process got `pid`: if it already exited, records that (and returns the event).
    pub fn early_exit(&self, pid: i32) -> Option<i32> {
        let mut unclaimed = self.unclaimed.lock().unwrap_or_else(|p| p.into_inner());
        let index = unclaimed.iter().position(|(p, _)| *p == pid)?;
        unclaimed.remove(index).map(|(_, code)| code)
    }

    /// Records an exit found by [`Self::early_exit`] and publishes it.
    pub async fn settle_early_exit(&self, id: &str, exec_id: &str, pid: i32) {
        if let Some(code) = self.early_exit(pid) {
            let event = {
                let mut containers = self.containers.lock().await;
                containers
                    .get_mut(id)
                    .and_then(|c| c.process_mut(exec_id))
                    .map(|p| exit_event(id, exec_id, pid, p.set_exited(code)))
            };
            if let Some(event) = event {
                self.publish(TOPIC_EXIT, Box::new(event)).await;
            }
        }
    }

    /// Publishes an event to containerd; failures are logged, never fail the request.
    pub async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .publisher
            .publish(Context::default(), topic, &self.namespace, event)
            .await
        {
            log::warn!("cannot publish {topic}: {e}");
        }
    }

    /// Ends the shim once it serves no container, after its checkpoint handoffs ended.
    pub async fn shutdown_if_idle(&self, now: bool) {
        if now || self.containers.lock().await.is_empty() {
            let timeouts = &self.config.timeouts;
            self.handoffs
                .finish(millis(timeouts.agent_ms.saturating_add(timeouts.dump_ms)))
                .await;
            self.exit_signal.signal();
        }
    }

    /// Error for an unknown container.
    pub fn not_found(id: &str) -> ShimError {
        ShimError::NotFound {
            id: id.to_owned(),
            what: "container".into(),
        }
    }
}

/// containerd's exit topic.
pub const TOPIC_EXIT: &str = containerd_shim::protos::topics::TASK_EXIT_EVENT_TOPIC;

fn claim(containers: &mut HashMap<String, Container>, pid: i32, code: i32) -> Option<TaskExit> {
    for container in containers.values_mut() {
        let id = container.id.clone();
        if container.init.pid == pid && container.init.exit().is_none() {
            let info = container.init.set_exited(code);
            return Some(exit_event(&id, "", pid, info));
        }
        for (exec_id, process) in container.execs.iter_mut() {
            if process.pid == pid && process.exit().is_none() {
                let info = process.set_exited(code);
                return Some(exit_event(&id, exec_id, pid, info));
            }
        }
    }
    None
}

/// The TaskExit event of a process.
pub fn exit_event(id: &str, exec_id: &str, pid: i32, info: crate::process::ExitInfo) -> TaskExit {
    TaskExit {
        container_id: id.to_owned(),
        id: if exec_id.is_empty() {
            id.to_owned()
        } else {
            exec_id.to_owned()
        },
        pid: u32::try_from(pid).unwrap_or_default(),
        exit_status: info.status,
        exited_at: MessageField::some(info.at),
        ..Default::default()
    }
}

/// Reads a bundle's OCI spec as JSON.
pub fn read_spec(id: &str, bundle: &Path) -> Result<serde_json::Value> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path)
        .map_err(|e| ShimError::io(id, format!("read {}", path.display()), e))?;
    serde_json::from_slice(&text).map_err(|e| ShimError::Invalid {
        id: id.to_owned(),
        message: format!("{} is not valid JSON: {e}", path.display()),
    })
}
