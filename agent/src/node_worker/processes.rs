//! Finding a container's init process on this node from its runtime ID, through the cgroup
//! paths in /proc (kubelet and containerd put the container ID in the last path element).

use std::collections::HashSet;
use std::path::PathBuf;

/// Maps a container ID to the PID of its init process.
pub trait ProcessResolver: Send + Sync + std::fmt::Debug {
    /// The init process of `container_id`, or why it cannot be found.
    fn init_pid(&self, container_id: &str) -> Result<i32, String>;
}

/// Scans `<proc_root>/<pid>/cgroup` for the container ID.
#[derive(Debug, Clone)]
pub struct CgroupResolver {
    proc_root: PathBuf,
}

impl Default for CgroupResolver {
    fn default() -> Self {
        Self {
            proc_root: PathBuf::from("/proc"),
        }
    }
}

impl CgroupResolver {
    /// A resolver reading another proc mount (tests, or a host /proc mounted elsewhere).
    pub fn with_proc_root(proc_root: PathBuf) -> Self {
        Self { proc_root }
    }

    fn parent_of(&self, pid: i32) -> Option<i32> {
        let status =
            std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|v| v.trim().parse().ok())
    }
}

impl ProcessResolver for CgroupResolver {
    fn init_pid(&self, container_id: &str) -> Result<i32, String> {
        if container_id.len() < 8
            || !container_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!("{container_id:?} is not a container ID"));
        }
        let entries = std::fs::read_dir(&self.proc_root)
            .map_err(|e| format!("cannot list {}: {e}", self.proc_root.display()))?;
        let mut members = HashSet::new();
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(cgroups) = std::fs::read_to_string(entry.path().join("cgroup")) else {
                continue;
            };
            let inside = cgroups.lines().any(|line| {
                line.rsplit(':')
                    .next()
                    .and_then(|path| path.rsplit('/').next())
                    .is_some_and(|leaf| leaf.contains(container_id))
            });
            if inside {
                members.insert(pid);
            }
        }
        let mut roots: Vec<i32> = members
            .iter()
            .copied()
            .filter(|pid| self.parent_of(*pid).is_none_or(|p| !members.contains(&p)))
            .collect();
        roots.sort_unstable();
        match roots.as_slice() {
            [] => Err(format!("no process on this node runs in container {container_id}")),
            [pid] => Ok(*pid),
            many => Err(format!(
                "container {container_id} has {} unrelated process trees ({many:?}); cannot tell its init",
                many.len()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_proc(procs: &[(i32, i32, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (pid, ppid, cgroup) in procs {
            let p = dir.path().join(pid.to_string());
            std::fs::create_dir(&p).unwrap();
            std::fs::write(p.join("cgroup"), format!("0::{cgroup}\n")).unwrap();
            std::fs::write(p.join("status"), format!("Name:\tx\nPPid:\t{ppid}\n")).unwrap();
        }
        dir
    }

    #[test]
    fn picks_the_process_whose_parent_is_outside_the_container() {
        let root = fake_proc(&[
            (10, 1, "/kubepods/pod1/cri-containerd-abcdef1234.scope"),
            (11, 10, "/kubepods/pod1/cri-containerd-abcdef1234.scope"),
            (12, 1, "/kubepods/pod1/other999999"),
        ]);
        let r = CgroupResolver::with_proc_root(root.path().into());
        assert_eq!(r.init_pid("abcdef1234"), Ok(10));
    }

    #[test]
    fn names_the_container_when_nothing_matches() {
        let root = fake_proc(&[(10, 1, "/kubepods/pod1/zzzzzzzzzz")]);
        let r = CgroupResolver::with_proc_root(root.path().into());
        let err = r.init_pid("abcdef1234").unwrap_err();
        assert!(err.contains("abcdef1234"), "{err}");
    }

    #[test]
    fn refuses_an_id_that_is_a_path() {
        let r = CgroupResolver::default();
        assert!(r
            .init_pid("../../x")
            .unwrap_err()
            .contains("not a container ID"));
    }
}
