//! The node's workloads, apart from the node agent's routing, catalog and policy: one actor
//! per bare process tree (by root PID), which runs its checkpoints and restores one at a
//! time, and one state channel per workload, process or container
//! ([`crate::workload_state`]). A workload is forgotten (its actor stops) once no operation
//! uses it, no checkpoint names it and, for a process, the process is gone.

use std::collections::{HashMap, HashSet};

use actix::prelude::*;

use crate::catalog::{Catalog, CheckpointRecord};
use crate::container::ContainerActor;
use crate::node_parts::NodeParts;
use crate::workload_state::{StateSender, WorkloadKey, WorkloadState, WorkloadStates};

/// Every workload the agent knows.
#[derive(Debug, Default)]
pub struct Workloads {
    /// The actor of each bare-process workload, by root PID.
    actors: HashMap<i32, Addr<ContainerActor>>,
    /// Every workload's state, read without asking an actor.
    states: WorkloadStates,
}

impl Workloads {
    /// The actor of the process tree rooted at `pid`, started when it is new.
    pub fn actor(&mut self, parts: &NodeParts, pid: i32) -> Addr<ContainerActor> {
        let state = self.states.channel(WorkloadKey::Process(pid));
        self.actors
            .entry(pid)
            .or_insert_with(|| ContainerActor::new(parts.clone(), state).start())
            .clone()
    }

    /// The state channel of `key`, for whoever drives its next operation.
    pub fn channel(&mut self, key: WorkloadKey) -> StateSender {
        self.states.channel(key)
    }

    /// The state `list` and `inspect` show for the workload of `record`.
    pub fn state_label(&self, record: &CheckpointRecord) -> String {
        self.states
            .get(&WorkloadKey::of(record))
            .map_or_else(|| "Unknown".to_owned(), |s| s.to_string())
    }

    /// Moves the workload a checkpoint was taken of to `state`; returns the state before.
    pub fn set_state_of(
        &mut self,
        record: &CheckpointRecord,
        state: WorkloadState,
    ) -> Option<WorkloadState> {
        let key = WorkloadKey::of(record);
        let before = self.states.get(&key);
        self.states.set(key, state);
        before
    }

    /// Puts the workload a checkpoint was taken of back to `before`.
    pub fn put_back_state_of(&mut self, record: &CheckpointRecord, before: Option<WorkloadState>) {
        self.states.put_back(WorkloadKey::of(record), before);
    }

    /// Forgets the workloads that no checkpoint of `catalog` names and that no operation
    /// uses: their actors stop once their last message is answered.
    pub fn evict_idle(&mut self, catalog: &Catalog) {
        let named: HashSet<WorkloadKey> = catalog.all().map(WorkloadKey::of).collect();
        let gone = self.states.evict(|key| {
            named.contains(key)
                || matches!(key, WorkloadKey::Process(pid) if crate::process::stat(*pid).is_some())
        });
        for key in gone {
            if let WorkloadKey::Process(pid) = key {
                self.actors.remove(&pid);
            }
        }
    }
}
