//! The node agent daemon.

use std::path::PathBuf;

use clap::Parser;
use kybernate_agent::config::AgentConfig;

/// Kybernate node agent: checkpoints and restores GPU workloads on this node.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML config file; built-in defaults apply without one.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Unix socket of the API (overrides the config).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// State directory (overrides the config).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Metrics address, e.g. 127.0.0.1:9464 (overrides the config).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
    /// Kubernetes node name: also work as this node's worker for GpuCheckpoint objects,
    /// with in-cluster credentials (else KUBECONFIG).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The S3 client and the Kubernetes client both link rustls, with different crypto
    // back-ends; one process-wide provider must be chosen before either connects.
    let _ = rustls::crypto::ring::default_provider().install_default();
    kybernate_agent::init_logging(args.log_json);
    let mut config = match &args.config {
        Some(path) => AgentConfig::from_file(path)?,
        None => AgentConfig::default(),
    };
    if let Some(socket) = args.socket {
        config.socket = socket;
    }
    if let Some(dir) = args.state_dir {
        config.state_dir = dir;
    }
    if let Some(addr) = args.metrics_addr {
        config.metrics_addr = addr;
    }
    config.validate()?;
    kybernate_agent::daemon::run_on_node(config, args.node_name)?;
    Ok(())
}
