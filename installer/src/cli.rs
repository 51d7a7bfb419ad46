//! The command line: flags, the install / uninstall / dry-run flow and its log lines.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::files::HostRoot;
use crate::flavour::Flavour;
use crate::install::plan_install;
use crate::plan::{InstallOptions, Plan};
use crate::probe::CriStatusProbe;
use crate::restart::{
    restart_and_wait, restart_for, socket_path, ContainerdProbe, HostCommand, NsenterCommand,
    ProbeOutcome, WaitPolicy,
};
use crate::runtime_spec::SHIM_BINARY;
use crate::uninstall::plan_uninstall;
use crate::{InstallerError, Result};

/// Installs the Kybernate containerd shim on this node and registers the `kybernate`
/// runtime in containerd's config, then restarts containerd.
#[derive(Debug, Parser)]
#[command(name = "kybernate-installer", version)]
pub struct Args {
    /// Where the host filesystem is mounted; every host path is resolved under it.
    #[arg(long, default_value = "/host")]
    pub host_root: PathBuf,
    /// Patch the config and install the shim only; do not restart containerd.
    #[arg(long)]
    pub no_restart: bool,
    /// Remove the runtime entry (or drop-in) and the shim, restore the config.
    #[arg(long)]
    pub uninstall: bool,
    /// Print the diff that would be applied and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Replace (or on uninstall remove) a `kybernate` runtime the installer did not write.
    #[arg(long)]
    pub force: bool,
    /// Skip detection: vanilla, microk8s, k3s or rke2.
    #[arg(long, value_parser = parse_flavour)]
    pub flavour: Option<Flavour>,
    /// Host path of containerd's config (k3s/RKE2: the generated config.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The shim binary to install [default: containerd-shim-kybernate-v1 beside this binary].
    #[arg(long)]
    pub shim_source: Option<PathBuf>,
    /// Host directory the shim is installed into; it must be on containerd's PATH.
    #[arg(long, default_value = "/usr/local/bin")]
    pub shim_dir: PathBuf,
    /// How long to wait for containerd to come back after the restart.
    #[arg(long, default_value_t = 60)]
    pub wait_seconds: u32,
}

fn parse_flavour(name: &str) -> std::result::Result<Flavour, String> {
    Flavour::from_name(name)
        .ok_or_else(|| format!("unknown flavour {name:?}; use vanilla, microk8s, k3s or rke2"))
}

fn log(line: &str) {
    let _ = writeln!(std::io::stderr(), "kybernate-installer: {line}");
}

/// Runs the installer with parsed flags; the error is the one line the binary prints.
pub fn run(args: &Args) -> Result<()> {
    run_with(
        args,
        &NsenterCommand::for_host(&HostRoot::new(&args.host_root)),
    )
}

/// [`run`] with the host's init system behind `host_command` (tests pass a fake one).
pub fn run_with(args: &Args, host_command: &dyn HostCommand) -> Result<()> {
    let host = HostRoot::new(&args.host_root);
    if !host.dir().is_dir() {
        return Err(InstallerError::HostPathMissing {
            path: host.dir().to_path_buf(),
        });
    }
    let shim_source = match &args.shim_source {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join(SHIM_BINARY)))
            .unwrap_or_else(|| PathBuf::from(SHIM_BINARY)),
    };
    let opts = InstallOptions {
        host: host.clone(),
        flavour: args.flavour,
        config: args.config.clone(),
        shim_source,
        shim_dir: args.shim_dir.clone(),
        force: args.force,
    };
    let plan = if args.uninstall {
        plan_uninstall(&opts)?
    } else {
        plan_install(&opts)?
    };
    if args.dry_run {
        plan.notes.iter().for_each(|n| log(n));
        print!("{}", plan.diff());
        return Ok(());
    }
    plan.apply()?;
    plan.notes.iter().for_each(|n| log(n));
    log(&plan.shim.describe());
    report_files(&plan);
    if args.no_restart {
        if plan.config_changed() {
            log("--no-restart: containerd keeps its old config until it is restarted");
        }
        return Ok(());
    }
    let socket = socket_path(&plan.target, &host);
    let probe = CriStatusProbe::new(&socket);
    let settled = ProbeOutcome::Answering {
        runtime_listed: !args.uninstall,
    };
    // An unchanged config still needs a restart when the running containerd has not loaded
    // it yet (an earlier --no-restart run, or a restart that failed).
    if !plan.config_changed() && probe.probe() == settled {
        log("containerd config unchanged and loaded; no restart needed");
        return Ok(());
    }
    let restart = restart_for(plan.target.flavour, &host);
    log(&format!(
        "restarting containerd ({restart:?}) and waiting for {}",
        socket.display()
    ));
    let policy = WaitPolicy {
        attempts: args.wait_seconds.max(1),
        interval: Duration::from_secs(1),
    };
    let probes = restart_and_wait(
        restart.as_ref(),
        host_command,
        &probe,
        &socket,
        !args.uninstall,
        policy,
    )?;
    log(&format!("containerd is back after {probes} checks"));
    Ok(())
}

fn report_files(plan: &Plan) {
    for file in plan.files.iter().filter(|f| f.before != f.after) {
        let verb = match (&file.before, &file.after) {
            (None, Some(_)) => "created",
            (Some(_), None) => "removed",
            _ => "updated",
        };
        log(&format!("{verb} {}", file.path.display()));
    }
}
