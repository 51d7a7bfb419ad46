//! Checkpoint records on tiers other nodes read (S3), so a checkpoint taken on one node can be
//! restored on another: the taking node publishes its record beside the copy, and a node asked
//! for a checkpoint its own catalog lacks adopts the record from there.

use kybernate_dataplane::CheckpointName;

use crate::catalog::{self, CatalogError, CheckpointRecord};
use crate::error::AgentError;
use crate::node_parts::NodeParts;
use crate::tiers::{GetRecord, PutRecord};

/// Hands `record` to every tier; the ones other nodes read keep it. A failure is logged and
/// counted, never fatal: the checkpoint itself is safe, only its restore elsewhere is not.
pub async fn publish(parts: &NodeParts, record: &CheckpointRecord) {
    let bytes = match serde_json::to_vec(record) {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::error!(checkpoint = %record.name, error = %e, "cannot serialise the record to share it");
            return;
        }
    };
    let Ok(name) = CheckpointName::new(&record.name) else {
        return;
    };
    for (kind, tier) in &parts.tiers.actors {
        let sent = tier
            .send(PutRecord {
                name: name.clone(),
                record: bytes.clone(),
            })
            .await;
        let (problem, reason) = match sent {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => (e.to_string(), e.metric_label()),
            Err(e) => (e.to_string(), "internal"),
        };
        parts
            .metrics
            .failure("share_record", &format!("put_record_{kind}"), reason);
        tracing::error!(checkpoint = %name, tier = %kind, %problem,
            "could not share the checkpoint's record; other nodes cannot restore it until it is taken again");
    }
}

/// The record of `name` from the nearest tier that keeps one, checked like a record file.
/// [`AgentError::NotFound`] when no tier has it.
pub async fn fetch(
    parts: &NodeParts,
    name: &CheckpointName,
) -> Result<CheckpointRecord, AgentError> {
    for (kind, tier) in &parts.tiers.actors {
        let kept = tier
            .send(GetRecord(name.clone()))
            .await?
            .map_err(|source| AgentError::Tier {
                name: name.to_string(),
                phase: format!("find_record_{kind}"),
                source: Box::new(source),
            })?;
        let Some(bytes) = kept else {
            continue;
        };
        let corrupt = |detail: String| {
            AgentError::Catalog(CatalogError::SharedCorrupt {
                tier: *kind,
                name: name.to_string(),
                detail,
            })
        };
        let record = decode_shared(name, &bytes).map_err(corrupt)?;
        tracing::info!(checkpoint = %name, tier = %kind, "adopted the record of a checkpoint taken on another node");
        return Ok(record);
    }
    Err(AgentError::NotFound(name.to_string()))
}

/// Reads the record a shared tier keeps for `name`: checked like a record file, it must name
/// `name` and state its origin. Pure, so the fuzz targets run it too.
pub fn decode_shared(name: &CheckpointName, bytes: &[u8]) -> Result<CheckpointRecord, String> {
    let (named, record) = catalog::decode(bytes)?;
    if &named != name {
        return Err(format!("it names checkpoint {named}"));
    }
    // Another node wrote it: who may restore it must be stated, never assumed.
    let stated =
        serde_json::from_slice::<serde_json::Value>(bytes).is_ok_and(|v| v.get("origin").is_some());
    if !stated {
        return Err("its origin is missing".to_owned());
    }
    Ok(record)
}
