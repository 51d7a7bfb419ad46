//! Server-side apply for the two writers of our objects. The controller and each node's
//! agent write the same objects; each applies only the fields it owns under its own field
//! manager, and conditions are a list-map keyed by `type` in the CRD schema, so the API
//! server merges one writer's conditions with the other's instead of the last writer
//! replacing the whole list (what a merge patch of `status.conditions` did).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams};
use kube::Resource;
use serde::Serialize;

/// The field manager of the controller's writes.
pub const CONTROLLER_MANAGER: &str = "kybernate-controller";
/// The field manager of the node agents' writes.
pub const AGENT_MANAGER: &str = "kybernate-agent";

/// An apply configuration: the object's identity plus the fields one writer owns. Fields
/// left out are not touched, or given up when this manager owned them before.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Applied<S> {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<S>,
}

/// Applies as `manager`, taking over fields another manager set last (the phase moves
/// between writers by design; a conflict error would only stall the object).
pub fn params(manager: &str) -> PatchParams {
    PatchParams::apply(manager).force()
}

/// The status writer's fields for object `name` of kind `K` (for `patch_status`).
pub fn status<K, S>(name: &str, status: S) -> Patch<Applied<S>>
where
    K: Resource<DynamicType = ()>,
    S: Serialize,
{
    status_at::<K, S>(name, None, status)
}

/// Like [`status`], but with `resource_version` the API server refuses it (409) unless the
/// object is still at that version: a writer that claims work with it never acts twice on
/// a stale copy.
pub fn status_at<K, S>(name: &str, resource_version: Option<String>, status: S) -> Patch<Applied<S>>
where
    K: Resource<DynamicType = ()>,
    S: Serialize,
{
    Patch::Apply(Applied {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            resource_version,
            ..ObjectMeta::default()
        },
        status: Some(status),
    })
}

/// Metadata fields (labels) one writer owns, on the object named in `metadata`.
pub fn metadata<K>(metadata: ObjectMeta) -> Patch<Applied<()>>
where
    K: Resource<DynamicType = ()>,
{
    Patch::Apply(Applied {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        metadata,
        status: None,
    })
}
