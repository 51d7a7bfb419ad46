//! `containerd-shim-kybernate-v1 -info`: the runtime's introspection answer (containerd 2.x
//! asks for it), with runc's features and checkpoint/restore reported as supported.

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::types::introspection::{RuntimeInfo, RuntimeVersion};

/// The annotation runc features use to announce checkpoint/restore.
pub const CHECKPOINT_FEATURE: &str = "org.opencontainers.runc.checkpoint.enabled";

/// runc's `features` JSON with the checkpoint feature set to true.
pub fn features_with_checkpoint(runc_features: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    let mut features: serde_json::Value = if runc_features.is_empty() {
        serde_json::json!({})
    } else {
        serde_json::from_slice(runc_features)?
    };
    if let Some(object) = features.as_object_mut() {
        let annotations = object
            .entry("annotations")
            .or_insert_with(|| serde_json::json!({}));
        if let Some(map) = annotations.as_object_mut() {
            map.insert(CHECKPOINT_FEATURE.into(), "true".into());
        }
    }
    serde_json::to_vec(&features)
}

/// The RuntimeInfo message (protobuf bytes) for `-info`.
pub fn runtime_info(runc: &std::path::Path) -> Result<Vec<u8>, String> {
    let output = std::process::Command::new(runc)
        .arg("features")
        .output()
        .map_err(|e| format!("run {} features: {e}", runc.display()))?;
    let features = features_with_checkpoint(&output.stdout)
        .map_err(|e| format!("{} features printed no JSON: {e}", runc.display()))?;
    let info = RuntimeInfo {
        name: crate::shim::RUNTIME_TYPE.to_owned(),
        version: MessageField::some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        }),
        features: MessageField::some(Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/features/Features".into(),
            value: features,
            ..Default::default()
        }),
        ..Default::default()
    };
    info.write_to_bytes().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_is_announced_even_when_runc_omits_it() {
        let out = features_with_checkpoint(br#"{"ociVersionMin":"1.0.0","annotations":{"x":"y"}}"#)
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["annotations"][CHECKPOINT_FEATURE], "true");
        assert_eq!(v["annotations"]["x"], "y");
        assert_eq!(v["ociVersionMin"], "1.0.0");
        let empty: serde_json::Value =
            serde_json::from_slice(&features_with_checkpoint(b"").unwrap()).unwrap();
        assert_eq!(empty["annotations"][CHECKPOINT_FEATURE], "true");
        assert!(features_with_checkpoint(b"not json").is_err());
    }
}
