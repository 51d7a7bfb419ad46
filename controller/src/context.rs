//! What every reconcile gets: the client, the clock, the event recorder, the metrics and
//! the per-object error backoff.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};

use crate::metrics::Metrics;
use kybernate_api::apply::CONTROLLER_MANAGER;
use kybernate_api::backoff::ErrorBackoff;

/// The time source; tests pin it so timeouts are decided without sleeping.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Now.
    fn now(&self) -> Timestamp;
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// Shared state of the reconcilers.
#[derive(Clone)]
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Time source.
    pub clock: Arc<dyn Clock>,
    /// Reconcile and error counters.
    pub metrics: Arc<Metrics>,
    /// How long a failing object waits before its next try.
    pub backoff: Arc<ErrorBackoff>,
    recorder: Recorder,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("clock", &self.clock)
            .finish()
    }
}

impl Context {
    /// A context publishing events as `kybernate-controller` (instance: this pod's name).
    pub fn new(client: Client, clock: Arc<dyn Clock>, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter {
            controller: CONTROLLER_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            clock,
            metrics,
            backoff: Arc::new(ErrorBackoff::default()),
        }
    }

    /// Now, as a Kubernetes time.
    pub fn now(&self) -> Time {
        Time(self.clock.now())
    }

    /// Publishes an Event about `obj`. Events are best effort: a failure is logged, never
    /// fails the reconcile.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(%error, reason, "cannot publish event");
        }
    }
}
