//! Phase progress of checkpoints and restores, fanned out to WatchEvents subscribers and
//! recorded in metrics and in the operation's phase list.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kybernate_proto::agent::v1::Event;
use tokio::sync::broadcast;

use crate::catalog::Phase;
use crate::metrics::Metrics;

/// How many events a slow subscriber may lag behind before it misses some.
pub const EVENT_BUFFER: usize = 1024;

/// Sender side of the event stream.
pub type EventBus = broadcast::Sender<Event>;

/// Times the phases of one operation and reports each to events and metrics.
#[derive(Debug)]
pub struct PhaseClock {
    name: String,
    operation: &'static str,
    events: EventBus,
    metrics: Arc<Metrics>,
    /// Phases finished so far.
    pub phases: Vec<Phase>,
}

impl PhaseClock {
    /// A clock for `operation` ("checkpoint" or "restore") of checkpoint `name`.
    pub fn new(
        name: &str,
        operation: &'static str,
        events: EventBus,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            operation,
            events,
            metrics,
            phases: Vec::new(),
        }
    }

    /// Runs `work` as phase `phase`, reporting its start, end or failure.
    pub async fn run<T, E: std::fmt::Display>(
        &mut self,
        phase: &str,
        work: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        self.emit(phase, "started", Duration::ZERO, String::new());
        let started = Instant::now();
        let result = work.await;
        let took = started.elapsed();
        match &result {
            Ok(_) => {
                self.metrics.phase(self.operation, phase, took);
                self.phases.push(Phase {
                    name: phase.to_owned(),
                    millis: millis(took),
                });
                self.emit(phase, "finished", took, String::new());
            }
            Err(e) => self.emit(phase, "failed", took, e.to_string()),
        }
        result
    }

    /// Records a sub-phase timed elsewhere (e.g. by the CUDA driver session).
    pub fn record(&mut self, phase: &str, took: Duration) {
        self.metrics.phase(self.operation, phase, took);
        self.phases.push(Phase {
            name: phase.to_owned(),
            millis: millis(took),
        });
    }

    /// Tells watchers about `phase` reaching `status` without timing it here (e.g. a lease
    /// that `expired`), with `message` saying why.
    pub fn announce(&self, phase: &str, status: &str, message: String) {
        self.emit(phase, status, Duration::ZERO, message);
    }

    /// Reports a failure of the whole operation in `phase`.
    pub fn failed(&self, phase: &str, reason: &str) {
        self.metrics.failure(self.operation, phase, reason);
    }

    /// Reports success of the whole operation.
    pub fn succeeded(&self) {
        self.metrics.finished(self.operation, "ok");
    }

    fn emit(&self, phase: &str, status: &str, took: Duration, message: String) {
        // No subscribers is the normal case; the send error only says so.
        let _ = self.events.send(Event {
            checkpoint_ref: self.name.clone(),
            operation: self.operation.to_owned(),
            phase: phase.to_owned(),
            status: status.to_owned(),
            millis: millis(took),
            message,
            unix_millis: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(millis)
                .unwrap_or(0),
        });
    }
}

/// Whole milliseconds, saturating.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
