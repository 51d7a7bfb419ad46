//! How one process's copy of the fake driver reaches another's: the real driver talks
//! to the kernel module; here each CUDA process runs a control thread that polls
//! `ctl/<pid>/request` and answers in `ctl/<pid>/response`. Plain files survive a CRIU
//! dump and restore unchanged (no sockets, no open descriptors), and a thread asleep
//! in `nanosleep` is restored like any other.
//!
//! Request line: `<token> <op> [arg]`; response line: `<token> <code> <value> [detail]`,
//! where `detail` (the rest of the line) names the device region a custom-storage call
//! maps.

use crate::codes::{INVALID_VALUE, NOT_FOUND, OPERATING_SYSTEM, TIMEOUT};
use crate::device;
use crate::node;
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(2);
/// How long a caller waits for calls other than lock (which has its own timeout).
const CALL_WAIT: Duration = Duration::from_secs(120);
/// Extra time a caller allows beyond a lock timeout for the answer to arrive.
const LOCK_GRACE: Duration = Duration::from_secs(5);

fn ctl_dir(pid: u32) -> Option<PathBuf> {
    Some(node::dir()?.join("ctl").join(pid.to_string()))
}

/// Starts this process's control thread once.
pub fn serve() {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        if node::dir().is_none() {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("fake-cuda-ctl".into())
            .spawn(control_loop);
        if let Err(e) = spawned {
            eprintln!("fake libcuda: cannot start control thread: {e}");
        }
    });
}

/// Serves `ctl/<host pid>/`. The host pid is looked up on every turn: a container restored
/// by CRIU keeps its pids inside its namespace but gets new ones on the host.
fn control_loop() {
    let mut serving: Option<(PathBuf, i32)> = None;
    loop {
        std::thread::sleep(POLL);
        let Some(dir) = ctl_dir(node::own_pid()) else {
            continue;
        };
        if serving.as_ref().is_none_or(|(d, _)| *d != dir) {
            let tid = node::own_tid();
            if fs::create_dir_all(&dir).is_err()
                || fs::write(dir.join("tid"), tid.to_string()).is_err()
            {
                eprintln!("fake libcuda: cannot create control dir {}", dir.display());
                continue;
            }
            serving = Some((dir, tid));
        }
        let Some((dir, tid)) = serving.clone() else {
            continue;
        };
        let request = dir.join("request");
        let Ok(text) = fs::read_to_string(&request) else {
            continue;
        };
        let _ = fs::remove_file(&request);
        let mut parts = text.split_whitespace();
        let token = parts.next().unwrap_or("-").to_string();
        let op = parts.next().unwrap_or("");
        let arg = parts.next().unwrap_or("");
        let (code, value, detail) = handle(op, arg, tid);
        let tmp = dir.join("response.tmp");
        let written = fs::write(&tmp, format!("{token} {code} {value} {detail}"))
            .and_then(|()| fs::rename(&tmp, dir.join("response")));
        if let Err(e) = written {
            eprintln!("fake libcuda: cannot answer {op}: {e}");
        }
    }
}

fn handle(op: &str, arg: &str, tid: i32) -> (i32, i64, String) {
    let plain = |(code, value): (i32, i64)| (code, value, String::new());
    let mapped =
        |(code, len, path): device::Mapped| (code, i64::try_from(len).unwrap_or(i64::MAX), path);
    match op {
        "state" => plain(match node::fault("state", node::own_pid()) {
            Some(node::Fault::Fail(code)) => (code, 0),
            _ => (0, device::state() as i64),
        }),
        "restore_tid" => plain((0, i64::from(tid))),
        "lock" => plain((device::lock(arg.parse().unwrap_or(0)), 0)),
        "checkpoint" => plain((device::checkpoint(), 0)),
        "restore" => plain(match parse_pairs(arg) {
            Some(pairs) => (device::restore(&pairs), 0),
            None => (INVALID_VALUE, 0),
        }),
        "unlock" => plain((device::unlock(), 0)),
        "checkpoint_custom" => mapped(device::checkpoint_custom()),
        "restore_custom" => match parse_pairs(arg) {
            Some(pairs) => mapped(device::restore_custom(&pairs)),
            None => plain((INVALID_VALUE, 0)),
        },
        "finish" => plain((device::finish_custom(arg == "done"), 0)),
        _ => plain((INVALID_VALUE, 0)),
    }
}

/// `old=new,old=new` (or `-` for none).
fn parse_pairs(arg: &str) -> Option<Vec<([u8; 16], [u8; 16])>> {
    if arg == "-" || arg.is_empty() {
        return Some(Vec::new());
    }
    arg.split(',')
        .map(|pair| {
            let (old, new) = pair.split_once('=')?;
            Some((node::parse_uuid(old)?, node::parse_uuid(new)?))
        })
        .collect()
}

/// Formats UUID pairs for a `restore` request.
pub fn format_pairs(pairs: &[([u8; 16], [u8; 16])]) -> String {
    if pairs.is_empty() {
        return "-".into();
    }
    pairs
        .iter()
        .map(|(o, n)| format!("{}={}", node::format_uuid(o), node::format_uuid(n)))
        .collect::<Vec<_>>()
        .join(",")
}

/// Sends one request to `pid`'s control thread and waits for its answer. A process
/// without a live control thread is not a CUDA process: `CUDA_ERROR_NOT_FOUND`.
pub fn call(pid: u32, op: &str, arg: &str) -> (i32, i64) {
    let (code, value, _) = call_detailed(pid, op, arg);
    (code, value)
}

/// [`call`], also returning the answer's detail (the region a custom-storage call maps).
pub fn call_detailed(pid: u32, op: &str, arg: &str) -> (i32, i64, String) {
    let result = call_inner(pid, op, arg);
    node::log_call(&format!("{op} {pid} {}", result.0));
    result
}

fn call_inner(pid: u32, op: &str, arg: &str) -> (i32, i64, String) {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let Some(dir) = ctl_dir(pid) else {
        return (NOT_FOUND, 0, String::new());
    };
    let alive = fs::read_to_string(dir.join("tid")).ok().is_some_and(|tid| {
        node::proc_root()
            .join(pid.to_string())
            .join("task")
            .join(tid.trim())
            .exists()
    });
    if !alive {
        return (NOT_FOUND, 0, String::new());
    }
    let wait = match op {
        "lock" => Duration::from_millis(arg.parse().unwrap_or(0)) + LOCK_GRACE,
        _ => CALL_WAIT,
    };
    let token = format!(
        "{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let tmp = dir.join(format!("request.{token}"));
    let request = dir.join("request");
    let deadline = Instant::now() + wait;
    while request.exists() {
        if Instant::now() >= deadline {
            return (TIMEOUT, 0, String::new());
        }
        std::thread::sleep(POLL);
    }
    let sent =
        fs::write(&tmp, format!("{token} {op} {arg}")).and_then(|()| fs::rename(&tmp, &request));
    if sent.is_err() {
        return (OPERATING_SYSTEM, 0, String::new());
    }
    let response = dir.join("response");
    loop {
        if let Ok(text) = fs::read_to_string(&response) {
            let mut parts = text.splitn(4, ' ');
            if parts.next() == Some(token.as_str()) {
                let _ = fs::remove_file(&response);
                let code = parts.next().and_then(|c| c.parse().ok()).unwrap_or(999);
                let value = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                let detail = parts.next().unwrap_or("").trim().to_string();
                return (code, value, detail);
            }
        }
        if Instant::now() >= deadline {
            let _ = fs::remove_file(&request);
            return (TIMEOUT, 0, String::new());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
