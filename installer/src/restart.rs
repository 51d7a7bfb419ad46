//! containerd does not reload its config on SIGHUP, so each flavour restarts it its own way.
//! Running containers survive: their shims are separate processes. After the restart the
//! installer waits until containerd answers again and reports the runtime.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::files::HostRoot;
use crate::flavour::{Flavour, Target};
use crate::{InstallerError, Result};

/// Runs a command on the host; the real one enters the host's namespaces, the test double
/// records what it was asked to run (the fake init system).
pub trait HostCommand {
    /// Runs `argv` to completion; an error carries the exit status and stderr.
    fn run(&self, argv: &[&str]) -> Result<()>;
}

/// Runs commands on the host: directly when the host root is `/`, else through
/// `nsenter --target 1` (the DaemonSet runs with `hostPID: true` and privileged).
#[derive(Debug, Clone)]
pub struct NsenterCommand {
    direct: bool,
}

impl NsenterCommand {
    /// Chooses direct execution for host root `/`.
    pub fn for_host(host: &HostRoot) -> Self {
        Self {
            direct: host.dir() == Path::new("/"),
        }
    }
}

impl HostCommand for NsenterCommand {
    fn run(&self, argv: &[&str]) -> Result<()> {
        let mut full: Vec<&str> = Vec::new();
        if !self.direct {
            full.extend([
                "nsenter", "--target", "1", "--mount", "--uts", "--ipc", "--net", "--pid", "--",
            ]);
        }
        full.extend_from_slice(argv);
        let command = full.join(" ");
        let output = Command::new(full[0])
            .args(&full[1..])
            .output()
            .map_err(|e| InstallerError::Restart {
                command: command.clone(),
                detail: e.to_string(),
            })?;
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(InstallerError::Restart {
            command,
            detail: format!(
                "{}: {}",
                output.status,
                stderr.split_whitespace().collect::<Vec<_>>().join(" ")
            ),
        })
    }
}

/// How one flavour restarts its containerd.
pub trait ContainerdRestart: std::fmt::Debug {
    /// Issues the restart through `host`.
    fn restart(&self, host: &dyn HostCommand) -> Result<()>;
}

/// Vanilla containerd under systemd.
#[derive(Debug, Clone)]
pub struct SystemdRestart;

impl ContainerdRestart for SystemdRestart {
    fn restart(&self, host: &dyn HostCommand) -> Result<()> {
        host.run(&["systemctl", "restart", "containerd"])
    }
}

/// MicroK8s runs containerd as a snap service of its own.
#[derive(Debug, Clone)]
pub struct MicroK8sRestart;

impl ContainerdRestart for MicroK8sRestart {
    fn restart(&self, host: &dyn HostCommand) -> Result<()> {
        host.run(&["snap", "restart", "microk8s.daemon-containerd"])
    }
}

/// k3s and RKE2 embed containerd and regenerate its config from the template at start, so
/// their whole service restarts (pods keep running).
#[derive(Debug, Clone)]
pub struct RancherRestart {
    /// `k3s`, `k3s-agent`, `rke2-server` or `rke2-agent`.
    pub unit: String,
}

impl ContainerdRestart for RancherRestart {
    fn restart(&self, host: &dyn HostCommand) -> Result<()> {
        host.run(&["systemctl", "restart", &self.unit])
    }
}

const UNIT_DIRS: [&str; 4] = [
    "/etc/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

/// Picks the restart for `flavour`; for k3s/RKE2 the agent unit when only that is installed.
pub fn restart_for(flavour: Flavour, host: &HostRoot) -> Box<dyn ContainerdRestart> {
    let unit_exists = |unit: &str| {
        UNIT_DIRS.iter().any(|d| {
            host.resolve(&Path::new(d).join(format!("{unit}.service")))
                .exists()
        })
    };
    let rancher = |server: &str, agent: &str| {
        let unit = if !unit_exists(server) && unit_exists(agent) {
            agent
        } else {
            server
        };
        Box::new(RancherRestart {
            unit: unit.to_string(),
        })
    };
    match flavour {
        Flavour::Vanilla => Box::new(SystemdRestart),
        Flavour::MicroK8s => Box::new(MicroK8sRestart),
        Flavour::K3s => rancher("k3s", "k3s-agent"),
        Flavour::Rke2 => rancher("rke2-server", "rke2-agent"),
    }
}

/// What one look at containerd saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// It did not answer; the reason.
    Unreachable(String),
    /// It answered; whether its CRI runtimes include `kybernate`.
    Answering {
        /// `kybernate` is among the runtimes.
        runtime_listed: bool,
    },
}

/// Asks containerd whether it is up and which runtimes it has.
pub trait ContainerdProbe {
    /// One look.
    fn probe(&self) -> ProbeOutcome;
}

/// How long to wait for containerd after a restart.
#[derive(Debug, Clone, Copy)]
pub struct WaitPolicy {
    /// Number of probes.
    pub attempts: u32,
    /// Pause between probes.
    pub interval: Duration,
}

/// Restarts containerd and waits until it answers with the runtime listed (`expect_listed`)
/// or without it (after uninstall). Returns how many probes it took.
pub fn restart_and_wait(
    restart: &dyn ContainerdRestart,
    host: &dyn HostCommand,
    probe: &dyn ContainerdProbe,
    socket: &Path,
    expect_listed: bool,
    policy: WaitPolicy,
) -> Result<u32> {
    restart.restart(host)?;
    let mut last = ProbeOutcome::Unreachable("not probed".into());
    for attempt in 1..=policy.attempts.max(1) {
        last = probe.probe();
        if last
            == (ProbeOutcome::Answering {
                runtime_listed: expect_listed,
            })
        {
            return Ok(attempt);
        }
        if attempt < policy.attempts {
            std::thread::sleep(policy.interval);
        }
    }
    let detail = match last {
        ProbeOutcome::Unreachable(why) => format!("did not answer ({why})"),
        ProbeOutcome::Answering { .. } if expect_listed => {
            "answers but does not list runtime kybernate".to_string()
        }
        ProbeOutcome::Answering { .. } => "still lists runtime kybernate".to_string(),
    };
    Err(InstallerError::NotReady {
        socket: socket.to_path_buf(),
        detail,
        attempts: policy.attempts.max(1),
    })
}

/// The socket the installer probes, as it opens it.
pub fn socket_path(target: &Target, host: &HostRoot) -> PathBuf {
    host.resolve(&target.socket)
}
