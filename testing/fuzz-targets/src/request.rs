//! Target `request`: gRPC requests as the agent's socket receives them, protobuf-decoded and
//! then checked by the same functions the node's handlers call first.

use kybernate_agent::error::AgentError;
use kybernate_agent::request_check as check;
use kybernate_dataplane::CheckpointName;
use kybernate_proto::agent::v1 as pb;
use prost::Message;

use crate::Verdict;

/// The first byte picks the request type (modulo the number of types); the rest is its
/// protobuf encoding. Every name the checks accept must be usable as one path component and
/// one object-key component, since it becomes both.
pub fn request(data: &[u8]) -> Verdict {
    let Some((&kind, bytes)) = data.split_first() else {
        return Verdict::Rejected("empty".to_owned());
    };
    let checked = match kind % 11 {
        0 => decode(bytes, checkpoint),
        1 => decode(bytes, |r: pb::RestoreRequest| {
            named(&r.checkpoint_ref)?;
            check::source_tier(&r.from_tier).map(drop)
        }),
        2 => decode(bytes, |r: pb::InspectRequest| named(&r.checkpoint_ref)),
        3 => decode(bytes, |r: pb::DeleteRequest| named(&r.checkpoint_ref)),
        4 => decode(bytes, |r: pb::PrefetchRequest| {
            named(&r.checkpoint_ref)?;
            check::prefetch_tier(&r.to_tier).map(drop)
        }),
        5 => decode(bytes, container_checkpoint_begin),
        6 => decode(bytes, |r: pb::ContainerCheckpointEndRequest| {
            named(&r.checkpoint_ref)
        }),
        7 => decode(bytes, |r: pb::ContainerRestoreStageRequest| {
            named(&r.checkpoint_ref)?;
            check::source_tier(&r.from_tier).map(drop)
        }),
        8 => decode(bytes, |r: pb::ContainerRestoreEndRequest| {
            named(&r.checkpoint_ref)
        }),
        9 => decode(bytes, |r: pb::PinRequest| {
            named(&r.checkpoint_ref)?;
            check::pin_tier(&r.tier).map(drop)
        }),
        _ => decode(bytes, |r: pb::UnpinRequest| named(&r.checkpoint_ref)),
    };
    match checked {
        Ok(verdict) => verdict,
        Err(e) => Verdict::Rejected(format!("not a request of type {}: {e}", kind % 11)),
    }
}

fn decode<M: Message + Default>(
    bytes: &[u8],
    check: impl FnOnce(M) -> Result<(), AgentError>,
) -> Result<Verdict, prost::DecodeError> {
    let message = M::decode(bytes)?;
    Ok(check(message).into())
}

fn checkpoint(r: pb::CheckpointRequest) -> Result<(), AgentError> {
    if let Some(name) = check::requested_name(&r.name)? {
        assert_safe(&name);
    }
    check::slowest_tier(&r.tier).map(drop)
}

fn container_checkpoint_begin(r: pb::ContainerCheckpointBeginRequest) -> Result<(), AgentError> {
    let (name, origin) = check::container_checkpoint_begin(&r)?;
    if let Some(name) = name {
        assert_safe(&name);
    }
    assert_eq!(origin.validate(), Ok(()), "an accepted origin is valid");
    Ok(())
}

fn named(checkpoint_ref: &str) -> Result<(), AgentError> {
    assert_safe(&check::checkpoint_ref(checkpoint_ref)?);
    Ok(())
}

fn assert_safe(name: &CheckpointName) {
    let s = name.as_str();
    assert!(
        !s.is_empty()
            && s != "."
            && s != ".."
            && !s.starts_with(['.', '-'])
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')),
        "accepted checkpoint name {s:?} is not one safe path component"
    );
}
