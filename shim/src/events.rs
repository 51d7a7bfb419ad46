//! Events to containerd go through one channel to one publisher task. A request handler or
//! the exit watcher only enqueues (never awaits containerd), so a slow or restarting
//! containerd delays no reply and no exit, and events leave in the order they were made
//! (an OOM before the exit it caused, a create before its start).

use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::ttrpc::context::Context;
use tokio::sync::{mpsc, oneshot};

/// Where published events go: containerd's event service, or a recorder in tests.
#[async_trait]
pub trait EventSink: Send + Sync + 'static {
    /// Delivers one event; the error text is logged.
    async fn deliver(&self, topic: &str, event: Box<dyn MessageDyn>) -> Result<(), String>;
}

/// containerd's event service for the shim's namespace.
pub struct ContainerdEvents {
    /// The connection to containerd.
    pub publisher: RemotePublisher,
    /// The containerd namespace of every event.
    pub namespace: String,
}

impl std::fmt::Debug for ContainerdEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerdEvents")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl EventSink for ContainerdEvents {
    async fn deliver(&self, topic: &str, event: Box<dyn MessageDyn>) -> Result<(), String> {
        self.publisher
            .publish(Context::default(), topic, &self.namespace, event)
            .await
            .map_err(|e| e.to_string())
    }
}

enum Outgoing {
    Event(&'static str, Box<dyn MessageDyn>),
    Flush(oneshot::Sender<()>),
}

/// The sending end of the event channel; cheap to clone.
#[derive(Clone)]
pub struct EventQueue {
    tx: mpsc::UnboundedSender<Outgoing>,
}

impl std::fmt::Debug for EventQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventQueue").finish_non_exhaustive()
    }
}

impl EventQueue {
    /// Starts the publisher task delivering to `sink`, one event at a time, in order.
    pub fn start(sink: impl EventSink) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
        tokio::spawn(async move {
            while let Some(item) = rx.recv().await {
                match item {
                    Outgoing::Event(topic, event) => {
                        if let Err(e) = sink.deliver(topic, event).await {
                            log::warn!("cannot publish {topic}: {e}");
                        }
                    }
                    Outgoing::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        Self { tx }
    }

    /// Queues an event on `topic`; returns at once.
    pub fn publish(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
        if self.tx.send(Outgoing::Event(topic, event)).is_err() {
            log::warn!("cannot publish {topic}: the publisher task has ended");
        }
    }

    /// Waits, at most `limit`, until every event queued before this call was delivered
    /// (before the shim exits).
    pub async fn flush(&self, limit: Duration) {
        let (done, delivered) = oneshot::channel();
        if self.tx.send(Outgoing::Flush(done)).is_err() {
            return;
        }
        if tokio::time::timeout(limit, delivered).await.is_err() {
            log::warn!(
                "events still undelivered after {} ms at shim exit",
                limit.as_millis()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::events::task::{TaskExit, TaskOOM};
    use std::sync::{Arc, Mutex};
    use tokio::sync::Semaphore;

    /// Records topics; each delivery first waits for a permit, like a stalled containerd.
    struct GatedRecorder {
        seen: Arc<Mutex<Vec<String>>>,
        gate: Arc<Semaphore>,
    }

    #[async_trait]
    impl EventSink for GatedRecorder {
        async fn deliver(&self, topic: &str, event: Box<dyn MessageDyn>) -> Result<(), String> {
            self.gate
                .acquire()
                .await
                .map_err(|e| e.to_string())?
                .forget();
            let name = event.descriptor_dyn().name().to_owned();
            self.seen.lock().unwrap().push(format!("{topic} {name}"));
            Ok(())
        }
    }

    #[tokio::test]
    async fn publishing_never_waits_for_containerd_and_keeps_the_order() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(Semaphore::new(0));
        let queue = EventQueue::start(GatedRecorder {
            seen: seen.clone(),
            gate: gate.clone(),
        });
        // containerd takes no event yet, and still both calls return.
        queue.publish("/tasks/oom", Box::new(TaskOOM::default()));
        queue.publish("/tasks/exit", Box::new(TaskExit::default()));
        assert!(seen.lock().unwrap().is_empty());
        gate.add_permits(2);
        queue.flush(Duration::from_secs(60)).await;
        assert_eq!(
            *seen.lock().unwrap(),
            ["/tasks/oom TaskOOM", "/tasks/exit TaskExit"]
        );
    }
}
