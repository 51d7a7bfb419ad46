//! A config change the agent rejected becomes a Warning Event on its Node, so an operator who
//! edited the ConfigMap sees why the agents kept the old config (`kubectl describe node`).

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::broadcast::error::RecvError;

use super::NodeWorker;
use crate::node::SubscribeConfigRejections;

/// The Event reason of a rejected config change.
pub const CONFIG_REJECTED: &str = "ConfigRejected";

impl NodeWorker {
    /// Publishes an Event for every config change the agent rejects, until the agent stops.
    pub(super) async fn report_config_rejections(&self) {
        let Ok(mut rejections) = self.agent.send(SubscribeConfigRejections).await else {
            return;
        };
        let reporter = Reporter {
            controller: "kybernate-agent".into(),
            instance: Some(self.node_name.clone()),
        };
        let recorder = Recorder::new(self.client.clone(), reporter);
        let node = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(self.node_name.clone()),
            ..ObjectReference::default()
        };
        loop {
            let problem = match rejections.recv().await {
                Ok(problem) => problem,
                Err(RecvError::Lagged(missed)) => {
                    format!("{missed} config changes were rejected (see the agent's log)")
                }
                Err(RecvError::Closed) => return,
            };
            let event = Event {
                type_: EventType::Warning,
                reason: CONFIG_REJECTED.into(),
                note: Some(format!("the agent keeps its previous config: {problem}")),
                action: "ReloadConfig".into(),
                secondary: None,
            };
            if let Err(error) = recorder.publish(&event, &node).await {
                tracing::warn!(%error, "cannot publish the ConfigRejected event");
            }
        }
    }
}
