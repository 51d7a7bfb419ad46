//! Running the controller: leader election with a write fence, the three reconcile loops
//! (started when this replica takes the Lease, stopped the moment a renewal fails, started
//! again once it holds the Lease anew), the metrics endpoint, and graceful shutdown on
//! SIGTERM.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::client::ClientBuilder;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client, Resource};
use tokio::sync::watch;
use tower::filter::FilterLayer;

use crate::context::{Context, SystemClock};
use crate::error::Error;
use crate::fence::WriteFence;
use crate::lease::LeaderLease;
use crate::metrics::Metrics;
use kybernate_api::apply::CONTROLLER_MANAGER;
use kybernate_api::backoff::ErrorBackoff;
use kybernate_api::{GpuCheckpoint, GpuRestore, GpuWorkload, MANAGED_BY_LABEL, WORKLOAD_LABEL};

/// How the controller runs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Where `/metrics` and `/healthz` are served.
    pub metrics_addr: SocketAddr,
    /// Namespace of the leader Lease.
    pub lease_namespace: String,
    /// This replica's identity (pod name).
    pub identity: String,
}

/// The controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No cluster configuration (in-cluster service account or KUBECONFIG) was found.
    #[error("cannot find Kubernetes credentials: {0}")]
    Config(#[source] kube::config::InferConfigError),
    /// The credentials did not make a client.
    #[error("cannot build a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// The first leader election could not reach the API server: nothing would ever work,
    /// so the controller exits (its Pod restarts with backoff) instead of waiting silently.
    #[error("leader election: {0}")]
    LeaderElection(String),
    /// The metrics port could not be bound.
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
}

const LEASE_NAME: &str = "kybernate-controller";
const LEASE_SECONDS: i32 = 15;
/// Renewals are this far apart and each may take this long, so a replica that cannot renew
/// fences its writes within 10 s, before its 15 s Lease can pass to another replica.
const RENEW_EVERY: Duration = Duration::from_secs(5);

type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Why a term as leader ended.
enum Term {
    /// SIGTERM/SIGINT, or the loops ended on their own.
    ShutDown,
    /// A renewal failed: the reconcilers were stopped.
    LostLease,
}

/// Runs until SIGTERM/SIGINT (graceful: in-flight reconciles finish). Losing the Lease
/// stops the reconcilers and waits to lead again; it does not end the process.
pub async fn run(config: RunConfig) -> Result<(), RunError> {
    let kube_config = kube::Config::infer().await.map_err(RunError::Config)?;
    let lease_client = Client::try_from(kube_config.clone()).map_err(RunError::Client)?;
    let fence = WriteFence::default();
    let client = ClientBuilder::try_from(kube_config)
        .map_err(RunError::Client)?
        .with_layer(&FilterLayer::new(fence.clone()))
        .build();
    let metrics = Arc::new(Metrics::new());
    serve_metrics(config.metrics_addr, metrics.clone()).await?;
    let lease = LeaderLease::new(
        lease_client,
        &config.lease_namespace,
        LEASE_NAME,
        &config.identity,
        LEASE_SECONDS,
    );
    let ctx = Arc::new(Context::new(client, Arc::new(SystemClock), metrics));
    let mut shutdown: Shutdown = Box::pin(shutdown_signal());
    // Once the API server has answered, a failed renewal is transient: fence, stop, retry.
    // If it never answers, say so and exit.
    match tokio::time::timeout(RENEW_EVERY, lease.try_acquire(Timestamp::now())).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(RunError::LeaderElection(e.to_string())),
        Err(_) => {
            return Err(RunError::LeaderElection(format!(
                "the API server did not answer within {RENEW_EVERY:?}"
            )))
        }
    }
    loop {
        while !lease.renew(&fence, Timestamp::now(), RENEW_EVERY).await {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep(RENEW_EVERY) => {}
            }
        }
        tracing::info!(identity = %config.identity, "leading; starting reconcilers");
        match lead(ctx.clone(), &lease, &fence, &mut shutdown).await {
            Term::ShutDown => {
                tracing::info!("controller stopped");
                return Ok(());
            }
            Term::LostLease => tracing::warn!(
                identity = %config.identity,
                "Lease not renewed: reconcilers stopped, writes fenced; waiting to lead again"
            ),
        }
    }
}

/// Runs the reconcilers while each renewal succeeds.
async fn lead(
    ctx: Arc<Context>,
    lease: &LeaderLease,
    fence: &WriteFence,
    shutdown: &mut Shutdown,
) -> Term {
    let (stop_tx, stop_rx) = watch::channel(false);
    let loops = reconcilers(ctx, stop_rx);
    tokio::pin!(loops);
    let term = loop {
        tokio::select! {
            _ = &mut *shutdown => break Term::ShutDown,
            _ = &mut loops => return Term::ShutDown,
            _ = tokio::time::sleep(RENEW_EVERY) => {
                if !lease.renew(fence, Timestamp::now(), RENEW_EVERY).await {
                    break Term::LostLease;
                }
            }
        }
    };
    let _ = stop_tx.send(true);
    loops.await;
    term
}

/// The three reconcile loops, until `stop` turns true (in-flight reconciles finish).
fn reconcilers(ctx: Arc<Context>, stop: watch::Receiver<bool>) -> impl Future<Output = ()> {
    let client = ctx.client.clone();
    let stopped = move || {
        let mut rx = stop.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let every = watcher::Config::default();
    let our_pods = managed_pods();
    let workload_checkpoints = watcher::Config::default().labels(WORKLOAD_LABEL);
    let checkpoints = Controller::new(Api::<GpuCheckpoint>::all(client.clone()), every.clone())
        .graceful_shutdown_on(stopped())
        .run(
            |obj, ctx| tracked(obj, ctx, crate::checkpoint::reconcile),
            error_policy,
            ctx.clone(),
        )
        .for_each(|_| async {});
    let restores = Controller::new(Api::<GpuRestore>::all(client.clone()), every.clone())
        .owns(Api::<Pod>::all(client.clone()), our_pods.clone())
        .graceful_shutdown_on(stopped())
        .run(
            |obj, ctx| tracked(obj, ctx, crate::restore::reconcile),
            error_policy,
            ctx.clone(),
        )
        .for_each(|_| async {});
    let workloads = Controller::new(Api::<GpuWorkload>::all(client.clone()), every)
        .owns(Api::<Pod>::all(client.clone()), our_pods)
        .owns(Api::<GpuCheckpoint>::all(client), workload_checkpoints)
        .graceful_shutdown_on(stopped())
        .run(
            |obj, ctx| tracked(obj, ctx, crate::workload::reconcile),
            error_policy,
            ctx,
        )
        .for_each(|_| async {});
    async move {
        futures::future::join3(checkpoints, restores, workloads).await;
    }
}

/// The pod watch: only the pods this controller created (it labels them), not every pod in
/// the cluster.
pub fn managed_pods() -> watcher::Config {
    watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={CONTROLLER_MANAGER}"))
}

/// Runs `reconcile` and, when it succeeds, forgets the object's earlier failures.
async fn tracked<K, F, Fut>(obj: Arc<K>, ctx: Arc<Context>, reconcile: F) -> Result<Action, Error>
where
    K: Resource<DynamicType = ()>,
    F: FnOnce(Arc<K>, Arc<Context>) -> Fut,
    Fut: Future<Output = Result<Action, Error>>,
{
    let key = ErrorBackoff::key(&*obj);
    let result = reconcile(obj, ctx.clone()).await;
    if result.is_ok() {
        ctx.backoff.succeeded(&key);
    }
    result
}

/// Retries a failed object after a per-object exponential backoff (5 s doubling to
/// 5 min, reset by a success) and counts the error by kind and reason. A checkpoint kept
/// for a user is not a failure: it is looked at again every 30 s.
pub fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    if let Error::StillReferenced { .. } = error {
        tracing::info!(%error, "deletion waits");
        return Action::requeue(crate::checkpoint::POLL);
    }
    let kind = K::kind(&()).to_string();
    let delay = ctx.backoff.failed(&ErrorBackoff::key(&*obj));
    tracing::warn!(%error, kind, name = obj.meta().name.as_deref().unwrap_or("?"),
        retry_in = ?delay, "reconcile failed");
    ctx.metrics.error(&kind, error.metric_label());
    Action::requeue(delay)
}

/// Serves `/metrics` and `/healthz` on `addr` in the background.
async fn serve_metrics(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<(), RunError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Metrics { addr, source })?;
    tokio::spawn(async move {
        let app = axum::Router::new()
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let m = metrics.clone();
                    async move { m.encode() }
                }),
            )
            .route("/healthz", axum::routing::get(|| async { "ok" }));
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing in-flight reconciles"),
        _ = int.recv() => tracing::info!("SIGINT: finishing in-flight reconciles"),
    }
}
