//! Leases on the shim's two-step operations. A container checkpoint the shim has begun
//! (Begin) holds the workload's CUDA locks and the checkpoint's name; a restore it has staged
//! (Stage) holds staged images and the name. Only the shim's End gives them back, and a shim
//! that is killed, hangs, or whose containerd gave up never sends it. Without a deadline the
//! workload would stay CUDA-locked and the name busy until the agent restarts.
//!
//! So each Begin and Stage is granted a lease of `timeouts.shim_lease_ms` (by default the
//! longer of the dump and restore timeouts plus a margin), and the shim is told its length.
//! When it runs out before the End, the agent settles the operation itself, the way recovery
//! settles what a crashed agent left ([`super::lease_expiry`]). A lease is identified by a
//! number that is never reused, so a timer that fires after its End (or after a renewal) does
//! nothing.

use std::time::{Duration, Instant};

use actix::prelude::*;
use kybernate_dataplane::CheckpointName;

/// One lease: which grant it is and how long it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    id: u64,
    /// How long it was granted for.
    pub length: Duration,
    /// When it was granted.
    pub granted: Instant,
}

impl Lease {
    /// Its length in whole milliseconds, for the shim.
    pub fn millis(&self) -> u64 {
        u64::try_from(self.length.as_millis()).unwrap_or(u64::MAX)
    }
}

/// Hands out leases with numbers that are never reused.
#[derive(Debug, Default)]
pub(super) struct Leases {
    granted: u64,
}

impl Leases {
    /// A new lease of `length`, starting now.
    pub fn grant(&mut self, length: Duration) -> Lease {
        self.granted += 1;
        Lease {
            id: self.granted,
            length,
            granted: Instant::now(),
        }
    }
}

/// The lease of a container checkpoint ran out before its End.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct CheckpointLeaseExpired {
    /// The checkpoint.
    pub name: CheckpointName,
    /// The lease that ran out; a later grant for the same name is another one.
    pub lease: Lease,
}

/// The lease of a staged container restore ran out before its End.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct RestoreLeaseExpired {
    /// The checkpoint being restored.
    pub name: CheckpointName,
    /// The lease that ran out.
    pub lease: Lease,
}

/// Why a lease was settled without its End, for the log, the event and the journal.
pub fn expiry_reason(operation: &str, ended_by: &str, lease: &Lease) -> String {
    format!(
        "the shim's {operation} got no {ended_by} within its lease of {} ms (the shim was \
         killed, hung or gave up)",
        lease.millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_never_reused() {
        let mut leases = Leases::default();
        let first = leases.grant(Duration::from_secs(1));
        let second = leases.grant(Duration::from_secs(1));
        assert_ne!(first, second);
        assert_eq!(first.millis(), 1_000);
        let reason = expiry_reason("checkpoint", "End", &first);
        assert!(reason.contains("within its lease of 1000 ms"), "{reason}");
    }
}
