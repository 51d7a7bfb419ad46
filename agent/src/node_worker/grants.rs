//! Tenancy for the node worker: it keeps the cluster's `GpuCheckpointGrant`s in a reflector
//! store the agent decides with (see [`crate::tenancy`]), keeps this node's pods for the
//! service account of a checkpoint's origin, and posts each restore the agent
//! refused as a Warning Event on the pod that asked (`kubectl describe pod` shows why its
//! container did not start).

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::Api;
use kybernate_api::GpuCheckpointGrant;
use tokio::sync::broadcast::error::RecvError;

use super::NodeWorker;
use crate::node::{RefusedRestore, SubscribeRefusals, UseGrants, UsePods};
use crate::tenancy::Grants;

/// The Event reason of a restore refused across tenants.
pub const RESTORE_REFUSED: &str = "CheckpointRestoreRefused";

impl NodeWorker {
    /// Hands the agent a store of the cluster's grants and keeps it up to date until the
    /// agent stops (watch errors are retried with backoff; until the first list the store
    /// is empty and only same-namespace restores are served).
    pub(super) async fn watch_grants(&self) {
        let (store, writer) = reflector::store::<GpuCheckpointGrant>();
        if self
            .agent
            .send(UseGrants(Grants::watched(store)))
            .await
            .is_err()
        {
            return;
        }
        let grants = Api::<GpuCheckpointGrant>::all(self.client.clone());
        reflector::reflector(writer, watcher(grants, watcher::Config::default()))
            .default_backoff()
            .for_each(|event| async move {
                match event {
                    Ok(watcher::Event::Apply(grant) | watcher::Event::InitApply(grant)) => {
                        tracing::info!(grant = grant.metadata.name.as_deref().unwrap_or("?"),
                            spec = ?grant.spec, "GpuCheckpointGrant in force");
                    }
                    Ok(watcher::Event::Delete(grant)) => {
                        tracing::info!(
                            grant = grant.metadata.name.as_deref().unwrap_or("?"),
                            "GpuCheckpointGrant withdrawn"
                        );
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "watching GpuCheckpointGrants; retrying");
                    }
                }
            })
            .await;
    }

    /// Hands the agent a store of this node's pods (field selector `spec.nodeName`), where it
    /// finds the service account of a container checkpoint's pod, and keeps it up to date
    /// until the agent stops.
    pub(super) async fn watch_pods(&self) {
        let (store, writer) = reflector::store::<Pod>();
        if self.agent.send(UsePods(store)).await.is_err() {
            return;
        }
        let pods = Api::<Pod>::all(self.client.clone());
        let on_this_node =
            watcher::Config::default().fields(&format!("spec.nodeName={}", self.node_name));
        reflector::reflector(writer, watcher(pods, on_this_node))
            .default_backoff()
            .for_each(|event| async move {
                if let Err(error) = event {
                    tracing::warn!(%error, "watching this node's pods; retrying");
                }
            })
            .await;
    }

    /// Posts an Event on the pod of every restore the agent refuses, until the agent stops.
    pub(super) async fn report_refusals(&self) {
        let Ok(mut refusals) = self.agent.send(SubscribeRefusals).await else {
            return;
        };
        let recorder = self.recorder();
        loop {
            let RefusedRestore { refused, pod } = match refusals.recv().await {
                Ok(refusal) => refusal,
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(
                        missed,
                        "refused restores were not posted as Events (see the log)"
                    );
                    continue;
                }
                Err(RecvError::Closed) => return,
            };
            let target = ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                namespace: Some(pod.namespace.clone()),
                name: Some(pod.pod_name.clone()),
                uid: Some(pod.pod_uid.clone()),
                ..ObjectReference::default()
            };
            let event = Event {
                type_: EventType::Warning,
                reason: RESTORE_REFUSED.into(),
                note: Some(refused.to_string()),
                action: "Restore".into(),
                secondary: None,
            };
            if let Err(error) = recorder.publish(&event, &target).await {
                tracing::warn!(%error, pod = %pod.pod_name, namespace = %pod.namespace,
                    "cannot publish the CheckpointRestoreRefused event");
            }
        }
    }

    /// An Event recorder reporting as this node's agent.
    pub(super) fn recorder(&self) -> Recorder {
        let reporter = Reporter {
            controller: "kybernate-agent".into(),
            instance: Some(self.node_name.clone()),
        };
        Recorder::new(self.client.clone(), reporter)
    }
}
