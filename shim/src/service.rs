//! The task service (containerd task API v2) for runc containers: its parts (the containers,
//! the event queue, the agent connector) and the exit watcher. The operations live in
//! [`crate::lifecycle`], [`crate::task`], [`crate::checkpoint`] and [`crate::resources`].

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::monitor::{monitor_subscribe, Subject, Topic};
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::ExitSignal;
use oci_spec::runtime::Spec;

use crate::agent_link::{AgentConnector, AgentSocket};
use crate::config::{millis, ShimConfig};
use crate::containers::ContainerTable;
use crate::error::{Result, ShimError};
use crate::events::{ContainerdEvents, EventQueue};
use crate::handoff::Handoffs;
use crate::oom::OomWatches;
use crate::process::exit_event;
use crate::runc_cli::RuncCli;

/// Exits of pids no process claimed yet (a process can exit before runc's pid file is read).
const UNCLAIMED_EXITS: usize = 1024;

/// The task service of one shim process (one pod's containers, or one container outside
/// Kubernetes).
#[derive(Clone)]
pub struct TaskService {
    /// containerd namespace of this shim.
    pub namespace: String,
    /// Shim configuration.
    pub config: Arc<ShimConfig>,
    /// runc, rooted per namespace.
    pub runc: RuncCli,
    /// Containers by id, each with its own lock.
    pub containers: Arc<ContainerTable>,
    unclaimed: Arc<std::sync::Mutex<VecDeque<(i32, i32)>>>,
    pub(crate) events: EventQueue,
    exit_signal: Arc<ExitSignal>,
    /// Checkpoints whose images still go to the agent after containerd's call returned.
    pub handoffs: Arc<Handoffs>,
    /// OOM kills per container, as reported.
    pub ooms: Arc<OomWatches>,
    /// How the agent is reached.
    pub agents: Arc<dyn AgentConnector>,
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
            ..RuncCli::default()
        };
        let agents = Arc::new(AgentSocket(config.agent_socket.clone()));
        let events = EventQueue::start(ContainerdEvents {
            publisher,
            namespace: namespace.to_owned(),
        });
        let service = Self::assemble(namespace, config, runc, agents, events, exit_signal);
        service.watch_exits().await;
        service
    }

    /// A service from its parts, not yet watching process exits: `runc` runs the commands,
    /// `agents` reaches the agent and `events` goes to containerd (fakes in unit tests).
    pub fn assemble(
        namespace: &str,
        config: ShimConfig,
        runc: RuncCli,
        agents: Arc<dyn AgentConnector>,
        events: EventQueue,
        exit_signal: Arc<ExitSignal>,
    ) -> Self {
        Self {
            namespace: namespace.to_owned(),
            config: Arc::new(config),
            runc,
            containers: Arc::new(ContainerTable::default()),
            unclaimed: Arc::new(std::sync::Mutex::new(VecDeque::new())),
            events,
            exit_signal,
            handoffs: Arc::new(Handoffs::default()),
            ooms: Arc::new(OomWatches::default()),
            agents,
        }
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
                    service.on_exit(pid, event.exit_code);
                }
            }
        });
    }

    pub(crate) fn on_exit(&self, pid: i32, code: i32) {
        match self.containers.claim_exit(pid, code) {
            Some(event) => {
                if event.id == event.container_id {
                    self.publish_ooms(&event.container_id);
                }
                self.publish(TOPIC_EXIT, Box::new(event))
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
    pub fn settle_early_exit(&self, id: &str, exec_id: &str, pid: i32) {
        if let Some(code) = self.early_exit(pid) {
            let event = self
                .containers
                .with(id, |c| {
                    Ok(c.process_mut(exec_id)
                        .map(|p| exit_event(id, exec_id, pid, p.set_exited(code))))
                })
                .ok()
                .flatten();
            if let Some(event) = event {
                self.publish(TOPIC_EXIT, Box::new(event));
            }
        }
    }

    /// Queues an event for containerd; returns at once (see [`crate::events`]).
    pub fn publish(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
        self.events.publish(topic, event);
    }

    /// Ends the shim once it serves no container, after its checkpoint handoffs ended and
    /// its events went out.
    pub async fn shutdown_if_idle(&self, now: bool) {
        if now || self.containers.is_empty() {
            let timeouts = &self.config.timeouts;
            self.handoffs
                .finish(millis(timeouts.agent_ms.saturating_add(timeouts.dump_ms)))
                .await;
            self.events.flush(millis(timeouts.agent_ms)).await;
            self.exit_signal.signal();
        }
    }

    /// Error for an unknown container.
    pub fn not_found(id: &str) -> ShimError {
        crate::containers::not_found(id)
    }
}

/// containerd's exit topic.
pub const TOPIC_EXIT: &str = containerd_shim::protos::topics::TASK_EXIT_EVENT_TOPIC;

/// Reads a bundle's OCI spec (`config.json`).
pub fn read_spec(id: &str, bundle: &Path) -> Result<Spec> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path)
        .map_err(|e| ShimError::io(id, format!("read {}", path.display()), e))?;
    serde_json::from_slice(&text).map_err(|e| ShimError::Invalid {
        id: id.to_owned(),
        message: format!("{} is not a valid OCI runtime spec: {e}", path.display()),
    })
}
