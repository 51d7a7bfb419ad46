//! The priority gate in front of the data plane's CPU work: hashing, compression,
//! decompression and verification of chunks take a permit first, and there are only as many
//! permits as the node gives the data plane (`[dataplane] workers`).
//!
//! Prefetch and background work together hold at most `lower_limit` permits: during a
//! checkpoint the workload is frozen and a restore's is not running yet, so foreground work
//! may use every permit, while work that runs beside the workload leaves it the rest.
//!
//! Each operation also holds a [`ClassSession`] for as long as it runs. Work of a class
//! gets a permit only while no higher class waits for one *or has an operation running*, so
//! a background drain parks at its next chunk as soon as a checkpoint or a restore starts,
//! stays parked between that operation's chunks (when it waits on the disk, not the gate),
//! and resumes when it ends.

use std::sync::{Condvar, Mutex};

/// Why data-plane work runs, highest priority first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkClass {
    /// A checkpoint storing up to the tier it asked for, or a restore: a caller waits.
    #[default]
    Foreground,
    /// Copying a checkpoint nearer ahead of its restore.
    Prefetch,
    /// Drains past the requested tier and demotions.
    Background,
}

impl WorkClass {
    const ALL: [WorkClass; 3] = [
        WorkClass::Foreground,
        WorkClass::Prefetch,
        WorkClass::Background,
    ];

    fn rank(self) -> usize {
        match self {
            WorkClass::Foreground => 0,
            WorkClass::Prefetch => 1,
            WorkClass::Background => 2,
        }
    }

    /// Stable lower-case name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkClass::Foreground => "foreground",
            WorkClass::Prefetch => "prefetch",
            WorkClass::Background => "background",
        }
    }
}

#[derive(Debug)]
struct GateState {
    free: usize,
    /// Permits held by prefetch and background work.
    lower_in_use: usize,
    waiting: [usize; 3],
    active: [usize; 3],
}

/// A counting semaphore whose waiters are served by [`WorkClass`], highest first.
#[derive(Debug)]
pub struct PriorityGate {
    permits: usize,
    lower_limit: usize,
    state: Mutex<GateState>,
    freed: Condvar,
}

/// One unit of CPU work admitted by a [`PriorityGate`]; dropping it frees the permit.
#[derive(Debug)]
pub struct WorkPermit<'a> {
    gate: &'a PriorityGate,
    lower: bool,
}

/// One operation of a class running; lower classes wait while it lives.
#[derive(Debug)]
pub struct ClassSession<'a> {
    gate: &'a PriorityGate,
    rank: usize,
}

impl PriorityGate {
    /// A gate with `permits` permits (at least one), all usable by every class.
    pub fn new(permits: usize) -> Self {
        Self::with_lower_limit(permits, permits)
    }

    /// A gate with `permits` permits, of which prefetch and background work together hold at
    /// most `lower_limit` (at least one).
    pub fn with_lower_limit(permits: usize, lower_limit: usize) -> Self {
        let permits = permits.max(1);
        Self {
            permits,
            lower_limit: lower_limit.clamp(1, permits),
            state: Mutex::new(GateState {
                lower_in_use: 0,
                free: permits,
                waiting: [0; 3],
                active: [0; 3],
            }),
            freed: Condvar::new(),
        }
    }

    /// Number of permits: how many chunks the whole node works on at once.
    pub fn permits(&self) -> usize {
        self.permits
    }

    /// Permits prefetch and background work may hold together.
    pub fn lower_limit(&self) -> usize {
        self.lower_limit
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks an operation of `class` as running until the returned guard is dropped.
    pub fn session(&self, class: WorkClass) -> ClassSession<'_> {
        let rank = class.rank();
        self.lock().active[rank] += 1;
        ClassSession { gate: self, rank }
    }

    /// Waits for a permit; a permit goes to `class` only while no higher class waits for one
    /// or runs an operation.
    pub fn acquire(&self, class: WorkClass) -> WorkPermit<'_> {
        let rank = class.rank();
        let mut state = self.lock();
        state.waiting[rank] += 1;
        loop {
            let higher_busy = (0..rank).any(|r| state.waiting[r] > 0 || state.active[r] > 0);
            let lower = rank > 0;
            let under_limit = !lower || state.lower_in_use < self.lower_limit;
            if state.free > 0 && !higher_busy && under_limit {
                state.free -= 1;
                state.waiting[rank] -= 1;
                if lower {
                    state.lower_in_use += 1;
                }
                return WorkPermit { gate: self, lower };
            }
            state = self.freed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Work of `class` waiting for a permit now (for tests and metrics).
    pub fn waiting(&self, class: WorkClass) -> usize {
        self.lock().waiting[class.rank()]
    }

    /// Permits held now.
    pub fn in_use(&self) -> usize {
        self.permits - self.lock().free
    }

    /// Waiters of every class, highest first (for metrics).
    pub fn waiting_by_class(&self) -> [(WorkClass, usize); 3] {
        let state = self.lock();
        WorkClass::ALL.map(|c| (c, state.waiting[c.rank()]))
    }
}

impl Drop for ClassSession<'_> {
    fn drop(&mut self) {
        self.gate.lock().active[self.rank] -= 1;
        self.gate.freed.notify_all();
    }
}

impl Drop for WorkPermit<'_> {
    fn drop(&mut self) {
        let mut state = self.gate.lock();
        state.free += 1;
        if self.lower {
            state.lower_in_use -= 1;
        }
        drop(state);
        // Every waiter re-checks: only the highest class that waits may take the permit.
        self.gate.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn wait_until(what: impl Fn() -> bool) {
        while !what() {
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_freed_permit_goes_to_foreground_work_before_a_background_drain_that_waited_longer() {
        let gate = Arc::new(PriorityGate::new(1));
        let order = Arc::new(Mutex::new(Vec::new()));
        let held = gate.acquire(WorkClass::Foreground);
        assert_eq!(gate.in_use(), 1);

        let spawn = |class: WorkClass| {
            let (gate, order) = (Arc::clone(&gate), Arc::clone(&order));
            std::thread::spawn(move || {
                let _permit = gate.acquire(class);
                order.lock().unwrap().push(class);
            })
        };
        let drain = spawn(WorkClass::Background);
        wait_until(|| gate.waiting(WorkClass::Background) == 1);
        let prefetch = spawn(WorkClass::Prefetch);
        wait_until(|| gate.waiting(WorkClass::Prefetch) == 1);
        let checkpoint = spawn(WorkClass::Foreground);
        wait_until(|| gate.waiting(WorkClass::Foreground) == 1);
        // All three are parked: the background drain stays parked while the others wait.
        assert!(order.lock().unwrap().is_empty());

        drop(held);
        for t in [checkpoint, prefetch, drain] {
            t.join().unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            vec![
                WorkClass::Foreground,
                WorkClass::Prefetch,
                WorkClass::Background
            ]
        );
        assert_eq!(gate.in_use(), 0);
    }

    #[test]
    fn background_work_stays_parked_while_a_foreground_operation_runs_even_with_free_permits() {
        let gate = Arc::new(PriorityGate::new(2));
        let checkpoint = gate.session(WorkClass::Foreground);
        let done = Arc::new(Mutex::new(false));
        let drain = {
            let (gate, done) = (Arc::clone(&gate), Arc::clone(&done));
            std::thread::spawn(move || {
                let _permit = gate.acquire(WorkClass::Background);
                *done.lock().unwrap() = true;
            })
        };
        wait_until(|| gate.waiting(WorkClass::Background) == 1);
        // The checkpoint's own chunks pass while the drain waits.
        drop(gate.acquire(WorkClass::Foreground));
        assert!(!*done.lock().unwrap(), "the drain is parked");
        assert_eq!(gate.in_use(), 0, "with both permits free");
        drop(checkpoint);
        drain.join().unwrap();
        assert!(*done.lock().unwrap());
    }

    #[test]
    fn background_work_holds_at_most_its_share_and_foreground_work_the_rest() {
        let gate = PriorityGate::with_lower_limit(2, 1);
        assert_eq!(gate.lower_limit(), 1);
        let drain = gate.acquire(WorkClass::Background);
        std::thread::scope(|s| {
            let prefetch = s.spawn(|| drop(gate.acquire(WorkClass::Prefetch)));
            wait_until(|| gate.waiting(WorkClass::Prefetch) == 1);
            // A permit is free, but background work already holds its share.
            assert_eq!(gate.in_use(), 1);
            let checkpoint = gate.acquire(WorkClass::Foreground);
            assert_eq!(gate.in_use(), 2, "foreground work takes the other permit");
            drop(checkpoint);
            assert_eq!(gate.waiting(WorkClass::Prefetch), 1, "still over the share");
            drop(drain);
            prefetch.join().unwrap();
        });
        assert_eq!(gate.in_use(), 0);
        assert_eq!(PriorityGate::with_lower_limit(4, 0).lower_limit(), 1);
    }

    #[test]
    fn permits_bound_the_work_running_at_once() {
        let gate = PriorityGate::new(2);
        let a = gate.acquire(WorkClass::Background);
        let b = gate.acquire(WorkClass::Background);
        assert_eq!(gate.in_use(), 2);
        std::thread::scope(|s| {
            let third = s.spawn(|| {
                let _p = gate.acquire(WorkClass::Foreground);
                gate.in_use()
            });
            wait_until(|| gate.waiting(WorkClass::Foreground) == 1);
            assert_eq!(gate.in_use(), 2, "the third waits while two run");
            drop(a);
            assert_eq!(third.join().unwrap(), 2);
        });
        drop(b);
        assert_eq!(PriorityGate::new(0).permits(), 1);
    }
}
