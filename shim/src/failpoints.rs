//! Test-only failpoints between the shim's calls to the agent (Begin, the dump, End; Stage,
//! `runc restore`, End), where a shim that dies or hangs leaves the agent holding a lease.
//! They exist in debug builds and with the `failpoints` feature; release builds leave them
//! out entirely.
//!
//! `KYBERNATE_FAILPOINTS=point=action[,point@container=action...]` in containerd's
//! environment (which every shim inherits) arms them; `point@container` arms a point for one
//! container only, so a test can make one checkpoint fail and the next succeed. Actions:
//! `kill` (the shim SIGKILLs itself, exactly like a crash), `stop` (it SIGSTOPs itself, a
//! hung shim, until someone sends SIGCONT) and `error` (the step fails with an error naming
//! the failpoint). Each point fires once per shim process and container, so the retry after
//! a `stop` or an `error` goes through.

/// Environment variable that arms failpoints (the agent reads the same one).
pub const ENV: &str = "KYBERNATE_FAILPOINTS";

/// What an armed failpoint does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// SIGKILL the shim.
    Kill,
    /// SIGSTOP the shim.
    Stop,
    /// Fail the step.
    Error,
}

/// The action `spec` (the value of [`ENV`]) arms at `point` for `container`.
pub fn parse(spec: &str, point: &str, container: &str) -> Option<Action> {
    spec.split(',').find_map(|item| {
        let (target, action) = item.trim().split_once('=')?;
        let (name, only) = match target.split_once('@') {
            Some((name, only)) => (name, Some(only)),
            None => (target, None),
        };
        if name != point || only.is_some_and(|only| only != container) {
            return None;
        }
        match action {
            "kill" => Some(Action::Kill),
            "stop" => Some(Action::Stop),
            "error" => Some(Action::Error),
            _ => None,
        }
    })
}

/// Fires failpoint `point` for `container` when armed: `Err` with a message for
/// [`Action::Error`], never returns for [`Action::Kill`], returns once continued for
/// [`Action::Stop`].
#[cfg(any(debug_assertions, feature = "failpoints"))]
pub fn hit(point: &str, container: &str) -> Result<(), String> {
    static FIRED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let Ok(spec) = std::env::var(ENV) else {
        return Ok(());
    };
    let Some(action) = parse(&spec, point, container) else {
        return Ok(());
    };
    {
        let key = format!("{point}@{container}");
        let mut fired = FIRED.lock().unwrap_or_else(|e| e.into_inner());
        if fired.contains(&key) {
            return Ok(());
        }
        fired.push(key);
    }
    let signal = match action {
        Action::Error => return Err(format!("failpoint {point}")),
        Action::Kill => libc::SIGKILL,
        Action::Stop => libc::SIGSTOP,
    };
    log::warn!("failpoint {point} for container {container}: signal {signal} to the shim");
    // SAFETY: kill(2) on our own process with a valid signal.
    unsafe {
        libc::kill(libc::getpid(), signal);
    }
    Ok(())
}

/// Release builds: failpoints do not exist.
#[cfg(not(any(debug_assertions, feature = "failpoints")))]
#[inline(always)]
pub fn hit(_point: &str, _container: &str) -> Result<(), String> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_arm_only_their_points_and_containers() {
        let spec = "shim.checkpoint.after_begin@victim=kill, shim.restore.after_stage=stop";
        assert_eq!(
            parse(spec, "shim.checkpoint.after_begin", "victim"),
            Some(Action::Kill)
        );
        assert_eq!(parse(spec, "shim.checkpoint.after_begin", "other"), None);
        assert_eq!(
            parse(spec, "shim.restore.after_stage", "any"),
            Some(Action::Stop)
        );
        assert_eq!(parse("x=error", "x", "c"), Some(Action::Error));
        assert_eq!(parse("x=explode", "x", "c"), None);
        assert_eq!(parse("", "x", "c"), None);
    }
}
