//! What the session reads from the host: available RAM and the processes of a tree.

use crate::error::CudaError;
use std::fs;
use std::path::{Path, PathBuf};

/// `MemAvailable` from `/proc/meminfo`, in bytes.
pub fn available_memory() -> Result<u64, CudaError> {
    let path = Path::new("/proc/meminfo");
    let text = fs::read_to_string(path).map_err(|source| CudaError::HostFile {
        path: path.into(),
        source,
    })?;
    parse_mem_available(&text).ok_or_else(|| CudaError::HostFile {
        path: path.into(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "no MemAvailable line"),
    })
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Refuses a checkpoint whose GPU memory (plus `margin`) would not fit in `available`.
pub fn preflight(gpu_bytes: u64, margin: u64, available: u64) -> Result<(), CudaError> {
    if gpu_bytes.saturating_add(margin) > available {
        return Err(CudaError::InsufficientHostMemory {
            gpu_bytes,
            margin,
            available,
        });
    }
    Ok(())
}

/// `root` and all its descendants, parents before children: the process tree of a bare
/// workload (containers use their cgroup's process list instead).
pub fn process_tree(root: u32) -> Result<Vec<u32>, CudaError> {
    let proc_dir = PathBuf::from("/proc");
    let entries = fs::read_dir(&proc_dir).map_err(|source| CudaError::HostFile {
        path: proc_dir.clone(),
        source,
    })?;
    let mut parent_of = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may exit while we scan; it is then no longer part of the tree.
        if let Some(ppid) = fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|s| parse_ppid(&s))
        {
            parent_of.push((pid, ppid));
        }
    }
    if !parent_of.iter().any(|(pid, _)| *pid == root) {
        return Err(CudaError::HostFile {
            path: proc_dir.join(root.to_string()),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such process"),
        });
    }
    let mut tree = vec![root];
    let mut next = 0;
    while next < tree.len() {
        let parent = tree[next];
        let mut children: Vec<u32> = parent_of
            .iter()
            .filter(|(_, ppid)| *ppid == parent)
            .map(|(pid, _)| *pid)
            .collect();
        children.sort_unstable();
        tree.extend(children);
        next += 1;
    }
    Ok(tree)
}

fn parse_ppid(stat: &str) -> Option<u32> {
    let after_comm = stat.get(stat.rfind(')')? + 2..)?;
    after_comm.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_read_in_bytes() {
        let text = "MemTotal: 100 kB\nMemFree: 5 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(parse_mem_available(text), Some(2048 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn preflight_refuses_when_gpu_memory_and_margin_exceed_ram() {
        assert!(preflight(10, 5, 15).is_ok());
        let err = preflight(10, 6, 15).unwrap_err();
        assert!(matches!(
            err,
            CudaError::InsufficientHostMemory {
                gpu_bytes: 10,
                margin: 6,
                available: 15
            }
        ));
        assert!(err.to_string().contains("nothing was locked"));
    }

    #[test]
    fn ppid_survives_parentheses_in_the_command_name() {
        assert_eq!(parse_ppid("42 (a) b) S 7 42 42 0"), Some(7));
    }

    #[test]
    fn tree_of_this_process_contains_a_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let tree = process_tree(std::process::id()).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(tree[0], std::process::id());
        assert!(tree.contains(&child.id()), "{tree:?}");
    }
}
