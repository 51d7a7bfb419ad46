//! The Kybernate controller.

use clap::Parser;
use kybernate_controller::run::{run, RunConfig};

/// Kybernate controller: schedules GPU checkpoints and restores in the cluster.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address of /metrics and /healthz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: std::net::SocketAddr,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kybernate-system")]
    lease_namespace: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME", default_value = "kybernate-controller")]
    identity: String,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    // kube's TLS and the workspace's S3 client enable different rustls crypto back-ends; one
    // process-wide provider must be chosen before the client connects.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KYBERNATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let outcome = run(RunConfig {
        metrics_addr: args.metrics_addr,
        lease_namespace: args.lease_namespace,
        identity: args.identity,
    })
    .await;
    // One line: the error already names its cause.
    if let Err(error) = outcome {
        eprintln!("Error: {error}");
        std::process::exit(1);
    }
}
