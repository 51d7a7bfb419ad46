//! `GpuCheckpointGrant`: lets pods of other namespaces restore a namespace's checkpoints.
//!
//! A checkpoint is a copy of a workload's memory, so by default it is restored only into
//! pods of the namespace it was taken in. Sharing it is a decision of the cluster's
//! administrator, not of either tenant, so the grant is cluster-scoped: tenants who can
//! create objects in their own namespace cannot grant themselves anything. A grant names
//! one source (a namespace, or `nodeLocal` for checkpoints made on a node outside
//! Kubernetes: `kybernatectl --pid`, root's `ctr run`) and the namespaces that may restore
//! from it, optionally only some checkpoints by name. Grants only add: there is no deny.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Who may restore whose checkpoints.
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "kybernate.io",
    version = "v1alpha1",
    kind = "GpuCheckpointGrant",
    shortname = "gcg",
    category = "kybernate",
    printcolumn = r#"{"name":"From","type":"string","jsonPath":".spec.from.namespace"}"#,
    printcolumn = r#"{"name":"NodeLocal","type":"boolean","jsonPath":".spec.from.nodeLocal"}"#,
    printcolumn = r#"{"name":"To","type":"string","jsonPath":".spec.to.namespaces"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct GpuCheckpointGrantSpec {
    /// Whose checkpoints are shared.
    pub from: GrantSource,
    /// Who may restore them.
    pub to: GrantTarget,
    /// Only these checkpoints (the names a pod's `kybernate.io/restore-from` carries); all
    /// of the source's checkpoints when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "checkpoint_names")]
    pub checkpoint_names: Vec<String>,
}

/// The source of a grant: exactly one of a namespace and `nodeLocal: true`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.__namespace__) != (has(self.nodeLocal) && self.nodeLocal)").message("from names exactly one of namespace and nodeLocal: true"))]
#[serde(rename_all = "camelCase")]
pub struct GrantSource {
    /// Checkpoints of pods of this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "namespace_name")]
    pub namespace: Option<String>,
    /// Checkpoints made on a node outside Kubernetes (`kybernatectl --pid`, containers
    /// created with `ctr run`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub node_local: bool,
}

/// The namespaces a grant lets restore.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrantTarget {
    /// Pods of these namespaces may restore the source's checkpoints.
    #[schemars(schema_with = "namespace_names")]
    pub namespaces: Vec<String>,
}

/// What a checkpoint came from, as far as grants are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantedOrigin<'a> {
    /// A pod of this namespace.
    Namespace(&'a str),
    /// The node itself (no pod).
    NodeLocal,
}

impl GpuCheckpointGrantSpec {
    /// Whether this grant lets a pod of namespace `target` restore `checkpoint`, taken at
    /// `origin`. A grant the API server would have refused (no or two sources, a malformed
    /// namespace) allows nothing.
    pub fn allows(&self, checkpoint: &str, origin: GrantedOrigin<'_>, target: &str) -> bool {
        let source_matches = match (&self.from.namespace, self.from.node_local, origin) {
            (Some(ns), false, GrantedOrigin::Namespace(origin)) => {
                is_namespace_name(ns) && ns == origin
            }
            (None, true, GrantedOrigin::NodeLocal) => true,
            _ => false,
        };
        source_matches
            && self
                .to
                .namespaces
                .iter()
                .any(|ns| is_namespace_name(ns) && ns == target)
            && (self.checkpoint_names.is_empty()
                || self.checkpoint_names.iter().any(|name| name == checkpoint))
    }
}

/// A Kubernetes namespace name: an RFC 1123 label.
pub fn is_namespace_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// The pattern of [`is_namespace_name`], for the schema.
const NAMESPACE_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

fn namespace_name(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": 63,
        "pattern": NAMESPACE_PATTERN,
    })
}

fn namespace_names(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "minItems": 1,
        "maxItems": 256,
        "x-kubernetes-list-type": "set",
        "items": {
            "type": "string",
            "minLength": 1,
            "maxLength": 63,
            "pattern": NAMESPACE_PATTERN,
        },
    })
}

fn checkpoint_names(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "maxItems": 1024,
        "x-kubernetes-list-type": "set",
        "items": {"type": "string", "minLength": 1, "maxLength": 253},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(
        from: Option<&str>,
        node_local: bool,
        to: &[&str],
        names: &[&str],
    ) -> GpuCheckpointGrantSpec {
        GpuCheckpointGrantSpec {
            from: GrantSource {
                namespace: from.map(str::to_owned),
                node_local,
            },
            to: GrantTarget {
                namespaces: to.iter().map(|s| (*s).to_owned()).collect(),
            },
            checkpoint_names: names.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn a_grant_allows_its_source_into_its_targets_only() {
        let g = grant(Some("tenant-a"), false, &["tenant-b", "tenant-c"], &[]);
        let a = GrantedOrigin::Namespace("tenant-a");
        assert!(g.allows("cp", a, "tenant-b"));
        assert!(g.allows("cp", a, "tenant-c"));
        assert!(!g.allows("cp", a, "tenant-d"), "not a target");
        assert!(
            !g.allows("cp", GrantedOrigin::Namespace("tenant-x"), "tenant-b"),
            "another source"
        );
        assert!(
            !g.allows("cp", GrantedOrigin::NodeLocal, "tenant-b"),
            "node-local needs its own grant"
        );
    }

    #[test]
    fn node_local_grants_cover_node_local_checkpoints_only() {
        let g = grant(None, true, &["serving"], &[]);
        assert!(g.allows("cp", GrantedOrigin::NodeLocal, "serving"));
        assert!(!g.allows("cp", GrantedOrigin::Namespace("serving"), "other"));
        assert!(!g.allows("cp", GrantedOrigin::NodeLocal, "other"));
    }

    #[test]
    fn checkpoint_names_narrow_a_grant() {
        let g = grant(Some("a"), false, &["b"], &["model-v1"]);
        assert!(g.allows("model-v1", GrantedOrigin::Namespace("a"), "b"));
        assert!(!g.allows("model-v2", GrantedOrigin::Namespace("a"), "b"));
    }

    #[test]
    fn malformed_grants_allow_nothing() {
        let a = GrantedOrigin::Namespace("a");
        assert!(
            !grant(Some("a"), true, &["b"], &[]).allows("cp", a, "b"),
            "two sources"
        );
        assert!(!grant(Some("a"), true, &["b"], &[]).allows("cp", GrantedOrigin::NodeLocal, "b"));
        assert!(
            !grant(None, false, &["b"], &[]).allows("cp", a, "b"),
            "no source"
        );
        assert!(
            !grant(Some("a"), false, &[], &[]).allows("cp", a, "b"),
            "no target"
        );
        let bad = grant(Some("A_1"), false, &["b"], &[]);
        assert!(!bad.allows("cp", GrantedOrigin::Namespace("A_1"), "b"));
        let bad = grant(Some("a"), false, &["B/"], &[]);
        assert!(!bad.allows("cp", a, "B/"));
    }

    #[test]
    fn grants_read_as_their_yaml_says() {
        let spec: GpuCheckpointGrantSpec = serde_json::from_value(serde_json::json!({
            "from": {"nodeLocal": true},
            "to": {"namespaces": ["serving"]},
            "checkpointNames": ["llama"],
        }))
        .unwrap();
        assert_eq!(spec, grant(None, true, &["serving"], &["llama"]));
    }
}
