//! The shim process: `start` (spawn the long-lived shim), `delete` (clean up after a crashed
//! shim) and serving the task service.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::util::write_str_to_file;
use containerd_shim::{api::DeleteResponse, Config, Error, Flags, StartOpts};

use crate::config::ShimConfig;
use crate::grouping::{group_of, serving};
use crate::lifecycle::unmount;
use crate::process::now;
use crate::runc_cli::RuncCli;
use crate::runtime_options::RuncOptions;
use crate::service::{read_spec, TaskService};

/// containerd's runtime type for this shim.
pub const RUNTIME_TYPE: &str = "io.containerd.kybernate.v1";

/// One shim process: it serves every container of one pod (or one group).
pub struct KybernateShim {
    exit: Arc<ExitSignal>,
    id: String,
    namespace: String,
    /// The ttrpc socket this process serves (`-socket`), empty for `start` and `delete`.
    socket: String,
    config: ShimConfig,
}

impl std::fmt::Debug for KybernateShim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KybernateShim")
            .field("id", &self.id)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Shim for KybernateShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        let config = ShimConfig::from_env().unwrap_or_else(|e| {
            log::error!("{e}; using the defaults");
            ShimConfig::default()
        });
        KybernateShim {
            exit: Arc::new(ExitSignal::default()),
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            socket: args.socket.clone(),
            config,
        }
    }

    /// Starts the shim of the container's group (its pod), or joins the one already
    /// running, as runc.v2 does (see [`crate::grouping`]).
    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let bundle = std::env::current_dir().map_err(|e| Error::Other(e.to_string()))?;
        let spec = read_spec(&opts.id, &bundle).map_err(|e| Error::Other(e.to_string()))?;
        let grouping = group_of(&opts.id, &spec);
        let address = containerd_shim::socket_address(&opts.address, &opts.namespace, &grouping);
        if serving(&address) {
            write_str_to_file("address", &address).await?;
            return Ok(address);
        }
        let address = spawn(opts, &grouping, Vec::new()).await?;
        write_str_to_file("address", &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        let bundle = std::env::current_dir().map_err(|e| Error::Other(e.to_string()))?;
        let runc = RuncCli {
            binary: self.config.runc.clone(),
            root: self.config.runc_root.join(&self.namespace),
            ..RuncCli::default()
        }
        .for_container(&RuncOptions::load(&bundle));
        let log = bundle.join("log.json");
        if let Err(e) = runc
            .run(
                &self.id,
                &["delete".into(), "--force".into(), self.id.clone()],
                Default::default(),
                Some(&log),
            )
            .await
        {
            log::warn!("cleanup of {}: {e}", self.id);
        }
        unmount(&bundle.join("rootfs"));
        let _ = std::fs::remove_dir_all(Path::new(&bundle).join("criu-work"));
        Ok(DeleteResponse {
            pid: 0,
            exit_status: 137,
            exited_at: MessageField::some(now()),
            ..Default::default()
        })
    }

    /// Returns once the last container is gone. The socket is removed here: the library
    /// removes the one named in the bundle it started in, and with one shim per pod that
    /// bundle (the first container's) is usually deleted by now.
    async fn wait(&mut self) {
        self.exit.wait().await;
        let path = self.socket.strip_prefix("unix://").unwrap_or(&self.socket);
        if !path.is_empty() {
            let _ = std::fs::remove_file(path);
        }
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        TaskService::new(
            &self.namespace,
            self.config.clone(),
            publisher,
            self.exit.clone(),
        )
        .await
    }
}
