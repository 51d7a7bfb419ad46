//! What the agent needs to know about host processes, read from `/proc`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A process that can be checkpointed, or why it cannot.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    /// PIDs are positive.
    #[error("invalid PID {0}: PIDs are positive")]
    NotPositive(i32),
    /// PID 1 holds the whole PID namespace together.
    #[error("refusing to checkpoint PID 1 (init): dumping it would take down every process")]
    Init,
    /// The agent cannot dump itself or its ancestors.
    #[error("refusing to checkpoint PID {0}: it is the agent itself or one of its ancestors")]
    AgentOrAncestor(i32),
    /// Nothing runs under that PID.
    #[error("no process with PID {0}")]
    NoSuchProcess(i32),
    /// Kernel threads have no user space to dump.
    #[error("PID {0} is a kernel thread")]
    KernelThread(i32),
    /// Zombies have no state left.
    #[error("PID {0} has exited (zombie)")]
    Zombie(i32),
}

/// The fields of `/proc/PID/stat` the agent uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    /// One-letter state: R, S, D, T, t, Z, ...
    pub state: char,
    /// Parent PID.
    pub ppid: i32,
    /// Process group.
    pub pgrp: i32,
    /// Session.
    pub session: i32,
}

/// Reads `/proc/PID/stat`; `None` when the process does not exist.
pub fn stat(pid: i32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<ProcStat> {
    // The command name may contain spaces and parentheses; fields resume after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let mut number = || fields.next()?.parse::<i32>().ok();
    Some(ProcStat {
        state,
        ppid: number()?,
        pgrp: number()?,
        session: number()?,
    })
}

/// Checks that `pid` is a live user-space process the agent may checkpoint.
pub fn check_target(pid: i32) -> Result<ProcStat, TargetError> {
    if pid <= 0 {
        return Err(TargetError::NotPositive(pid));
    }
    if pid == 1 {
        return Err(TargetError::Init);
    }
    let stat = stat(pid).ok_or(TargetError::NoSuchProcess(pid))?;
    if stat.state == 'Z' {
        return Err(TargetError::Zombie(pid));
    }
    if is_agent_or_ancestor(pid) {
        return Err(TargetError::AgentOrAncestor(pid));
    }
    if std::fs::read_link(format!("/proc/{pid}/exe")).is_err() {
        return Err(TargetError::KernelThread(pid));
    }
    Ok(stat)
}

fn is_agent_or_ancestor(pid: i32) -> bool {
    let mut current = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    while current > 1 {
        if current == pid {
            return true;
        }
        match stat(current) {
            Some(s) => current = s.ppid,
            None => return false,
        }
    }
    false
}

/// `pid` and all its descendants, parents before children.
pub fn tree(pid: i32) -> Vec<i32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        all.extend(children(parent));
        i += 1;
    }
    all
}

fn children(pid: i32) -> Vec<i32> {
    let mut kids = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return kids;
    };
    for task in tasks.flatten() {
        let path: PathBuf = task.path().join("children");
        if let Ok(text) = std::fs::read_to_string(path) {
            kids.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    kids
}

/// Sends SIGCONT to every process of the tree, so that a dump that died half-way never
/// leaves the workload stopped.
pub fn continue_tree(pids: &[i32]) {
    for &pid in pids {
        // SAFETY: kill(2) with a valid signal number has no memory-safety preconditions;
        // a PID that vanished meanwhile just yields ESRCH.
        unsafe {
            libc::kill(pid, libc::SIGCONT);
        }
    }
}

/// Kills every process of the tree.
pub fn kill_tree(pids: &[i32]) {
    for &pid in pids {
        // SAFETY: kill(2) with a valid signal number; a vanished PID yields ESRCH.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// Whether a process is stopped (job control or ptrace), i.e. frozen.
pub fn is_stopped(pid: i32) -> bool {
    matches!(stat(pid).map(|s| s.state), Some('T' | 't'))
}

/// Waits until no process (not even a zombie) holds `pid`, so CRIU can restore it there.
pub async fn wait_until_released(pid: i32, timeout: Duration) -> Result<(), Option<ProcStat>> {
    let deadline = Instant::now() + timeout;
    loop {
        let Some(current) = stat(pid) else {
            return Ok(());
        };
        if Instant::now() >= deadline {
            return Err(Some(current));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_with_spaces_and_parens() {
        let s = parse_stat("42 (a (b) c) S 7 42 40 0 -1 4194560 1 2 3").unwrap();
        assert_eq!(
            s,
            ProcStat {
                state: 'S',
                ppid: 7,
                pgrp: 42,
                session: 40
            }
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn rejects_bad_targets() {
        assert_eq!(check_target(0), Err(TargetError::NotPositive(0)));
        assert_eq!(check_target(-5), Err(TargetError::NotPositive(-5)));
        assert_eq!(check_target(1), Err(TargetError::Init));
        let me = i32::try_from(std::process::id()).unwrap();
        assert_eq!(check_target(me), Err(TargetError::AgentOrAncestor(me)));
        assert_eq!(
            check_target(i32::MAX),
            Err(TargetError::NoSuchProcess(i32::MAX))
        );
    }

    #[test]
    fn tree_lists_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let me = i32::try_from(std::process::id()).unwrap();
        let kid = i32::try_from(child.id()).unwrap();
        assert!(tree(me).contains(&kid));
        assert!(check_target(kid).is_ok());
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
