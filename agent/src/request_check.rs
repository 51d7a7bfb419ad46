//! Checks on the fields of incoming gRPC requests that need no agent state: checkpoint
//! names, tier names and the pod a container names. The node's handlers run them before they
//! look anything up, and the fuzz targets (testing/fuzz-targets) run them on decoded
//! protobuf messages, so both exercise the same code.

use kybernate_dataplane::{CheckpointName, TierKind};
use kybernate_proto::agent::v1 as pb;

use crate::error::AgentError;
use crate::tenancy::Origin;

/// The checkpoint a request refers to.
pub fn checkpoint_ref(checkpoint_ref: &str) -> Result<CheckpointName, AgentError> {
    Ok(CheckpointName::new(checkpoint_ref)?)
}

/// A name a caller asks a new checkpoint to get; `None` when empty (the agent makes one up).
pub fn requested_name(name: &str) -> Result<Option<CheckpointName>, AgentError> {
    match name {
        "" => Ok(None),
        name => Ok(Some(CheckpointName::new(name)?)),
    }
}

/// The slowest tier a checkpoint is stored into before the reply (NVMe when empty).
pub fn slowest_tier(tier: &str) -> Result<TierKind, AgentError> {
    match tier {
        "" => Ok(TierKind::Nvme),
        tier => any_tier(tier),
    }
}

/// The tier a restore must come from; `None` (empty) means the nearest with an intact copy.
pub fn source_tier(tier: &str) -> Result<Option<TierKind>, AgentError> {
    match tier {
        "" => Ok(None),
        tier => any_tier(tier).map(Some),
    }
}

/// The tier a prefetch copies into.
pub fn prefetch_tier(tier: &str) -> Result<TierKind, AgentError> {
    TierKind::parse(tier).ok_or_else(|| {
        AgentError::InvalidRequest(format!("unknown tier {tier:?}: use ram or nvme"))
    })
}

/// The tier a pin keeps a copy in: only the node's own tiers can hold one.
pub fn pin_tier(tier: &str) -> Result<TierKind, AgentError> {
    match TierKind::parse(tier) {
        Some(tier @ (TierKind::Ram | TierKind::Nvme)) => Ok(tier),
        _ => Err(AgentError::InvalidRequest(format!(
            "cannot pin to tier {tier:?}: a pin keeps a copy in ram or nvme"
        ))),
    }
}

fn any_tier(tier: &str) -> Result<TierKind, AgentError> {
    TierKind::parse(tier).ok_or_else(|| {
        AgentError::InvalidRequest(format!("unknown tier {tier:?}: use ram, nvme or s3"))
    })
}

/// What a shim's Begin of a container checkpoint states: the container, its processes and
/// its pod (the checkpoint's origin). Returns the name it asks for and the origin.
pub fn container_checkpoint_begin(
    request: &pb::ContainerCheckpointBeginRequest,
) -> Result<(Option<CheckpointName>, Origin), AgentError> {
    if request.container_id.is_empty() || request.pids.is_empty() {
        return Err(AgentError::InvalidRequest(
            "a container checkpoint needs the container id and its pids".into(),
        ));
    }
    let origin = Origin::of_container(request.pod.as_ref()).map_err(|e| {
        AgentError::InvalidRequest(format!(
            "container {}: the pod named by its CRI annotations is malformed: {e}",
            request.container_id
        ))
    })?;
    Ok((requested_name(&request.name)?, origin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_are_named_and_defaults_depend_on_the_request() {
        assert_eq!(slowest_tier("").unwrap(), TierKind::Nvme);
        assert_eq!(slowest_tier("s3").unwrap(), TierKind::S3);
        assert_eq!(source_tier("").unwrap(), None);
        assert_eq!(source_tier("ram").unwrap(), Some(TierKind::Ram));
        assert!(pin_tier("s3")
            .unwrap_err()
            .to_string()
            .contains("ram or nvme"));
        assert!(slowest_tier("tape")
            .unwrap_err()
            .to_string()
            .contains("\"tape\""));
        assert!(prefetch_tier("").is_err());
    }

    #[test]
    fn a_begin_needs_its_container_pids_and_a_well_formed_pod() {
        let mut request = pb::ContainerCheckpointBeginRequest {
            container_id: "c1".into(),
            pids: vec![7],
            ..Default::default()
        };
        let (name, origin) = container_checkpoint_begin(&request).unwrap();
        assert_eq!((name, origin), (None, Origin::UnmanagedContainer));
        request.pod = Some(pb::PodIdentity {
            namespace: "Tenant_A".into(),
            pod_uid: "u".into(),
            pod_name: "p".into(),
        });
        let e = container_checkpoint_begin(&request)
            .unwrap_err()
            .to_string();
        assert!(e.contains("container c1") && e.contains("Tenant_A"), "{e}");
        request.pod = None;
        request.name = "../x".into();
        assert!(container_checkpoint_begin(&request).is_err());
        request.pids.clear();
        request.name.clear();
        assert!(container_checkpoint_begin(&request).is_err());
    }
}
