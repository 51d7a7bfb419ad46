//! Which pods may restore which checkpoints.
//!
//! A checkpoint holds a workload's memory, so it is served only to the tenant it came from.
//! Each record carries its [`Origin`]: the pod (namespace, UID, name) a container checkpoint
//! was taken from, as the shim read them from the container's CRI annotations; a container
//! created outside Kubernetes; or the node itself for `kybernatectl --pid` checkpoints. A
//! restore into a pod is served only when the pod's namespace is the origin's, or when a
//! cluster-scoped `GpuCheckpointGrant` allows the origin into the pod's namespace ([`Grants`]:
//! what the node worker's watch holds; without an API server there are no grants). Everything
//! else is refused with the checkpoint and both sides named: another namespace, a node-local
//! checkpoint, a container made outside Kubernetes (grants name those two as `nodeLocal`).
//! `kybernatectl` (root on the node) and containers created outside Kubernetes (root's
//! `ctr run`) are not limited.
//!
//! Records adopted from a shared tier were written by other nodes: a record there whose
//! origin is missing or malformed is refused rather than treated as anyone's.

use std::sync::{Arc, OnceLock};

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{ObjectRef, Store};
use kybernate_api::{is_namespace_name, GpuCheckpointGrant, GrantedOrigin};
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
    /// The pod's service account, looked up in the API server's pods on this node; empty
    /// when the agent has no API client (the CRI annotations do not carry it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_account: String,
}

/// A restore refused because the checkpoint belongs to another tenant.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error(
    "checkpoint {checkpoint} was taken {from} and cannot be restored into a pod of namespace \
     {target}: checkpoints are served only to pods of the namespace they came from, unless a \
     GpuCheckpointGrant allows it{grants}"
)]
pub struct Refused {
    /// The checkpoint.
    pub checkpoint: String,
    /// Where it came from, in words.
    pub from: String,
    /// The namespace of the pod that asked.
    pub target: String,
    /// Why no grant applied, when that is not simply that none matches.
    pub grants: GrantsNote,
}

/// What the refusal says about grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantsNote {
    /// Grants were consulted; none allows this restore.
    NoneMatches,
    /// The agent has no Kubernetes API client (none configured, or its node worker has
    /// not started yet), so it knows no grants.
    NoApiServer,
}

impl std::fmt::Display for GrantsNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoneMatches => f.write_str(" (none does)"),
            Self::NoApiServer => {
                f.write_str(" (this agent has no Kubernetes API server to read grants from)")
            }
        }
    }
}

/// The `GpuCheckpointGrant`s in force on this node.
#[derive(Clone, Default)]
pub struct Grants(Option<Store<GpuCheckpointGrant>>);

impl std::fmt::Debug for Grants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("Grants(no API server)"),
            Some(store) => write!(f, "Grants({} watched)", store.state().len()),
        }
    }
}

impl Grants {
    /// No API server: only same-namespace restores are served.
    pub fn none() -> Self {
        Self(None)
    }

    /// The grants a reflector keeps up to date. Until its first list arrives the store is
    /// empty, and cross-namespace restores are refused (fail closed).
    pub fn watched(store: Store<GpuCheckpointGrant>) -> Self {
        Self(Some(store))
    }

    /// The name of a grant that lets a pod of `target` restore `checkpoint` from `origin`.
    fn allowing(&self, checkpoint: &str, origin: &Origin, target: &str) -> Option<String> {
        let origin = match origin {
            Origin::Pod(pod) => GrantedOrigin::Namespace(&pod.namespace),
            Origin::NodeLocal | Origin::UnmanagedContainer => GrantedOrigin::NodeLocal,
        };
        self.0.as_ref()?.state().iter().find_map(|grant| {
            grant
                .spec
                .allows(checkpoint, origin, target)
                .then(|| grant.metadata.name.clone().unwrap_or_default())
        })
    }
}

/// The pods of this node as the node worker's watch holds them, for the service account of
/// a checkpoint's origin. Shared by every clone: empty until the node worker attaches its
/// store, and for good without an API server.
#[derive(Clone, Default)]
pub struct PodDirectory(Arc<OnceLock<Store<Pod>>>);

impl std::fmt::Debug for PodDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.get() {
            None => f.write_str("PodDirectory(no API server)"),
            Some(store) => write!(f, "PodDirectory({} pods)", store.state().len()),
        }
    }
}

impl PodDirectory {
    /// From now on look pods up in `store` (only the first store counts).
    pub fn attach(&self, store: Store<Pod>) {
        let _ = self.0.set(store);
    }

    /// Fills in the service account of a pod origin, when the pod is known (same namespace,
    /// name and UID): a pod that is not (yet) in the store leaves it empty.
    pub fn complete(&self, origin: &mut Origin) {
        let (Origin::Pod(pod), Some(store)) = (origin, self.0.get()) else {
            return;
        };
        let key = ObjectRef::new(&pod.pod_name).within(&pod.namespace);
        let found = store
            .get(&key)
            .filter(|found| found.metadata.uid.as_deref() == Some(pod.pod_uid.as_str()));
        if let Some(account) = found
            .as_ref()
            .and_then(|p| p.spec.as_ref()?.service_account_name.clone())
        {
            pod.service_account = account;
        }
    }
}

/// Why a restore into a pod is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    /// Not into a pod: root on the node asked.
    NotIntoAPod,
    /// The pod is of the checkpoint's namespace.
    SameNamespace,
    /// The named `GpuCheckpointGrant` allows it.
    Granted(String),
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
                    service_account: String::new(),
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
            Self::Pod(pod) if !is_namespace_name(&pod.namespace) => Err(BadOrigin(format!(
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
            Self::Pod(pod) if pod.service_account.is_empty() => format!(
                "in namespace {} (pod {}, uid {})",
                pod.namespace, pod.pod_name, pod.pod_uid
            ),
            Self::Pod(pod) => format!(
                "in namespace {} (pod {}, uid {}, service account {})",
                pod.namespace, pod.pod_name, pod.pod_uid, pod.service_account
            ),
        }
    }
}

/// Decides whether `checkpoint`, taken at `origin`, may be restored into a pod of namespace
/// `target` (`None`: not into a pod, e.g. a container created outside Kubernetes, which only
/// root on the node can make), with `grants` in force.
pub fn check_restore(
    checkpoint: &str,
    origin: &Origin,
    target: Option<&str>,
    grants: &Grants,
) -> Result<Allowed, Refused> {
    let Some(target) = target else {
        return Ok(Allowed::NotIntoAPod);
    };
    if matches!(origin, Origin::Pod(pod) if pod.namespace == target) {
        return Ok(Allowed::SameNamespace);
    }
    match grants.allowing(checkpoint, origin, target) {
        Some(grant) => Ok(Allowed::Granted(grant)),
        None => Err(Refused {
            checkpoint: checkpoint.to_owned(),
            from: origin.describe(),
            target: target.to_owned(),
            grants: if grants.0.is_some() {
                GrantsNote::NoneMatches
            } else {
                GrantsNote::NoApiServer
            },
        }),
    }
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

    /// Grants as the node worker's watch would hold them.
    fn watched(grants: &[(&str, Option<&str>, &[&str])]) -> Grants {
        use kube::runtime::{reflector, watcher};
        use kybernate_api::{GpuCheckpointGrantSpec, GrantSource, GrantTarget};
        let (store, mut writer) = reflector::store();
        for (name, from, to) in grants {
            let spec = GpuCheckpointGrantSpec {
                from: GrantSource {
                    namespace: from.map(str::to_owned),
                    node_local: from.is_none(),
                },
                to: GrantTarget {
                    namespaces: to.iter().map(|s| (*s).to_owned()).collect(),
                },
                checkpoint_names: Vec::new(),
            };
            writer.apply_watcher_event(&watcher::Event::Apply(GpuCheckpointGrant::new(name, spec)));
        }
        Grants::watched(store)
    }

    #[test]
    fn a_pod_restores_checkpoints_of_its_own_namespace_only() {
        let origin = Origin::of_container(Some(&pod("tenant-a"))).unwrap();
        for grants in [Grants::none(), watched(&[])] {
            assert_eq!(
                check_restore("cp", &origin, Some("tenant-a"), &grants),
                Ok(Allowed::SameNamespace)
            );
            let refused = check_restore("cp", &origin, Some("tenant-b"), &grants).unwrap_err();
            let text = refused.to_string();
            assert!(
                text.contains("checkpoint cp")
                    && text.contains("namespace tenant-a")
                    && text.contains("namespace tenant-b")
                    && text.contains("GpuCheckpointGrant"),
                "{text}"
            );
        }
        let without_api = check_restore("cp", &origin, Some("tenant-b"), &Grants::none());
        assert!(
            without_api
                .unwrap_err()
                .to_string()
                .contains("no Kubernetes API server"),
            "the refusal says why no grant could apply"
        );
    }

    #[test]
    fn a_grant_lets_its_targets_restore_its_source_only() {
        let origin = Origin::of_container(Some(&pod("tenant-a"))).unwrap();
        let grants = watched(&[
            ("a-to-b", Some("tenant-a"), &["tenant-b"]),
            ("local-to-serving", None, &["serving"]),
        ]);
        assert_eq!(
            check_restore("cp", &origin, Some("tenant-b"), &grants),
            Ok(Allowed::Granted("a-to-b".into()))
        );
        assert!(check_restore("cp", &origin, Some("tenant-c"), &grants).is_err());
        assert!(
            check_restore("cp", &origin, Some("serving"), &grants).is_err(),
            "a node-local grant does not cover a pod's checkpoints"
        );
        let from_b = Origin::of_container(Some(&pod("tenant-b"))).unwrap();
        assert!(
            check_restore("cp", &from_b, Some("tenant-a"), &grants).is_err(),
            "a grant is one-way"
        );
        for local in [Origin::NodeLocal, Origin::UnmanagedContainer] {
            assert_eq!(
                check_restore("cp", &local, Some("serving"), &grants),
                Ok(Allowed::Granted("local-to-serving".into()))
            );
            assert!(check_restore("cp", &local, Some("tenant-b"), &grants).is_err());
        }
    }

    #[test]
    fn node_local_and_unmanaged_checkpoints_never_reach_a_pod_without_a_grant() {
        for origin in [Origin::NodeLocal, Origin::UnmanagedContainer] {
            let refused =
                check_restore("cp", &origin, Some("tenant-a"), &watched(&[])).unwrap_err();
            assert_eq!(refused.target, "tenant-a");
            // Root on the node (kybernatectl, ctr outside Kubernetes) is not limited.
            assert_eq!(
                check_restore("cp", &origin, None, &Grants::none()),
                Ok(Allowed::NotIntoAPod)
            );
        }
    }

    #[test]
    fn the_service_account_comes_from_the_watched_pod_with_the_same_uid() {
        use k8s_openapi::api::core::v1::PodSpec;
        use kube::runtime::{reflector, watcher};
        let mut origin = Origin::of_container(Some(&pod("tenant-a"))).unwrap();
        let pods = PodDirectory::default();
        pods.complete(&mut origin);
        assert!(
            !origin.describe().contains("service account"),
            "no API server: left empty"
        );
        let (store, mut writer) = reflector::store();
        let mut watched = Pod::default();
        watched.metadata.name = Some("pod-tenant-a".into());
        watched.metadata.namespace = Some("tenant-a".into());
        watched.metadata.uid = Some("uid-tenant-a".into());
        watched.spec = Some(PodSpec {
            service_account_name: Some("trainer".into()),
            ..PodSpec::default()
        });
        writer.apply_watcher_event(&watcher::Event::Apply(watched.clone()));
        pods.clone().attach(store);
        pods.complete(&mut origin);
        assert!(
            origin.describe().contains("service account trainer"),
            "{}",
            origin.describe()
        );
        let json = serde_json::to_string(&origin).unwrap();
        assert_eq!(serde_json::from_str::<Origin>(&json).unwrap(), origin);

        // Same name, another pod (a new UID): not this origin's pod.
        let mut other = Origin::of_container(Some(&pod("tenant-a"))).unwrap();
        watched.metadata.uid = Some("uid-recreated".into());
        writer.apply_watcher_event(&watcher::Event::Apply(watched));
        pods.complete(&mut other);
        assert!(!other.describe().contains("service account"));
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
