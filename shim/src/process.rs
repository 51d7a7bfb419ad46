//! The processes of one container as the shim tracks them: the init process and its exec
//! processes, their state, exit status and streams. Exits arrive from the shim's reaper.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use containerd_shim::protos::events::task::TaskExit;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use tokio::sync::watch;

use crate::stdio::{ProcessIo, StdioPaths};

/// Lifecycle of a process, as containerd's task API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessStatus {
    /// Created (or staged for restore), not started.
    Created,
    /// Running.
    Running,
    /// Frozen by Pause.
    Paused,
    /// Exited.
    Stopped,
}

/// How and when a process ended.
#[derive(Debug, Clone, PartialEq)]
pub struct ExitInfo {
    /// Exit status (128 + signal for signalled processes).
    pub status: u32,
    /// When the shim saw it.
    pub at: Timestamp,
}

/// One process of a container.
#[derive(Debug)]
pub struct Process {
    /// Exec id; empty for the init process.
    pub exec_id: String,
    /// Host pid once started; 0 before.
    pub pid: i32,
    /// Lifecycle state.
    pub status: ProcessStatus,
    /// Where its streams go.
    pub stdio: StdioPaths,
    /// The shim's end of its streams.
    pub io: ProcessIo,
    /// Exec processes: their OCI process spec (JSON).
    pub spec: Option<Vec<u8>>,
    /// Set once when the process exits.
    pub exited: watch::Sender<Option<ExitInfo>>,
    /// An exec process whose `runc exec` runs now (no lock is held across it).
    pub starting: bool,
}

impl Process {
    /// A process not yet started.
    pub fn new(exec_id: &str, stdio: StdioPaths) -> Self {
        Self {
            exec_id: exec_id.to_owned(),
            pid: 0,
            status: ProcessStatus::Created,
            stdio,
            io: ProcessIo::default(),
            spec: None,
            exited: watch::channel(None).0,
            starting: false,
        }
    }

    /// Exit info, once exited.
    pub fn exit(&self) -> Option<ExitInfo> {
        self.exited.borrow().clone()
    }

    /// Records the exit (first one wins).
    pub fn set_exited(&mut self, status: i32) -> ExitInfo {
        if let Some(info) = self.exit() {
            return info;
        }
        let info = ExitInfo {
            status: u32::try_from(status).unwrap_or(255),
            at: now(),
        };
        self.status = ProcessStatus::Stopped;
        self.exited.send_replace(Some(info.clone()));
        info
    }
}

/// Where a Create asked the task to be restored from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreSource {
    /// containerd's checkpoint path (`ctr c restore`, task create with a checkpoint).
    Images(PathBuf),
    /// A Kybernate checkpoint reference (annotation `kybernate.io/restore-from`), staged
    /// by the agent into this image directory.
    Kybernate {
        /// The checkpoint reference.
        reference: String,
        /// The staged image directory.
        images: PathBuf,
    },
}

/// One container of this shim.
#[derive(Debug)]
pub struct Container {
    /// Container id.
    pub id: String,
    /// Bundle directory.
    pub bundle: PathBuf,
    /// Whether the shim mounted `bundle/rootfs` (and must unmount it).
    pub mounted_rootfs: bool,
    /// The init process.
    pub init: Process,
    /// Exec processes by exec id.
    pub execs: HashMap<String, Process>,
    /// Set when Start must restore instead of starting fresh.
    pub restore: Option<RestoreSource>,
    /// runc with this container's global flags (from its runtime options).
    pub runc: crate::runc_cli::RuncCli,
    /// The long operation in progress (create, start, checkpoint, ...), see
    /// [`crate::containers::Busy`].
    pub busy: Option<&'static str>,
}

impl Container {
    /// A container whose init process is `init`, nothing staged, nothing mounted.
    pub fn new(id: &str, bundle: PathBuf, init: Process, runc: crate::runc_cli::RuncCli) -> Self {
        Self {
            id: id.to_owned(),
            bundle,
            mounted_rootfs: false,
            init,
            execs: HashMap::new(),
            restore: None,
            runc,
            busy: None,
        }
    }

    /// The process `exec_id` names (empty: init).
    pub fn process(&self, exec_id: &str) -> Option<&Process> {
        if exec_id.is_empty() {
            Some(&self.init)
        } else {
            self.execs.get(exec_id)
        }
    }

    /// Mutable access to the process `exec_id` names.
    pub fn process_mut(&mut self, exec_id: &str) -> Option<&mut Process> {
        if exec_id.is_empty() {
            Some(&mut self.init)
        } else {
            self.execs.get_mut(exec_id)
        }
    }

    /// The runc log file of this container.
    pub fn runc_log(&self) -> PathBuf {
        self.bundle.join("log.json")
    }

    /// What a long operation needs of this container, copied out so that no lock is held
    /// while it works.
    pub fn target(&self) -> Target {
        Target {
            id: self.id.clone(),
            bundle: self.bundle.clone(),
            runc: self.runc.clone(),
            stdio: self.init.stdio.clone(),
        }
    }
}

/// The fixed facts of a container a long operation (start, checkpoint, restore) works on.
#[derive(Debug, Clone)]
pub struct Target {
    /// Container id.
    pub id: String,
    /// Bundle directory.
    pub bundle: PathBuf,
    /// runc with this container's global flags.
    pub runc: crate::runc_cli::RuncCli,
    /// Where the init process's streams go.
    pub stdio: StdioPaths,
}

impl Target {
    /// The runc log file of this container.
    pub fn runc_log(&self) -> PathBuf {
        self.bundle.join("log.json")
    }
}

/// The TaskExit event of a process.
pub fn exit_event(id: &str, exec_id: &str, pid: i32, info: ExitInfo) -> TaskExit {
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

/// The current time as a protobuf timestamp.
pub fn now() -> Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_exit_wins_and_wakes_waiters() {
        let mut p = Process::new("", StdioPaths::default());
        let mut rx = p.exited.subscribe();
        assert!(rx.borrow_and_update().is_none());
        let first = p.set_exited(137);
        let again = p.set_exited(0);
        assert_eq!(first, again);
        assert_eq!(first.status, 137);
        assert_eq!(p.status, ProcessStatus::Stopped);
        assert!(rx.has_changed().unwrap());
    }

    #[test]
    fn negative_exit_codes_are_clamped() {
        let mut p = Process::new("e1", StdioPaths::default());
        assert_eq!(p.set_exited(-1).status, 255);
    }
}
