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
    /// CRIU dumps process trees; a thread id would reach it and make it abort.
    #[error("PID {pid} is a thread of process {process}; pass {process}")]
    Thread {
        /// The thread id given.
        pid: i32,
        /// The process it belongs to.
        process: i32,
    },
    /// CRIU restores a process's capability sets as they were and can only hand back
    /// capabilities the agent holds itself, so a dump of this process could never be restored.
    #[error(
        "PID {pid} holds {} that the agent lacks: CRIU could dump it, but the agent could never \
         restore it. Run the workload with fewer capabilities, or grant the agent these \
         (securityContext.capabilities.add in deploy/40-agent-daemonset.yaml)",
        missing.join(", ")
    )]
    CapabilitiesBeyondAgent {
        /// The process of the tree that holds them.
        pid: i32,
        /// The capabilities it holds and the agent lacks, as `CAP_...` names.
        missing: Vec<String>,
    },
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
    /// Start time in clock ticks since boot: with the PID, it names one process for good.
    pub start_ticks: u64,
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
    let (ppid, pgrp, session) = (number()?, number()?, number()?);
    // Field 22 (starttime); fields 7..=21 lie between it and the session.
    let start_ticks = fields.nth(15)?.parse::<u64>().ok()?;
    Some(ProcStat {
        state,
        ppid,
        pgrp,
        session,
        start_ticks,
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
    if let Some(process) = thread_group(pid).filter(|tgid| *tgid != pid) {
        return Err(TargetError::Thread { pid, process });
    }
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

/// Checks, before anything is frozen, that the agent could restore every process of `tree`:
/// each one's permitted and inheritable capabilities must be among the agent's own permitted
/// ones. A process that has exited meanwhile is skipped; CRIU reports it.
pub fn check_capabilities(tree: &[i32]) -> Result<(), TargetError> {
    let Ok(own) = caps::read(None, caps::CapSet::Permitted) else {
        return Ok(());
    };
    for &pid in tree {
        let mut held = caps::CapsHashSet::new();
        for set in [caps::CapSet::Permitted, caps::CapSet::Inheritable] {
            if let Ok(caps) = caps::read(Some(pid), set) {
                held.extend(caps);
            }
        }
        let mut missing: Vec<String> = held.difference(&own).map(ToString::to_string).collect();
        if !missing.is_empty() {
            missing.sort();
            return Err(TargetError::CapabilitiesBeyondAgent { pid, missing });
        }
    }
    Ok(())
}

/// The process (thread group) that `pid` belongs to: itself unless it is a thread id.
fn thread_group(pid: i32) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()
}

/// Whether the process that was `pid` with start time `start_ticks` still runs (a zombie
/// or a later process reusing the PID does not count).
pub fn still_runs(pid: i32, start_ticks: u64) -> bool {
    stat(pid).is_some_and(|s| s.start_ticks == start_ticks && s.state != 'Z')
}

/// PIDs of the processes whose command line has `arg` as one of its arguments, e.g. the
/// CRIU still dumping into an image directory after the agent that started it died.
pub fn with_argument(arg: &std::ffi::OsStr) -> Vec<i32> {
    use std::os::unix::ffi::OsStrExt;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.split(|b| *b == 0).any(|a| a == arg.as_bytes()) {
            found.push(pid);
        }
    }
    found
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

/// Clock ticks since boot now, on the scale of [`ProcStat::start_ticks`].
pub fn uptime_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    let text = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    // "12345.67 ...": seconds with hundredths, read as whole hundredths.
    let uptime = text.split_whitespace().next().unwrap_or("0");
    let (whole, fraction) = uptime.split_once('.').unwrap_or((uptime, "0"));
    let hundredths = whole.parse::<u64>().unwrap_or(0) * 100
        + fraction
            .get(..2)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0);
    hundredths * hz / 100
}

/// Kills the process tree on `pid` when its root started at or after `since_ticks`, i.e.
/// during an operation that began then (what a failed or killed `criu restore` leaves on
/// the workload's PID), and waits up to `wait` for the PID to be free. Returns whether
/// something was killed.
pub async fn kill_started_since(pid: i32, since_ticks: u64, wait: Duration) -> bool {
    let Some(current) = stat(pid) else {
        return false;
    };
    if current.start_ticks < since_ticks {
        return false;
    }
    kill_tree(&tree(pid));
    let _ = wait_until_released(pid, wait).await;
    true
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
        let s = parse_stat(
            "42 (a (b) c) S 7 42 40 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 987654 100 200",
        )
        .unwrap();
        assert_eq!(
            s,
            ProcStat {
                state: 'S',
                ppid: 7,
                pgrp: 42,
                session: 40,
                start_ticks: 987654,
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
    fn a_thread_id_is_refused_naming_its_process() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            tx.send(tid).unwrap();
            let _ = stop_rx.recv();
        });
        let tid = rx.recv().unwrap();
        let me = i32::try_from(std::process::id()).unwrap();
        let err = check_target(tid).unwrap_err();
        assert_eq!(
            err,
            TargetError::Thread {
                pid: tid,
                process: me
            }
        );
        assert_eq!(
            err.to_string(),
            format!("PID {tid} is a thread of process {me}; pass {me}")
        );
        stop_tx.send(()).unwrap();
        thread.join().unwrap();
    }

    #[test]
    fn a_process_is_known_by_pid_and_start_time() {
        let me = i32::try_from(std::process::id()).unwrap();
        let ticks = stat(me).unwrap().start_ticks;
        assert!(still_runs(me, ticks));
        assert!(!still_runs(me, ticks + 1));
        assert!(!still_runs(i32::MAX, ticks));
        let marker = format!("kybernate-test-arg-{}", rand::random::<u32>());
        // `read` is a shell builtin: the shell blocks on its stdin without forking, so only it
        // carries the marker (as $0). A forked child that has not exec'd yet would carry it too.
        let child = std::process::Command::new("sh")
            .args(["-c", "read -r line", &marker])
            .stdin(std::process::Stdio::piped())
            .spawn();
        let mut child = child.unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        // Until the child has exec'd, its command line is still ours.
        let deadline = Instant::now() + Duration::from_secs(10);
        while with_argument(std::ffi::OsStr::new(&marker)).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(with_argument(std::ffi::OsStr::new(&marker)), [pid]);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(with_argument(std::ffi::OsStr::new(&marker)).is_empty());
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
