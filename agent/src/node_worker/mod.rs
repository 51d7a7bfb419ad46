//! The agent as a Kubernetes node worker: it labels its Node with the GPU fingerprint,
//! watches the `GpuCheckpoint` and `GpuRestore` objects the controller labelled
//! `kybernate.io/node=<node>`, executes them through the same [`NodeAgent`] messages as the
//! CLI (checkpoint; prefetch to stage a restore) and writes their status.
//!
//! Level-triggered and idempotent: an object is claimed by a status write guarded by the
//! resourceVersion it was delivered with, so a re-delivered (stale) object gets a conflict
//! and never runs twice; an object whose checkpoint already exists in the catalog is only
//! reported.

mod config_events;
mod execute;
mod node_labels;
mod progress;
mod stage;

use actix::Addr;
use futures::StreamExt;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use kybernate_controller::crd::{GpuCheckpoint, GpuRestore, NODE_LABEL};
use kybernate_cuda::GpuFingerprint;

use crate::node::NodeAgent;

pub use node_labels::node_labels;
pub use progress::DRAINING_CONDITION;

/// The node worker could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A Kubernetes API call failed.
    #[error("{action} {object}: {source}")]
    Kube {
        /// What we tried.
        action: &'static str,
        /// Which object (`namespace/name` or the node).
        object: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The node agent actor is gone (the agent is shutting down).
    #[error("node agent unavailable: {0}")]
    Mailbox(#[from] actix::MailboxError),
}

/// One node's worker.
#[derive(Clone)]
pub struct NodeWorker {
    client: Client,
    node_name: String,
    agent: Addr<NodeAgent>,
    gpus: Option<GpuFingerprint>,
}

impl std::fmt::Debug for NodeWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeWorker")
            .field("node_name", &self.node_name)
            .field("gpus", &self.gpus)
            .finish()
    }
}

impl NodeWorker {
    /// A worker for `node_name` talking to the API through `client`; it stages restores into
    /// the agent's `policy.restore_prefetch_tier` as configured at the time.
    pub fn new(
        client: Client,
        node_name: String,
        agent: Addr<NodeAgent>,
        gpus: Option<GpuFingerprint>,
    ) -> Self {
        Self {
            client,
            node_name,
            agent,
            gpus,
        }
    }

    /// Labels the node, then executes checkpoints and stages restores until the watches
    /// end (they do not on their own: errors are retried with backoff).
    pub async fn run(self) {
        if let Err(error) = self.label_node().await {
            tracing::error!(%error, node = %self.node_name, "cannot label the node with its GPU fingerprint");
        }
        // Separate loops: a long checkpoint does not hold up staging a restore.
        futures::join!(
            self.watch_checkpoints(),
            self.watch_restores(),
            self.report_config_rejections()
        );
    }

    fn selector(&self) -> watcher::Config {
        watcher::Config::default().labels(&format!("{NODE_LABEL}={}", self.node_name))
    }

    async fn watch_checkpoints(&self) {
        let api: Api<GpuCheckpoint> = Api::all(self.client.clone());
        let mut objects = watcher(api, self.selector())
            .default_backoff()
            .applied_objects()
            .boxed();
        tracing::info!(node = %self.node_name, "watching GpuCheckpoints for this node");
        while let Some(item) = objects.next().await {
            match item {
                Ok(cp) => {
                    if let Err(error) = self.reconcile(cp).await {
                        tracing::warn!(%error, "GpuCheckpoint not handled; retried on its next change");
                    }
                }
                Err(error) => tracing::warn!(%error, "watch of GpuCheckpoints interrupted"),
            }
        }
    }

    async fn watch_restores(&self) {
        let api: Api<GpuRestore> = Api::all(self.client.clone());
        let mut objects = watcher(api, self.selector())
            .default_backoff()
            .applied_objects()
            .boxed();
        tracing::info!(node = %self.node_name, "watching GpuRestores for this node");
        while let Some(item) = objects.next().await {
            match item {
                Ok(restore) => {
                    if let Err(error) = self.stage(restore).await {
                        tracing::warn!(%error, "GpuRestore not staged; retried on its next change");
                    }
                }
                Err(error) => tracing::warn!(%error, "watch of GpuRestores interrupted"),
            }
        }
    }

    async fn label_node(&self) -> Result<(), WorkerError> {
        use kube::api::{Patch, PatchParams};
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(self.client.clone());
        let labels = node_labels(self.gpus.as_ref());
        let patch = serde_json::json!({"metadata": {"labels": labels}});
        nodes
            .patch(
                &self.node_name,
                &PatchParams::default(),
                &Patch::Merge(patch),
            )
            .await
            .map_err(|source| WorkerError::Kube {
                action: "label",
                object: format!("node {}", self.node_name),
                source,
            })?;
        tracing::info!(node = %self.node_name, ?labels, "labelled the node");
        Ok(())
    }
}

/// Starts the worker for `node_name` on the current actix system, with the cluster
/// credentials kube finds (in-cluster service account, else KUBECONFIG).
pub fn spawn(node_name: String, agent: Addr<NodeAgent>, gpus: Option<GpuFingerprint>) {
    actix_rt::spawn(async move {
        match Client::try_default().await {
            Ok(client) => NodeWorker::new(client, node_name, agent, gpus).run().await,
            Err(error) => tracing::error!(
                %error,
                "no Kubernetes credentials; the node worker does not run (the local socket still serves)"
            ),
        }
    });
}
