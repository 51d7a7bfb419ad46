//! The containers of one shim process, each behind its own short-lived lock.
//!
//! One shim serves every container of a pod, and a checkpoint of one of them takes minutes
//! (agent RPCs, `runc checkpoint`, a download on restore). So no lock here is ever held across
//! an `.await`: the locks are `std::sync` ones, whose guards are not `Send`, and the task
//! service's futures must be `Send`, so the compiler refuses any guard kept across a runc
//! call, an agent RPC or a download. A long operation instead marks its container busy
//! ([`Busy`]), works without a lock, and writes its outcome back under a fresh, brief lock.
//! Exits, `state`, `kill`, `pids` and `exec` of every container therefore stay prompt, and a
//! conflicting operation on the busy container is refused with a message naming the one in
//! progress instead of waiting behind it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use containerd_shim::protos::events::task::TaskExit;

use crate::error::{Result, ShimError};
use crate::process::{Container, ProcessStatus};

/// One container's state and its lock.
pub type ContainerCell = Arc<Mutex<Container>>;

/// The containers of this shim by id.
#[derive(Debug, Default)]
pub struct ContainerTable {
    cells: RwLock<HashMap<String, ContainerCell>>,
}

/// Locks a container's state, recovering it from a panicked holder (its fields stay valid:
/// every write under the lock is a plain assignment).
pub fn lock(cell: &ContainerCell) -> MutexGuard<'_, Container> {
    cell.lock().unwrap_or_else(|p| p.into_inner())
}

impl ContainerTable {
    /// Adds a new container, already marked busy with `operation` (its creation), so that
    /// nothing else acts on it before it is complete. Fails when the id is taken.
    pub fn insert_busy(&self, mut container: Container, operation: &'static str) -> Result<Busy> {
        let id = container.id.clone();
        container.busy = Some(operation);
        let cell = Arc::new(Mutex::new(container));
        let mut cells = self.cells.write().unwrap_or_else(|p| p.into_inner());
        if cells.contains_key(&id) {
            return Err(ShimError::State {
                id,
                message: "already exists in this shim".into(),
            });
        }
        cells.insert(id.clone(), cell.clone());
        Ok(Busy { cell, id })
    }

    /// The container `id`.
    pub fn cell(&self, id: &str) -> Result<ContainerCell> {
        self.cells
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| not_found(id))
    }

    /// Runs `f` on container `id` under its lock (`f` must not block).
    pub fn with<T>(&self, id: &str, f: impl FnOnce(&mut Container) -> Result<T>) -> Result<T> {
        let cell = self.cell(id)?;
        let mut container = lock(&cell);
        f(&mut container)
    }

    /// Marks container `id` busy with `operation` until the returned guard drops. Fails,
    /// naming the operation in progress, when it is busy already.
    pub fn begin(&self, id: &str, operation: &'static str) -> Result<Busy> {
        let cell = self.cell(id)?;
        {
            let mut container = lock(&cell);
            if let Some(running) = container.busy {
                return Err(ShimError::State {
                    id: id.to_owned(),
                    message: format!("cannot {operation}: a {running} is in progress"),
                });
            }
            container.busy = Some(operation);
        }
        Ok(Busy {
            cell,
            id: id.to_owned(),
        })
    }

    /// Removes container `id`.
    pub fn remove(&self, id: &str) -> Option<ContainerCell> {
        self.cells
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
    }

    /// Whether the shim serves no container.
    pub fn is_empty(&self) -> bool {
        self.cells
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// The current containers (the table's lock is released on return).
    pub fn all(&self) -> Vec<ContainerCell> {
        self.cells
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Whether container `id` exists and its init process is paused.
    pub fn is_paused(&self, id: &str) -> bool {
        self.with(id, |c| Ok(c.init.status == ProcessStatus::Paused))
            .unwrap_or(false)
    }

    /// Records the exit of `pid` on the process that has it, if any, and returns the
    /// TaskExit event to publish.
    pub fn claim_exit(&self, pid: i32, code: i32) -> Option<TaskExit> {
        for cell in self.all() {
            let mut container = lock(&cell);
            let id = container.id.clone();
            if container.init.pid == pid && container.init.exit().is_none() {
                let info = container.init.set_exited(code);
                return Some(crate::process::exit_event(&id, "", pid, info));
            }
            for (exec_id, process) in container.execs.iter_mut() {
                if process.pid == pid && process.exit().is_none() {
                    let info = process.set_exited(code);
                    return Some(crate::process::exit_event(&id, exec_id, pid, info));
                }
            }
        }
        None
    }
}

/// Error for an unknown container.
pub fn not_found(id: &str) -> ShimError {
    ShimError::NotFound {
        id: id.to_owned(),
        what: "container".into(),
    }
}

/// A container marked busy with one operation; dropping it (on success, error or
/// cancellation alike) clears the mark.
#[derive(Debug)]
pub struct Busy {
    cell: ContainerCell,
    id: String,
}

impl Busy {
    /// The container's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Runs `f` on the container under its lock (`f` must not block).
    pub fn with<T>(&self, f: impl FnOnce(&mut Container) -> T) -> T {
        f(&mut lock(&self.cell))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        lock(&self.cell).busy = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::Process;
    use crate::stdio::StdioPaths;

    fn container(id: &str, pid: i32) -> Container {
        let mut init = Process::new("", StdioPaths::default());
        init.pid = pid;
        Container::new(id, "/b".into(), init, crate::runc_cli::RuncCli::default())
    }

    #[test]
    fn a_busy_container_refuses_a_second_operation_until_the_first_ends() {
        let table = ContainerTable::default();
        drop(table.insert_busy(container("a", 10), "create").unwrap());
        let checkpoint = table.begin("a", "checkpoint").unwrap();
        let e = table.begin("a", "delete").unwrap_err().to_string();
        assert!(
            e.contains("cannot delete: a checkpoint is in progress"),
            "{e}"
        );
        drop(checkpoint);
        assert!(table.begin("a", "delete").is_ok());
    }

    #[test]
    fn another_container_stays_usable_while_one_is_busy() {
        let table = ContainerTable::default();
        drop(table.insert_busy(container("a", 10), "create").unwrap());
        drop(table.insert_busy(container("b", 20), "create").unwrap());
        let _checkpoint = table.begin("a", "checkpoint").unwrap();
        let _pause = table.begin("b", "pause").unwrap();
        let exit = table.claim_exit(20, 3).unwrap();
        assert_eq!((exit.container_id.as_str(), exit.exit_status), ("b", 3));
        assert!(table.claim_exit(20, 3).is_none(), "an exit is claimed once");
        assert!(table.claim_exit(99, 0).is_none());
    }

    #[test]
    fn ids_are_unique_and_unknown_ids_are_named() {
        let table = ContainerTable::default();
        drop(table.insert_busy(container("a", 1), "create").unwrap());
        let e = table
            .insert_busy(container("a", 2), "create")
            .unwrap_err()
            .to_string();
        assert!(e.contains("already exists"), "{e}");
        let e = table.begin("nope", "start").unwrap_err().to_string();
        assert!(e.contains("container nope: container not found"), "{e}");
        assert!(table.remove("a").is_some());
        assert!(table.is_empty());
    }
}
