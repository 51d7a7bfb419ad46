//! Running the controller: leader election, the three reconcile loops, the metrics
//! endpoint, and graceful shutdown on SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client, Resource};

use crate::context::{Context, SystemClock};
use crate::crd::{GpuCheckpoint, GpuRestore, GpuWorkload};
use crate::error::Error;
use crate::lease::LeaderLease;
use crate::metrics::Metrics;

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

/// The controller could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No usable cluster credentials.
    #[error("cannot build a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// The metrics port could not be bound.
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
    /// Leader election failed.
    #[error("leader election: {0}")]
    Lease(#[source] Error),
    /// Another replica took the Lease while we led: stop so the new leader is alone.
    #[error("lost the leader Lease")]
    LostLease,
}

const LEASE_NAME: &str = "kybernate-controller";
const LEASE_SECONDS: i32 = 15;
const RENEW_EVERY: Duration = Duration::from_secs(5);

/// Runs until SIGTERM/SIGINT (graceful: in-flight reconciles finish) or loss of the Lease.
pub async fn run(config: RunConfig) -> Result<(), RunError> {
    let client = Client::try_default().await.map_err(RunError::Client)?;
    let metrics = Arc::new(Metrics::new());
    let listener = tokio::net::TcpListener::bind(config.metrics_addr)
        .await
        .map_err(|source| RunError::Metrics {
            addr: config.metrics_addr,
            source,
        })?;
    let served = metrics.clone();
    tokio::spawn(async move {
        let app = axum::Router::new()
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let m = served.clone();
                    async move { m.encode() }
                }),
            )
            .route("/healthz", axum::routing::get(|| async { "ok" }));
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });

    let lease = LeaderLease::new(
        client.clone(),
        &config.lease_namespace,
        LEASE_NAME,
        &config.identity,
        LEASE_SECONDS,
    );
    let mut shutdown = Box::pin(shutdown_signal());
    loop {
        let leading = lease
            .try_acquire(k8s_openapi::jiff::Timestamp::now())
            .await
            .map_err(RunError::Lease)?;
        if leading {
            break;
        }
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(RENEW_EVERY) => {}
        }
    }
    tracing::info!(identity = %config.identity, "leading; starting reconcilers");
    let ctx = Arc::new(Context::new(client.clone(), Arc::new(SystemClock), metrics));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let cfg = watcher::Config::default();
    let checkpoints = Controller::new(Api::<GpuCheckpoint>::all(client.clone()), cfg.clone())
        .graceful_shutdown_on(stopped())
        .run(crate::checkpoint::reconcile, error_policy, ctx.clone())
        .for_each(|_| async {});
    let restores = Controller::new(Api::<GpuRestore>::all(client.clone()), cfg.clone())
        .owns(Api::<Pod>::all(client.clone()), cfg.clone())
        .graceful_shutdown_on(stopped())
        .run(crate::restore::reconcile, error_policy, ctx.clone())
        .for_each(|_| async {});
    let workloads = Controller::new(Api::<GpuWorkload>::all(client.clone()), cfg.clone())
        .owns(Api::<Pod>::all(client.clone()), cfg.clone())
        .owns(Api::<GpuCheckpoint>::all(client.clone()), cfg)
        .graceful_shutdown_on(stopped())
        .run(crate::workload::reconcile, error_policy, ctx.clone())
        .for_each(|_| async {});
    let renew = async {
        loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep(RENEW_EVERY) => {}
            }
            match lease.try_acquire(k8s_openapi::jiff::Timestamp::now()).await {
                Ok(true) => {}
                Ok(false) => return Err(RunError::LostLease),
                Err(e) => tracing::warn!(error = %e, "cannot renew the Lease; retrying"),
            }
        }
    };
    let loops = futures::future::join3(checkpoints, restores, workloads);
    tokio::pin!(loops);
    let outcome = tokio::select! {
        outcome = renew => outcome,
        _ = &mut loops => Ok(()),
    };
    let _ = stop_tx.send(true);
    loops.await;
    tracing::info!("controller stopped");
    outcome
}

/// Retry with backoff and count the error by kind and reason.
fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    let kind = K::kind(&()).to_string();
    tracing::warn!(%error, kind, name = obj.meta().name.as_deref().unwrap_or("?"), "reconcile failed");
    ctx.metrics.error(&kind, error.metric_label());
    Action::requeue(Duration::from_secs(10))
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
