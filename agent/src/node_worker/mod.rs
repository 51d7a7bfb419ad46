//! The agent as a Kubernetes node worker: it labels its Node with the GPU fingerprint and
//! runs two `kube::runtime::Controller`s over the `GpuCheckpoint` and `GpuRestore` objects
//! the controller labelled `kybernate.io/node=<node>`. It executes them through the same
//! [`NodeAgent`] messages as the CLI (checkpoint; prefetch to stage a restore) and applies
//! their status as the field manager `kybernate-agent`, owning only its own fields and
//! condition types, so the controller's stay.
//!
//! Level-triggered: each reconcile looks at the object as the watch cache has it now and
//! takes it one step further. A failed step is retried after a per-object exponential
//! backoff (reset by a success); a checkpoint this agent claimed but does not hold (the
//! agent restarted mid-dump) is looked at again every minute. Checkpoints run one at a time
//! on a node (dumps compete for the same memory bandwidth and tiers); restores are staged
//! concurrently. The finalizer `kybernate.io/artifacts` is kept by kube-runtime's
//! finalizer helper: added before a checkpoint is claimed, removed once the stored
//! checkpoint is deleted. A claim (Scheduled → Checkpointing) is guarded by the
//! resourceVersion the decision was made on, so a stale copy never runs twice. It also keeps
//! the cluster's `GpuCheckpointGrant`s for the agent's tenancy check and posts refused
//! restores as Events ([`grants`]).

mod config_events;
mod execute;
mod grants;
mod node_labels;
mod progress;
mod stage;

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client, Resource};
use kybernate_api::apply::{self, AGENT_MANAGER};
use kybernate_api::backoff::ErrorBackoff;
use kybernate_api::{GpuCheckpoint, GpuRestore, NODE_LABEL};
use kybernate_cuda::GpuFingerprint;

use crate::error::AgentError;
use crate::node::NodeAgent;

pub use grants::RESTORE_REFUSED;
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
    /// The node agent refused a step that must succeed before the object moves on.
    #[error("{action} for {object}: {source}")]
    Agent {
        /// What we asked.
        action: &'static str,
        /// Which object.
        object: String,
        /// The agent's answer.
        #[source]
        source: AgentError,
    },
    /// The finalizer helper refused the object (it has no name).
    #[error("finalizer of {object}: {reason}")]
    Finalizer {
        /// Which object.
        object: String,
        /// What went wrong.
        reason: String,
    },
}

/// One node's worker.
#[derive(Clone)]
pub struct NodeWorker {
    client: Client,
    node_name: String,
    agent: Addr<NodeAgent>,
    gpus: Option<GpuFingerprint>,
    backoff: Arc<ErrorBackoff>,
}

impl std::fmt::Debug for NodeWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeWorker")
            .field("node_name", &self.node_name)
            .field("gpus", &self.gpus)
            .finish()
    }
}

/// How long before a claimed checkpoint the agent does not hold is looked at again.
const IN_FLIGHT_POLL: Duration = Duration::from_secs(60);

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
            backoff: Arc::new(ErrorBackoff::default()),
        }
    }

    /// Labels the node, then executes checkpoints and stages restores until the watches
    /// end (they do not on their own: watch errors are retried with backoff).
    pub async fn run(self) {
        if let Err(error) = self.label_node().await {
            tracing::error!(%error, node = %self.node_name, "cannot label the node with its GPU fingerprint");
        }
        let worker = Arc::new(self);
        let selector =
            watcher::Config::default().labels(&format!("{NODE_LABEL}={}", worker.node_name));
        tracing::info!(node = %worker.node_name, "reconciling GpuCheckpoints and GpuRestores for this node");
        let checkpoints = Controller::new(
            Api::<GpuCheckpoint>::all(worker.client.clone()),
            selector.clone(),
        )
        .with_config(controller::Config::default().concurrency(1))
        .run(
            |cp, worker| tracked(cp, worker, execute::reconcile),
            error_policy,
            worker.clone(),
        )
        .for_each(|_| async {});
        let restores = Controller::new(Api::<GpuRestore>::all(worker.client.clone()), selector)
            .run(
                |restore, worker| tracked(restore, worker, stage::reconcile),
                error_policy,
                worker.clone(),
            )
            .for_each(|_| async {});
        futures::join!(
            checkpoints,
            restores,
            worker.report_config_rejections(),
            worker.watch_grants(),
            worker.watch_pods(),
            worker.report_refusals()
        );
    }

    /// Applies the node's labels as `kybernate-agent`: a label it applied before and
    /// leaves out now (the GPU model on a node that lost its GPUs) is removed.
    async fn label_node(&self) -> Result<(), WorkerError> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let labels: std::collections::BTreeMap<String, String> = node_labels(self.gpus.as_ref())
            .into_iter()
            .filter_map(|(key, value)| Some((key, value?)))
            .collect();
        let metadata = ObjectMeta {
            name: Some(self.node_name.clone()),
            labels: Some(labels.clone()),
            ..ObjectMeta::default()
        };
        nodes
            .patch(
                &self.node_name,
                &apply::params(AGENT_MANAGER),
                &apply::metadata::<Node>(metadata),
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

/// Runs `reconcile` and, when it succeeds, forgets the object's earlier failures.
async fn tracked<K, F, Fut>(
    obj: Arc<K>,
    worker: Arc<NodeWorker>,
    reconcile: F,
) -> Result<Action, WorkerError>
where
    K: Resource<DynamicType = ()>,
    F: FnOnce(Arc<K>, Arc<NodeWorker>) -> Fut,
    Fut: std::future::Future<Output = Result<Action, WorkerError>>,
{
    let key = ErrorBackoff::key(&*obj);
    let result = reconcile(obj, worker.clone()).await;
    if result.is_ok() {
        worker.backoff.succeeded(&key);
    }
    result
}

/// Retries a failed object after its per-object exponential backoff.
fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    error: &WorkerError,
    worker: Arc<NodeWorker>,
) -> Action {
    let delay = worker.backoff.failed(&ErrorBackoff::key(&*obj));
    tracing::warn!(%error, kind = %K::kind(&()), name = obj.meta().name.as_deref().unwrap_or("?"),
        retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Unwraps the finalizer helper's error for `object`.
fn finalizer_err(
    object: String,
) -> impl FnOnce(kube::runtime::finalizer::Error<WorkerError>) -> WorkerError {
    use kube::runtime::finalizer::Error as F;
    move |error| match error {
        F::ApplyFailed(e) | F::CleanupFailed(e) => e,
        F::AddFinalizer(source) => WorkerError::Kube {
            action: "add the artifacts finalizer to",
            object,
            source,
        },
        F::RemoveFinalizer(source) => WorkerError::Kube {
            action: "remove the artifacts finalizer from",
            object,
            source,
        },
        other => WorkerError::Finalizer {
            object,
            reason: other.to_string(),
        },
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
