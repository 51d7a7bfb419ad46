//! Which shim process serves a container. As with containerd's runc.v2 shim, the containers
//! of one Kubernetes pod share one shim: the CRI marks every container of a pod (the pause
//! container too) with the pod sandbox's id, and containers outside Kubernetes may name a
//! group of their own. A node with 100 pods then runs 100 shims, not one per container.

use std::path::Path;

use oci_spec::runtime::Spec;

/// Annotations naming a container's shim group, the first present wins: an explicit
/// group, then the CRI's pod sandbox id (set on the sandbox and on each of its containers).
pub const GROUP_ANNOTATIONS: [&str; 2] = [
    "io.containerd.runc.v2.group",
    "io.kubernetes.cri.sandbox-id",
];

/// The shim group of container `id` with OCI spec `spec`: its group annotation, else its
/// own id.
pub fn group_of(id: &str, spec: &Spec) -> String {
    spec.annotations()
        .as_ref()
        .and_then(|annotations| {
            GROUP_ANNOTATIONS
                .iter()
                .find_map(|key| annotations.get(*key).filter(|v| !v.is_empty()))
        })
        .cloned()
        .unwrap_or_else(|| id.to_owned())
}

/// Whether a shim already listens on `address` (`unix:///run/containerd/s/…`): then the
/// new container joins it instead of starting another process.
pub fn serving(address: &str) -> bool {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    Path::new(path).exists() && std::os::unix::net::UnixStream::connect(path).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(annotations: serde_json::Value) -> Spec {
        serde_json::from_value(json!({ "ociVersion": "1.1.0", "annotations": annotations }))
            .unwrap()
    }

    #[test]
    fn containers_of_a_pod_share_the_sandbox_group() {
        let pause = spec(json!({
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-id": "pod1"
        }));
        let app = spec(json!({
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": "pod1"
        }));
        assert_eq!(group_of("pod1", &pause), "pod1");
        assert_eq!(group_of("app", &app), "pod1");
    }

    #[test]
    fn an_explicit_group_wins_and_no_annotation_means_the_own_id() {
        let both = spec(json!({
            "io.containerd.runc.v2.group": "g",
            "io.kubernetes.cri.sandbox-id": "pod1"
        }));
        assert_eq!(group_of("c", &both), "g");
        assert_eq!(group_of("c", &spec(json!({}))), "c");
        assert_eq!(
            group_of("c", &spec(json!({"io.kubernetes.cri.sandbox-id": ""}))),
            "c"
        );
    }

    #[test]
    fn a_listening_socket_is_serving_and_a_stale_path_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let address = format!("unix://{}", path.display());
        assert!(!serving(&address));
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(serving(&address));
        drop(listener);
        assert!(!serving(&address), "a socket file nobody listens on");
    }
}
