//! `kybernate-installer`: runs as the agent DaemonSet's privileged init container, copies the
//! Kybernate shim onto the node, registers the `kybernate` runtime in containerd's config
//! for the node's flavour (containerd 1.x or 2.x, drop-ins, MicroK8s, k3s, RKE2) and
//! restarts containerd so that it picks the runtime up. `--uninstall` undoes all of it.

pub mod cli;
pub mod config_edit;
pub mod dropin;
pub mod error;
pub mod files;
pub mod flavour;
pub mod gotemplate;
pub mod install;
pub mod plan;
pub mod probe;
pub mod restart;
pub mod runtime_spec;
pub mod shim;
pub mod uninstall;

pub use error::{InstallerError, Result};
