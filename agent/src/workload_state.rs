//! Where each workload on the node is in its lifecycle. A workload is a bare process tree
//! (keyed by its root PID) or a container (keyed by its id); both paths, the agent running
//! CRIU itself and the shim running `runc` between Begin and End, move the same states.
//!
//! Each workload's state lives in a `tokio::sync::watch` channel: whoever drives an operation
//! writes it, and `list`/`inspect` read it at once. Reading through the workload actor's
//! mailbox would wait behind the checkpoint that actor is running, which is exactly when
//! the state is worth reading.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use tokio::sync::watch;

use crate::catalog::CheckpointRecord;

/// Where a workload is in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadState {
    /// Running normally.
    Running,
    /// CUDA phase and CRIU dump in progress: the workload is (being) frozen.
    Freezing,
    /// Dumped; images are being stored in the tiers.
    Dumped,
    /// The last checkpoint is stored.
    Stored,
    /// A restore is in progress.
    Restoring,
    /// The last operation failed.
    Failed,
}

impl WorkloadState {
    /// Whether an operation is under way (the workload's entry must stay).
    pub fn in_flight(self) -> bool {
        matches!(
            self,
            WorkloadState::Freezing | WorkloadState::Dumped | WorkloadState::Restoring
        )
    }
}

impl fmt::Display for WorkloadState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            WorkloadState::Running => "Running",
            WorkloadState::Freezing => "Freezing",
            WorkloadState::Dumped => "Dumped",
            WorkloadState::Stored => "Stored",
            WorkloadState::Restoring => "Restoring",
            WorkloadState::Failed => "Failed",
        };
        f.write_str(s)
    }
}

/// Which workload: how the agent tells workloads apart.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum WorkloadKey {
    /// A bare process tree, by its root PID.
    Process(i32),
    /// A container, by its id.
    Container(String),
}

impl WorkloadKey {
    /// The workload a checkpoint was taken of.
    pub fn of(record: &CheckpointRecord) -> Self {
        if record.container_id.is_empty() {
            WorkloadKey::Process(record.pid)
        } else {
            WorkloadKey::Container(record.container_id.clone())
        }
    }
}

/// The writing end of one workload's state.
pub type StateSender = Arc<watch::Sender<WorkloadState>>;

/// Every known workload's state channel.
#[derive(Debug, Default)]
pub struct WorkloadStates {
    channels: HashMap<WorkloadKey, StateSender>,
}

impl WorkloadStates {
    /// The state channel of `key`, made (as `Running`) when the workload is new.
    pub fn channel(&mut self, key: WorkloadKey) -> StateSender {
        self.channels
            .entry(key)
            .or_insert_with(|| Arc::new(watch::Sender::new(WorkloadState::Running)))
            .clone()
    }

    /// Sets the state of `key`, making its channel when needed.
    pub fn set(&mut self, key: WorkloadKey, state: WorkloadState) {
        self.channel(key).send_replace(state);
    }

    /// Puts `key` back to a state read earlier with [`Self::get`] (forgetting it when the
    /// agent had not seen it then): an operation that changed nothing undoes its state.
    pub fn put_back(&mut self, key: WorkloadKey, before: Option<WorkloadState>) {
        match before {
            Some(state) => self.set(key, state),
            None => {
                self.channels.remove(&key);
            }
        }
    }

    /// The current state of `key`, if the agent has seen the workload.
    pub fn get(&self, key: &WorkloadKey) -> Option<WorkloadState> {
        self.channels.get(key).map(|c| *c.borrow())
    }

    /// A receiver of every change of `key`'s state.
    pub fn watch(&mut self, key: WorkloadKey) -> watch::Receiver<WorkloadState> {
        self.channel(key).subscribe()
    }

    /// Forgets every workload that has no operation under way and that `keep` does not
    /// name (it has a checkpoint, or its actor is still needed).
    pub fn evict(&mut self, keep: impl Fn(&WorkloadKey) -> bool) -> Vec<WorkloadKey> {
        let gone: Vec<WorkloadKey> = self
            .channels
            .iter()
            .filter(|(key, state)| !state.borrow().in_flight() && !keep(key))
            .map(|(key, _)| key.clone())
            .collect();
        for key in &gone {
            self.channels.remove(key);
        }
        gone
    }

    /// How many workloads are known.
    pub fn len(&self) -> usize {
        self.channels.len()
    }

    /// Whether no workload is known.
    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_read_without_asking_anyone_and_evicted_when_idle() {
        let mut states = WorkloadStates::default();
        let process = WorkloadKey::Process(42);
        let container = WorkloadKey::Container("c1".into());
        assert_eq!(states.get(&process), None);
        let mut changes = states.watch(process.clone());
        states.set(process.clone(), WorkloadState::Freezing);
        assert!(changes.has_changed().unwrap());
        assert_eq!(*changes.borrow_and_update(), WorkloadState::Freezing);
        states.set(container.clone(), WorkloadState::Stored);
        assert_eq!(states.get(&container), Some(WorkloadState::Stored));
        let unseen = WorkloadKey::Container("c2".into());
        states.set(unseen.clone(), WorkloadState::Restoring);
        states.put_back(unseen.clone(), None);
        assert_eq!(states.get(&unseen), None);
        states.set(container.clone(), WorkloadState::Restoring);
        states.put_back(container.clone(), Some(WorkloadState::Stored));
        assert_eq!(states.get(&container), Some(WorkloadState::Stored));

        // An operation under way is never evicted; an idle workload only when nothing
        // keeps it.
        assert!(states.evict(|_| false).contains(&container));
        assert_eq!(states.get(&process), Some(WorkloadState::Freezing));
        states.set(process.clone(), WorkloadState::Running);
        assert!(states.evict(|k| k == &process).is_empty());
        assert_eq!(states.evict(|_| false), vec![process]);
        assert!(states.is_empty());
    }

    #[test]
    fn a_record_names_its_workload() {
        let record = CheckpointRecord {
            name: "cp".into(),
            pid: 7,
            container_id: String::new(),
            pod_uid: String::new(),
            gpu_group: String::new(),
            gpu_seat: String::new(),
            created_unix: 0,
            leave_running: false,
            shell_job: false,
            phases: Vec::new(),
            raw_bytes: 0,
            stored_bytes: 0,
            files: Vec::new(),
            gpu: None,
            note: String::new(),
            origin: crate::tenancy::Origin::NodeLocal,
        };
        assert_eq!(WorkloadKey::of(&record), WorkloadKey::Process(7));
        let container = CheckpointRecord {
            container_id: "c".into(),
            ..record
        };
        assert_eq!(
            WorkloadKey::of(&container),
            WorkloadKey::Container("c".into())
        );
    }
}
