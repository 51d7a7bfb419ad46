//! Which pods may restore which checkpoints.
//!
//! A checkpoint holds a workload's memory, so it is served only to the tenant it came from.
//! Each record carries its [`Origin`]: the pod (namespace, UID, name) a container checkpoint
//! was taken from, as the shim read them from the container's CRI annotations; a container
//! created outside Kubernetes; or the node itself for `kybernatectl --pid` checkpoints. A
//! restore into a pod is served only when the pod's namespace is the origin's. Everything
//! else is refused with the checkpoint and both sides named: another namespace, a node-local
//! checkpoint, a container made outside Kubernetes. `kybernatectl` (root on the node) and
//! containers created outside Kubernetes (root's `ctr run`) are not limited.
//!
//! Records adopted from a shared tier were written by other nodes: a record there whose
//! origin is missing or malformed is refused rather than treated as anyone's.

use kybernate_proto::agent::v1 as pb;
use serde::{Deserialize, Serialize};

/// Where a checkpoint came from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Origin {
    /// A process of the node, checkpointed by PID (`kybernatectl --pid`). Also what records
    /// written before origins existed are taken to be.
    #[default]
    NodeLocal,
    /// A container created outside Kubernetes (no CRI annotations).
    UnmanagedContainer,
    /// A container of a Kubernetes pod.
    Pod(PodOrigin),
}

/// The pod a container checkpoint was taken from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodOrigin {
    /// The pod's namespace: what restores are checked against.
    pub namespace: String,
    /// The pod's UID.
    pub pod_uid: String,
    /// The pod's name.
    pub pod_name: String,
}

/// A restore refused because the checkpoint belongs to another tenant.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "checkpoint {checkpoint} was taken {from} and cannot be restored into a pod of namespace \
     {target}: checkpoints are served only to pods of the namespace they came from"
)]
pub struct Refused {
    /// The checkpoint.
    pub checkpoint: String,
    /// Where it came from, in words.
    pub from: String,
    /// The namespace of the pod that asked.
    pub target: String,
}

/// An origin that is missing or malformed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("its origin is {0}")]
pub struct BadOrigin(String);

impl Origin {
    /// The origin of a container checkpoint whose Begin named `pod` (or no pod).
    pub fn of_container(pod: Option<&pb::PodIdentity>) -> Result<Self, BadOrigin> {
        match pod {
            None => Ok(Self::UnmanagedContainer),
            Some(pod) => {
                let origin = Self::Pod(PodOrigin {
                    namespace: pod.namespace.clone(),
                    pod_uid: pod.pod_uid.clone(),
                    pod_name: pod.pod_name.clone(),
                });
                origin.validate()?;
                Ok(origin)
            }
        }
    }

    /// Checks the fields a restore decision relies on.
    pub fn validate(&self) -> Result<(), BadOrigin> {
        match self {
            Self::NodeLocal | Self::UnmanagedContainer => Ok(()),
            Self::Pod(pod) if !is_dns_label(&pod.namespace) => Err(BadOrigin(format!(
                "a pod namespace {:?} that is not a Kubernetes namespace name",
                pod.namespace
            ))),
            Self::Pod(pod) if pod.pod_uid.is_empty() || pod.pod_name.is_empty() => {
                Err(BadOrigin("a pod without its UID or name".to_owned()))
            }
            Self::Pod(_) => Ok(()),
        }
    }

    /// The origin in words, for errors and logs.
    pub fn describe(&self) -> String {
        match self {
            Self::NodeLocal => "from a process of the node (node-local)".to_owned(),
            Self::UnmanagedContainer => "from a container created outside Kubernetes".to_owned(),
            Self::Pod(pod) => format!(
                "in namespace {} (pod {}, uid {})",
                pod.namespace, pod.pod_name, pod.pod_uid
            ),
        }
    }
}

/// Decides whether `checkpoint`, taken at `origin`, may be restored into `target` (`None`: a
/// container created outside Kubernetes, which only root on the node can make).
pub fn check_restore(
    checkpoint: &str,
    origin: &Origin,
    target: Option<&pb::PodIdentity>,
) -> Result<(), Refused> {
    let Some(target) = target else {
        return Ok(());
    };
    match origin {
        Origin::Pod(pod) if pod.namespace == target.namespace => Ok(()),
        _ => Err(Refused {
            checkpoint: checkpoint.to_owned(),
            from: origin.describe(),
            target: target.namespace.clone(),
        }),
    }
}

/// A Kubernetes namespace name: an RFC 1123 label.
fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(namespace: &str) -> pb::PodIdentity {
        pb::PodIdentity {
            namespace: namespace.to_owned(),
            pod_uid: format!("uid-{namespace}"),
            pod_name: format!("pod-{namespace}"),
        }
    }

    #[test]
    fn a_pod_restores_checkpoints_of_its_own_namespace_only() {
        let origin = Origin::of_container(Some(&pod("tenant-a"))).unwrap();
        check_restore("cp", &origin, Some(&pod("tenant-a"))).unwrap();
        let refused = check_restore("cp", &origin, Some(&pod("tenant-b"))).unwrap_err();
        let text = refused.to_string();
        assert!(
            text.contains("checkpoint cp")
                && text.contains("namespace tenant-a")
                && text.contains("namespace tenant-b"),
            "{text}"
        );
    }

    #[test]
    fn node_local_and_unmanaged_checkpoints_never_reach_a_pod() {
        for origin in [Origin::NodeLocal, Origin::UnmanagedContainer] {
            let refused = check_restore("cp", &origin, Some(&pod("tenant-a"))).unwrap_err();
            assert_eq!(refused.target, "tenant-a");
            // Root on the node (kybernatectl, ctr outside Kubernetes) is not limited.
            check_restore("cp", &origin, None).unwrap();
        }
    }

    #[test]
    fn records_keep_their_origin_and_old_records_are_node_local() {
        let origin = Origin::of_container(Some(&pod("tenant-a"))).unwrap();
        let json = serde_json::to_string(&origin).unwrap();
        assert_eq!(serde_json::from_str::<Origin>(&json).unwrap(), origin);
        assert_eq!(Origin::default(), Origin::NodeLocal);
    }

    #[test]
    fn malformed_origins_are_refused() {
        for bad in ["", "Tenant-A", "-a", "a/b", &"x".repeat(64)] {
            assert!(Origin::of_container(Some(&pod(bad))).is_err(), "{bad:?}");
        }
        let mut nameless = pod("tenant-a");
        nameless.pod_uid.clear();
        assert!(Origin::of_container(Some(&nameless)).is_err());
        assert!(serde_json::from_str::<Origin>(r#"{"kind":"pod","namespace":"a"}"#).is_err());
        assert!(serde_json::from_str::<Origin>(r#"{"kind":"everyone"}"#).is_err());
    }
}
