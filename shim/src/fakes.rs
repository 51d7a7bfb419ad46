//! Recording fakes of the shim's outside world (runc, the agent, containerd's events) for
//! unit tests: each call is appended to one shared journal, so a test asserts the exact
//! order of freezes, dumps, GPU phases and rollbacks, without root, runc or an agent.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::protos::protobuf::MessageDyn;
use kybernate_proto::agent::v1 as pb;

use crate::agent_link::{AgentCallError, AgentConnector, GpuAgent};
use crate::events::EventSink;
use crate::runc_cli::{CommandLine, RuncOutput, Spawner};

/// The calls made, in order: `runc checkpoint`, `agent checkpoint_end dumped=false`, ...
#[derive(Debug, Clone, Default)]
pub struct Journal(Arc<Mutex<Vec<String>>>);

impl Journal {
    fn push(&self, entry: String) {
        self.0.lock().unwrap().push(entry);
    }

    /// Every entry so far.
    pub fn entries(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// How a scripted runc sub-command ends.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Exit code.
    pub code: i32,
    /// Its stdout.
    pub stdout: String,
    /// Ran past its deadline.
    pub timed_out: bool,
}

/// A runc that records its sub-commands and answers from a script (exit 0 otherwise).
/// `restore`, `create` and `exec` write the pid file they are given, as runc does.
#[derive(Debug)]
pub struct ScriptedRunc {
    /// Where calls are recorded.
    pub journal: Journal,
    /// Outcome per sub-command.
    pub script: Vec<(&'static str, Outcome)>,
    /// The pid written into pid files.
    pub pid: i32,
    /// A sub-command that waits for a permit before it ends, like a long dump.
    pub hold: Option<Hold>,
}

/// Holds one runc sub-command until the test releases it.
#[derive(Debug, Clone)]
pub struct Hold {
    /// The sub-command held.
    pub sub: &'static str,
    /// Notified once it runs.
    pub entered: Arc<tokio::sync::Notify>,
    /// One permit lets it end.
    pub release: Arc<tokio::sync::Semaphore>,
}

/// runc's global flags that take a value.
const VALUED_FLAGS: [&str; 4] = ["--root", "--log", "--log-format", "--criu"];

/// The sub-command and its arguments of a runc command line.
fn sub_command(words: &[String]) -> &[String] {
    let mut i = 0;
    while i < words.len() {
        if VALUED_FLAGS.contains(&words[i].as_str()) {
            i += 2;
        } else if words[i].starts_with("--") {
            i += 1;
        } else {
            break;
        }
    }
    &words[i.min(words.len())..]
}

#[async_trait]
impl Spawner for ScriptedRunc {
    async fn run_to_end(&self, command: CommandLine) -> std::io::Result<RuncOutput> {
        let words = command.words();
        let rest = sub_command(&words);
        let name = rest.first().cloned().unwrap_or_default();
        self.journal.push(format!("runc {}", rest.join(" ")));
        if let Some(hold) = self.hold.as_ref().filter(|h| h.sub == name) {
            hold.entered.notify_one();
            hold.release
                .acquire()
                .await
                .map_err(std::io::Error::other)?
                .forget();
        }
        let outcome = self
            .script
            .iter()
            .find(|(sub, _)| *sub == name)
            .map(|(_, o)| o.clone())
            .unwrap_or_default();
        if outcome.code == 0 && !outcome.timed_out {
            if let Some(at) = rest.iter().position(|w| w == "--pid-file") {
                if let Some(file) = rest.get(at + 1) {
                    std::fs::write(file, self.pid.to_string())?;
                }
            }
        }
        Ok(RuncOutput {
            code: if outcome.timed_out { -1 } else { outcome.code },
            stdout: outcome.stdout,
            stderr: if outcome.code != 0 {
                format!("scripted failure of runc {name}")
            } else {
                String::new()
            },
            timed_out: outcome.timed_out,
        })
    }
}

/// An agent that records its calls; the named calls fail.
#[derive(Debug)]
pub struct ScriptedAgent {
    /// Where calls are recorded.
    pub journal: Journal,
    /// Calls that fail: `connect`, `node_devices`, `checkpoint_begin`, `checkpoint_end`,
    /// `restore_stage`, `restore_end`.
    pub failing: HashSet<&'static str>,
    /// The node's GPU indices.
    pub gpus: Vec<u32>,
    /// The agent's image directory (RAM tier).
    pub image_dir: PathBuf,
}

impl ScriptedAgent {
    fn call(&self, name: &'static str, detail: String) -> Result<(), AgentCallError> {
        self.journal
            .push(format!("agent {name}{detail}").trim_end().to_owned());
        if self.failing.contains(name) {
            return Err(AgentCallError {
                phase: match name {
                    "checkpoint_begin" => "agent_cuda",
                    "restore_end" => "agent_cuda_restore",
                    "connect" => "agent_connect",
                    _ => "agent_store",
                },
                message: format!("scripted failure of {name}"),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl GpuAgent for ScriptedAgent {
    async fn node_devices(&self, _: Duration) -> Result<pb::NodeDevicesReply, AgentCallError> {
        self.call("node_devices", String::new())?;
        Ok(pb::NodeDevicesReply {
            gpu_indices: self.gpus.clone(),
            ..Default::default()
        })
    }

    async fn checkpoint_begin(
        &self,
        req: pb::ContainerCheckpointBeginRequest,
        _: Duration,
    ) -> Result<pb::ContainerCheckpointBeginReply, AgentCallError> {
        self.call("checkpoint_begin", format!(" pids={:?}", req.pids))?;
        Ok(pb::ContainerCheckpointBeginReply {
            checkpoint_ref: "ref-1".into(),
            image_dir: self.image_dir.display().to_string(),
            ..Default::default()
        })
    }

    async fn checkpoint_end(
        &self,
        req: pb::ContainerCheckpointEndRequest,
        _: Duration,
    ) -> Result<pb::CheckpointReply, AgentCallError> {
        self.call("checkpoint_end", format!(" dumped={}", req.dumped))?;
        Ok(pb::CheckpointReply {
            checkpoint_ref: req.checkpoint_ref,
            ..Default::default()
        })
    }

    async fn restore_stage(
        &self,
        req: pb::ContainerRestoreStageRequest,
        _: Duration,
    ) -> Result<pb::ContainerRestoreStageReply, AgentCallError> {
        self.call("restore_stage", format!(" {}", req.checkpoint_ref))?;
        Ok(pb::ContainerRestoreStageReply {
            image_dir: self.image_dir.display().to_string(),
            ..Default::default()
        })
    }

    async fn restore_end(
        &self,
        req: pb::ContainerRestoreEndRequest,
        _: Duration,
    ) -> Result<pb::ContainerRestoreEndReply, AgentCallError> {
        self.call("restore_end", format!(" restored={}", req.restored))?;
        Ok(pb::ContainerRestoreEndReply::default())
    }
}

/// Connects to one [`ScriptedAgent`] (or fails when `connect` is scripted to).
#[derive(Debug)]
pub struct ScriptedConnector(pub Arc<ScriptedAgent>);

#[async_trait]
impl AgentConnector for ScriptedConnector {
    async fn connect(&self, _: Duration) -> Result<Arc<dyn GpuAgent>, AgentCallError> {
        self.0.call("connect", String::new())?;
        Ok(self.0.clone())
    }
}

/// Records the topics of published events in the journal.
#[derive(Debug)]
pub struct RecordedEvents(pub Journal);

#[async_trait]
impl EventSink for RecordedEvents {
    async fn deliver(&self, topic: &str, _: Box<dyn MessageDyn>) -> Result<(), String> {
        self.0.push(format!("event {topic}"));
        Ok(())
    }
}

/// Writes a minimal OCI spec into `bundle`, with `env` as the process environment.
pub fn write_spec(bundle: &Path, env: &[&str]) {
    std::fs::create_dir_all(bundle).unwrap();
    let spec = serde_json::json!({
        "ociVersion": "1.1.0",
        "process": {"user": {"uid": 0, "gid": 0}, "cwd": "/", "args": ["sleep", "1"], "env": env},
        "root": {"path": "rootfs"},
        "annotations": {"io.kubernetes.cri.sandbox-uid": "pod-uid-1"}
    });
    std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_flags_are_skipped_to_the_sub_command() {
        let words: Vec<String> = ["--root", "/r", "--log", "/l", "--log-format", "json"]
            .iter()
            .chain(["--systemd-cgroup", "kill", "--all", "c", "9"].iter())
            .map(|w| w.to_string())
            .collect();
        assert_eq!(sub_command(&words), ["kill", "--all", "c", "9"]);
    }
}
