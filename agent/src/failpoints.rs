//! Test-only failpoints at the phase boundaries recovery must survive. They exist in debug
//! builds and with the `failpoints` feature; release builds leave them out entirely.
//!
//! `KYBERNATE_FAILPOINTS=name=action[,name=action...]` arms them in the agent's environment.
//! Actions: `kill` (the agent SIGKILLs itself, exactly like a crash: no destructor, no
//! flush) and `error` (the phase fails with an error naming the failpoint).

/// Environment variable that arms failpoints.
pub const ENV: &str = "KYBERNATE_FAILPOINTS";

/// What an armed failpoint does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// SIGKILL the agent.
    Kill,
    /// Fail the phase.
    Error,
}

/// The action `spec` (the value of [`ENV`]) arms at failpoint `name`.
pub fn parse(spec: &str, name: &str) -> Option<Action> {
    spec.split(',').find_map(|item| {
        let (point, action) = item.trim().split_once('=')?;
        if point != name {
            return None;
        }
        match action {
            "kill" => Some(Action::Kill),
            "error" => Some(Action::Error),
            _ => None,
        }
    })
}

/// Fires failpoint `name` when armed: `Err` with a message for [`Action::Error`], never
/// returns for [`Action::Kill`].
#[cfg(any(debug_assertions, feature = "failpoints"))]
pub fn hit(name: &str) -> Result<(), String> {
    let Ok(spec) = std::env::var(ENV) else {
        return Ok(());
    };
    match parse(&spec, name) {
        None => Ok(()),
        Some(Action::Error) => Err(format!("failpoint {name}")),
        Some(Action::Kill) => {
            tracing::warn!(failpoint = name, "failpoint: killing the agent");
            // SAFETY: kill(2) on our own process with a valid signal.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            unreachable!("SIGKILL cannot be caught")
        }
    }
}

/// Release builds: failpoints do not exist.
#[cfg(not(any(debug_assertions, feature = "failpoints")))]
#[inline(always)]
pub fn hit(_name: &str) -> Result<(), String> {
    Ok(())
}

/// Fires failpoint `name` as an agent error (see [`hit`]).
pub fn failpoint(name: &str) -> Result<(), crate::error::AgentError> {
    hit(name).map_err(crate::error::AgentError::Internal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_arm_only_their_points() {
        let spec = "checkpoint.after_ram_commit=kill, restore.before_criu=error";
        assert_eq!(
            parse(spec, "checkpoint.after_ram_commit"),
            Some(Action::Kill)
        );
        assert_eq!(parse(spec, "restore.before_criu"), Some(Action::Error));
        assert_eq!(parse(spec, "checkpoint.before_criu"), None);
        assert_eq!(parse("x=explode", "x"), None);
        assert_eq!(parse("", "x"), None);
    }
}
