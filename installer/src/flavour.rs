//! Which kind of containerd node this is, found from the host's files: where its config
//! lives, which file the installer edits, where its socket is and how it is restarted.

use std::path::{Path, PathBuf};

use crate::files::HostRoot;
use crate::{InstallerError, Result};

/// The kinds of containerd installation the installer knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// containerd from the distribution or upstream, `/etc/containerd/config.toml`, systemd.
    Vanilla,
    /// Canonical's MicroK8s snap: a template under `/var/snap/microk8s/current/args`.
    MicroK8s,
    /// k3s: containerd config generated at start, customised by `config.toml.tmpl`.
    K3s,
    /// RKE2: like k3s under `/var/lib/rancher/rke2`.
    Rke2,
}

impl Flavour {
    /// Parses the `--flavour` value.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "vanilla" | "containerd" => Some(Self::Vanilla),
            "microk8s" => Some(Self::MicroK8s),
            "k3s" => Some(Self::K3s),
            "rke2" => Some(Self::Rke2),
            _ => None,
        }
    }

    /// The name `--flavour` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vanilla => "vanilla",
            Self::MicroK8s => "microk8s",
            Self::K3s => "k3s",
            Self::Rke2 => "rke2",
        }
    }

    /// Host path of the file the flavour's containerd reads (MicroK8s: its template).
    pub fn default_config(self) -> &'static str {
        match self {
            Self::Vanilla => "/etc/containerd/config.toml",
            Self::MicroK8s => "/var/snap/microk8s/current/args/containerd-template.toml",
            Self::K3s => "/var/lib/rancher/k3s/agent/etc/containerd/config.toml",
            Self::Rke2 => "/var/lib/rancher/rke2/agent/etc/containerd/config.toml",
        }
    }

    /// Host path of containerd's socket.
    pub fn default_socket(self) -> &'static str {
        match self {
            Self::Vanilla => "/run/containerd/containerd.sock",
            Self::MicroK8s => "/var/snap/microk8s/common/run/containerd.sock",
            Self::K3s | Self::Rke2 => "/run/k3s/containerd/containerd.sock",
        }
    }

    /// Whether the flavour regenerates its config from a Go template at every start.
    pub fn uses_go_template(self) -> bool {
        matches!(self, Self::K3s | Self::Rke2)
    }
}

/// The files and service of one node, all as host paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The detected or chosen flavour.
    pub flavour: Flavour,
    /// The file the installer edits (for k3s/RKE2 the template, which may not exist yet).
    pub config: PathBuf,
    /// k3s/RKE2: the config containerd runs with, generated from the template.
    pub generated: Option<PathBuf>,
    /// containerd's socket, for the readiness check after a restart.
    pub socket: PathBuf,
}

const DETECTION_ORDER: [Flavour; 4] = [
    Flavour::MicroK8s,
    Flavour::Rke2,
    Flavour::K3s,
    Flavour::Vanilla,
];

/// Finds the node's flavour (unless `flavour` forces one) and its files. `config` overrides
/// the file the flavour's containerd reads.
pub fn detect(host: &HostRoot, flavour: Option<Flavour>, config: Option<&Path>) -> Result<Target> {
    let flavour = match flavour {
        Some(f) => f,
        None => {
            let found = DETECTION_ORDER
                .into_iter()
                .find(|f| host.resolve(Path::new(f.default_config())).is_file());
            match (found, config) {
                (Some(f), _) => f,
                (None, Some(_)) => Flavour::Vanilla,
                (None, None) => {
                    let tried: Vec<&str> =
                        DETECTION_ORDER.iter().map(|f| f.default_config()).collect();
                    return Err(InstallerError::NoFlavour {
                        host_root: host.dir().to_path_buf(),
                        tried: tried.join(", "),
                    });
                }
            }
        }
    };
    let main = config.map_or_else(
        || PathBuf::from(flavour.default_config()),
        Path::to_path_buf,
    );
    let socket = PathBuf::from(flavour.default_socket());
    if !flavour.uses_go_template() {
        return Ok(Target {
            flavour,
            config: main,
            generated: None,
            socket,
        });
    }
    let dir = main.parent().unwrap_or(Path::new("/")).to_path_buf();
    let existing = ["config-v3.toml.tmpl", "config.toml.tmpl"]
        .into_iter()
        .map(|name| dir.join(name))
        .find(|p| host.resolve(p).is_file());
    let template = match existing {
        Some(t) => t,
        None => dir.join(template_name_for(host, &main)?),
    };
    Ok(Target {
        flavour,
        config: template,
        generated: Some(main),
        socket,
    })
}

/// k3s renders `config-v3.toml.tmpl` for containerd 2.x and `config.toml.tmpl` for 1.x;
/// a new template takes the name that matches the generated config's version.
fn template_name_for(host: &HostRoot, generated: &Path) -> Result<&'static str> {
    let resolved = host.resolve(generated);
    let text = crate::files::read_required(&resolved)?;
    let doc = crate::config_edit::parse(&text, &resolved)?;
    Ok(
        match crate::runtime_spec::ConfigVersion::require(&doc, &resolved)? {
            crate::runtime_spec::ConfigVersion::V3 => "config-v3.toml.tmpl",
            crate::runtime_spec::ConfigVersion::V2 => "config.toml.tmpl",
        },
    )
}
