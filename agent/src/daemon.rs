//! Starting the agent: tiers, actors, the gRPC socket and the metrics endpoint.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use actix::prelude::*;
use kybernate_dataplane::{
    DataPlane, LocalDirTier, NvmeTier, S3Tier, Sealing, TierError, TierKind,
};
use kybernate_proto::agent::v1::agent_server::AgentServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::bandwidth::Bandwidth;
use crate::catalog::{Catalog, CatalogError, RecordSealing};
use crate::command::TokioCommandRunner;
use crate::config::AgentConfig;
use crate::criu::{self, CriuRunner};
use crate::cuda::CudaActor;
use crate::events::EVENT_BUFFER;
use crate::grpc::{authorise, AgentService};
use crate::journal::{Journal, JournalError};
use crate::metrics::{self, Metrics};
use crate::node::NodeAgent;
use crate::node_parts::NodeParts;
use crate::recovery::{self, RecoveryError, RecoveryInputs};
use crate::reload::{self, ConfigSource, LoadedConfig};
use crate::tiers::{TierActor, Tiers};

/// Threads serving each tier.
const TIER_THREADS: usize = 2;

/// The agent could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A tier could not be opened.
    #[error("cannot open tier: {0}")]
    Tier(#[from] TierError),
    /// The encryption keys could not be read.
    #[error("encryption at rest: {0}")]
    Keys(#[from] kybernate_dataplane::KeyError),
    /// libcuda.so.1 exists but cannot be used.
    #[error("{0}")]
    Cuda(#[from] kybernate_cuda::CudaError),
    /// Connecting to S3 panicked.
    #[error("connecting to the S3 tier failed unexpectedly")]
    S3Connect,
    /// The catalog could not be opened.
    #[error("cannot open checkpoint records: {0}")]
    Catalog(#[from] CatalogError),
    /// The socket could not be set up.
    #[error("agent socket {}: {message}", path.display())]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The metrics endpoint could not be served.
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
    /// The config file's directory could not be watched.
    #[error("cannot watch the config file for changes: {0}")]
    Watch(#[source] std::io::Error),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// In a container, a directory the agent shares with the host is not a host mount.
    #[error(transparent)]
    HostMount(#[from] crate::host_mounts::HostMountError),
    /// A configured tier directory does not exist.
    #[error("tier directory {key} = {} does not exist; create it (and mount the tier there) first", path.display())]
    TierPath {
        /// The config key.
        key: &'static str,
        /// The configured path.
        path: PathBuf,
    },
    /// A directory for checkpoint data is not private to root.
    #[error(transparent)]
    PrivateDir(#[from] crate::private_dirs::PrivateDirError),
    /// The journal could not be opened.
    #[error("cannot open the journal: {0}")]
    Journal(#[from] JournalError),
    /// Start-up recovery failed.
    #[error(transparent)]
    Recovery(#[from] RecoveryError),
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(config: AgentConfig) -> Result<(), DaemonError> {
    run_on_node(config, None)
}

/// Runs the agent; with `node_name` also as that Kubernetes node's worker
/// ([`crate::node_worker`]).
pub fn run_on_node(config: AgentConfig, node_name: Option<String>) -> Result<(), DaemonError> {
    actix_rt::System::new().block_on(serve(Arc::new(config), node_name, None))
}

/// Runs the agent on the config `loaded` from `source`, reloading it live whenever the
/// config file changes ([`crate::reload`]); with `node_name` also as that node's worker.
pub fn run_watched(
    source: ConfigSource,
    loaded: LoadedConfig,
    node_name: Option<String>,
) -> Result<(), DaemonError> {
    let config = loaded.config.clone();
    actix_rt::System::new().block_on(serve(config, node_name, Some((source, loaded))))
}

async fn serve(
    config: Arc<AgentConfig>,
    node_name: Option<String>,
    source: Option<(ConfigSource, LoadedConfig)>,
) -> Result<(), DaemonError> {
    let proc_root = Path::new("/proc");
    if let Some(host) = crate::host_mounts::host_process(proc_root) {
        crate::host_mounts::check(
            &proc_root.join(host.to_string()).join("root"),
            &crate::host_mounts::required(&config),
        )?;
        tracing::info!(
            "in a container with the host's PIDs: state, tiers and socket are host mounts"
        );
    }
    // Everything that can fail at start-up runs before the first actor or thread starts, so
    // a failure is reported as itself and nothing is left to tear down.
    let metrics_listener = tokio::net::TcpListener::bind(config.metrics_addr)
        .await
        .map_err(|source| DaemonError::Metrics {
            addr: config.metrics_addr,
            source,
        })?;
    let metrics_addr = metrics_listener.local_addr().unwrap_or(config.metrics_addr);
    // Clients that connect now wait until recovery is done and the agent serves.
    let listener = bind_socket(&config.socket, &config.allowed_uids)?;
    for (key, path) in [
        ("tiers.ram_path", &config.tiers.ram_path),
        ("tiers.nvme_path", &config.tiers.nvme_path),
    ] {
        if let Some(path) = path.as_ref().filter(|p| !p.is_dir()) {
            return Err(DaemonError::TierPath {
                key,
                path: path.clone(),
            });
        }
    }
    for (role, path) in [
        ("state directory", config.state_dir.clone()),
        ("RAM tier", config.ram_tier_path()),
        ("NVMe tier", config.nvme_tier_path()),
    ] {
        crate::private_dirs::prepare(role, &path)?;
    }
    let availability = match criu::probe(&config.criu_path) {
        Ok(version) => {
            tracing::info!(%version, "found CRIU");
            Ok(())
        }
        Err(problem) => {
            tracing::error!(%problem, "CRIU is not usable; checkpoints fail until it is installed");
            Err(problem)
        }
    };

    let cuda = kybernate_cuda::CudaSession::load()?;
    let gpus = cuda.fingerprint();
    let gpu_uuids: Vec<String> = gpus
        .iter()
        .flat_map(|g| g.devices.iter().map(|d| d.uuid.to_string()))
        .collect();
    match cuda.fingerprint() {
        Some(gpus) => tracing::info!(
            driver = gpus.driver_version,
            gpus = gpus.devices.len(),
            "CUDA driver loaded"
        ),
        None => tracing::info!("no CUDA driver or GPU on this node: CPU-only workloads"),
    }

    let ram = Arc::new(LocalDirTier::open(TierKind::Ram, config.ram_tier_path())?);
    let chunks = config.dataplane.chunk_config();
    let plane = DataPlane::start(config.dataplane.io, &chunks)?;
    tracing::info!(
        workers = plane.workers(),
        pinned_pool_bytes = plane.pinned_pool_bytes(),
        io = %plane.io_backend(),
        "data plane ready"
    );
    let ring = match &config.encryption {
        Some(encryption) => Some((encryption, encryption.load_ring()?)),
        None => None,
    };
    let sealing = |tier| -> Result<Sealing, DaemonError> {
        Ok(match &ring {
            Some((encryption, ring)) => encryption.sealing_for(ring, tier),
            None => Sealing::plain(),
        })
    };
    let nvme = Arc::new(NvmeTier::open_sealed(
        config.nvme_tier_path(),
        chunks.clone(),
        plane,
        sealing(TierKind::Nvme)?,
    )?);
    let s3 = match &config.s3 {
        Some(s3) => {
            // The S3 tier runs its own runtime, which must not be created inside this one.
            let (settings, chunks) = (s3.clone(), chunks.clone());
            let sealing = sealing(TierKind::S3)?;
            let tier =
                std::thread::spawn(move || S3Tier::connect_sealed(settings, chunks, sealing))
                    .join()
                    .map_err(|_| DaemonError::S3Connect)??;
            tracing::info!(endpoint = %s3.endpoint, bucket = %s3.bucket, prefix = %s3.prefix, "S3 tier ready");
            let tier = Arc::new(tier);
            if let Err(e) = S3Tier::spawn_sweeper(&tier) {
                tracing::warn!(error = %e, "no S3 garbage collection sweeps: only removals collect");
            }
            Some(tier)
        }
        None => None,
    };
    let record_sealing = ring.as_ref().map(|(encryption, ring)| RecordSealing {
        ring: Arc::clone(ring),
        accept_plain: encryption.accept_unencrypted,
    });
    let (mut catalog, problems) = Catalog::open(&config.records_dir(), record_sealing)?;
    for problem in problems {
        tracing::error!(%problem, "skipping an unreadable checkpoint record");
    }
    let journal = Arc::new(Journal::open(&config.state_dir.join("journal"))?);
    let started = std::time::Instant::now();
    let recovery = recovery::recover(RecoveryInputs {
        ram: &ram,
        catalog: &mut catalog,
        journal: &journal,
        chunks: &chunks,
        dump_timeout: crate::config::TimeoutsConfig::of(config.timeouts.dump_ms),
        logs_dir: &config.logs_dir(),
        cuda: &cuda,
    })?;
    tracing::info!(
        checkpoints = catalog.all().count(),
        adopted = recovery.adopted.len(),
        discarded = recovery.discarded.len(),
        kept = recovery.leftovers.len(),
        restores_cleaned = recovery.killed_restores.len(),
        restores_unlocked = recovery.unlocked_restores.len(),
        restores_interrupted = recovery.interrupted_restores.len(),
        damaged_journal_lines = recovery.damaged_lines,
        millis = started.elapsed().as_millis(),
        ram = %config.ram_tier_path().display(),
        nvme = %config.nvme_tier_path().display(),
        "recovery done; tiers ready"
    );
    let mut actors = vec![
        (TierKind::Ram, TierActor::start(ram.clone(), TIER_THREADS)),
        (TierKind::Nvme, TierActor::start(nvme.clone(), TIER_THREADS)),
    ];
    if let Some(tier) = &s3 {
        actors.push((TierKind::S3, TierActor::start(tier.clone(), TIER_THREADS)));
    }
    let reencrypt_on = Arc::clone(&nvme);
    let tiers = Tiers {
        actors,
        nvme: Some(nvme),
        s3,
    };

    let metrics = Metrics::new();
    for kind in tiers.kinds() {
        // RAM keeps CRIU's files as they are; the slower tiers store compressed chunks.
        metrics.tier_present(kind.as_str(), kind != TierKind::Ram);
    }
    metrics.tier_budget(TierKind::Ram.as_str(), config.ram_budget());
    if let Some(budget) = config.tiers.nvme_budget_bytes {
        metrics.tier_budget(TierKind::Nvme.as_str(), budget);
    }
    let (events, _) = tokio::sync::broadcast::channel(EVENT_BUFFER);
    let parts = NodeParts {
        criu: CriuRunner::new(
            config.criu_path.clone(),
            Arc::new(TokioCommandRunner),
            availability,
        )
        .start(),
        cuda: CudaActor::start(cuda),
        ram,
        tiers,
        config: config.clone(),
        metrics: metrics.clone(),
        events: events.clone(),
        bandwidth: Arc::new(Bandwidth::new(&config.bandwidth, metrics.clone())),
        journal,
        pods: crate::tenancy::PodDirectory::default(),
    };
    let node = NodeAgent::new(parts, catalog)
        .with_recovery(recovery)
        .start();
    if let Some((source, loaded)) = source {
        let text = loaded.text.clone();
        node.do_send(crate::node::ConfigLoaded(loaded));
        reload::watch(source, text, node.clone(), metrics.clone()).map_err(DaemonError::Watch)?;
    }
    if let Some(node_name) = node_name {
        crate::node_worker::spawn(node_name, node.clone(), gpus);
    }

    actix_rt::spawn(async move {
        if let Err(e) = metrics::serve(metrics_listener, metrics).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });

    tracing::info!(socket = %config.socket.display(), metrics = %metrics_addr, "agent serving");
    let allowed = Arc::new(config.allowed_uids.clone());
    let service = AgentServer::with_interceptor(
        AgentService::new(node, events)
            .with_gpu_uuids(gpu_uuids)
            .with_nvme(reencrypt_on),
        move |req| authorise(&allowed, &req).map(|()| req),
    );
    let served = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown_signal())
        .await;
    let _ = std::fs::remove_file(&config.socket);
    tracing::info!("agent stopped");
    served.map_err(DaemonError::from)
}

/// Binds the socket with mode 0600 and an ACL entry for each uid of `allowed_uids`,
/// replacing a stale socket but never a live agent's.
fn bind_socket(path: &Path, allowed_uids: &[u32]) -> Result<UnixListener, DaemonError> {
    let fail = |message: String| DaemonError::Socket {
        path: path.to_owned(),
        message,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| fail(format!("cannot create its directory: {e}")))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(fail("another agent is already serving on it".into()));
        }
        std::fs::remove_file(path)
            .map_err(|e| fail(format!("cannot remove the stale socket: {e}")))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| fail(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| fail(format!("cannot set mode 0600: {e}")))?;
    crate::socket_access::grant(path, allowed_uids).map_err(|e| {
        fail(format!(
            "cannot let allowed_uids {allowed_uids:?} connect (POSIX ACL on the socket and its \
             directory): {e}"
        ))
    })?;
    Ok(listener)
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
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}
