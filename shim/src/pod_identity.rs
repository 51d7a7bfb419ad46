//! The pod a container belongs to, from the CRI annotations containerd's CRI plugin writes
//! into every container's OCI spec. The agent records it as a checkpoint's origin and checks
//! it when a container asks to be restored from a checkpoint (tenant isolation).

use kybernate_proto::agent::v1 as pb;
use oci_spec::runtime::Spec;

const NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
const UID: &str = "io.kubernetes.cri.sandbox-uid";
const NAME: &str = "io.kubernetes.cri.sandbox-name";

/// The container's pod; `None` for a container created outside Kubernetes (no namespace
/// annotation). The agent refuses a pod whose fields are missing or malformed.
pub fn of(spec: &Spec) -> Option<pb::PodIdentity> {
    let annotations = spec.annotations().as_ref()?;
    let get = |key: &str| annotations.get(key).cloned().unwrap_or_default();
    annotations.get(NAMESPACE)?;
    Some(pb::PodIdentity {
        namespace: get(NAMESPACE),
        pod_uid: get(UID),
        pod_name: get(NAME),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(annotations: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "annotations": annotations,
        }))
        .unwrap()
    }

    #[test]
    fn reads_the_pod_from_cri_annotations() {
        let pod = of(&spec(serde_json::json!({
            "io.kubernetes.cri.sandbox-namespace": "tenant-a",
            "io.kubernetes.cri.sandbox-uid": "0b1c",
            "io.kubernetes.cri.sandbox-name": "trainer-0",
        })))
        .unwrap();
        assert_eq!(
            (
                pod.namespace.as_str(),
                pod.pod_uid.as_str(),
                pod.pod_name.as_str()
            ),
            ("tenant-a", "0b1c", "trainer-0")
        );
    }

    #[test]
    fn no_namespace_annotation_is_no_pod() {
        assert!(of(&spec(
            serde_json::json!({ "io.kubernetes.cri.sandbox-uid": "0b1c" })
        ))
        .is_none());
        assert!(of(&spec(serde_json::json!({}))).is_none());
    }
}
