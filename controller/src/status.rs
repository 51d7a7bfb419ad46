//! Writing the controller's part of an object's status.

use std::fmt::Debug;

use kube::api::Api;
use kube::{Resource, ResourceExt};
use kybernate_api::apply::{self, CONTROLLER_MANAGER};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{kube_err, Error};

/// Applies `status`, the status fields the controller owns, to `obj` (server-side apply as
/// the controller's field manager; `kind` names the object in errors).
pub async fn apply_status<K, S>(
    api: &Api<K>,
    obj: &K,
    kind: &'static str,
    status: S,
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize + Debug,
{
    let name = obj.name_any();
    api.patch_status(
        &name,
        &apply::params(CONTROLLER_MANAGER),
        &apply::status::<K, _>(&name, status),
    )
    .await
    .map_err(kube_err(
        "patch",
        kind,
        &obj.namespace().unwrap_or_default(),
        &name,
    ))?;
    Ok(())
}
