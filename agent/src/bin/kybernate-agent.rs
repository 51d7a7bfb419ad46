//! The node agent daemon.

use std::path::PathBuf;

use clap::Parser;
use kybernate_agent::reload::ConfigSource;

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
    // Checkpoints hold workload memory: everything the agent and CRIU create is root's alone
    // (directories 0700, files 0600). Set before any thread starts; see private_dirs.
    // SAFETY: umask(2) has no preconditions.
    unsafe { libc::umask(0o077) };
    let args = Args::parse();
    // The S3 client and the Kubernetes client both link rustls, with different crypto
    // back-ends; one process-wide provider must be chosen before either connects.
    let _ = rustls::crypto::ring::default_provider().install_default();
    kybernate_agent::init_logging(args.log_json);
    let source = ConfigSource {
        path: args.config,
        socket: args.socket,
        state_dir: args.state_dir,
        metrics_addr: args.metrics_addr,
    };
    let loaded = source.load()?;
    kybernate_agent::daemon::run_watched(source, loaded, args.node_name)?;
    Ok(())
}
