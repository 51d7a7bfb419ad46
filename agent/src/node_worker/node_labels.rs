//! The labels the agent puts on its Node, so restores can require a compatible node.

use std::collections::BTreeMap;

use kybernate_api::{
    label_value, GpuFingerprintStatus, GPU_COUNT_LABEL, GPU_DRIVER_LABEL, GPU_MODEL_LABEL,
};
use kybernate_cuda::GpuFingerprint;

use kybernate_api::AGENT_READY_LABEL;

/// Node labels for `gpus` (`None`: no CUDA driver); a `None` value is a label the node must
/// not carry. A node without GPUs still gets `gpu-count=0`, so CPU-only checkpoints can
/// require a node with an agent.
pub fn node_labels(gpus: Option<&GpuFingerprint>) -> BTreeMap<String, Option<String>> {
    let status = fingerprint_status(gpus);
    let mut labels = BTreeMap::new();
    labels.insert(AGENT_READY_LABEL.to_owned(), Some("ready".to_owned()));
    labels.insert(GPU_COUNT_LABEL.to_owned(), Some(status.count.to_string()));
    labels.insert(
        GPU_DRIVER_LABEL.to_owned(),
        Some(status.driver_version.to_string()),
    );
    // No model: the label is left out of the agent's apply, which removes one it set before.
    labels.insert(
        GPU_MODEL_LABEL.to_owned(),
        (!status.model.is_empty()).then_some(status.model),
    );
    labels
}

/// The fingerprint in the shape of the CRD status and the labels.
pub fn fingerprint_status(gpus: Option<&GpuFingerprint>) -> GpuFingerprintStatus {
    let Some(gpus) = gpus else {
        return GpuFingerprintStatus::default();
    };
    GpuFingerprintStatus {
        driver_version: gpus.driver_version,
        model: gpus
            .devices
            .first()
            .map(|d| label_value(&d.name))
            .unwrap_or_default(),
        count: u32::try_from(gpus.devices.len()).unwrap_or(u32::MAX),
        memory_mib: gpus
            .devices
            .iter()
            .map(|d| d.total_memory / (1024 * 1024))
            .min()
            .unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kybernate_cuda::{GpuDevice, GpuUuid};

    #[test]
    fn labels_carry_model_driver_and_count() {
        let gpus = GpuFingerprint {
            driver_version: 12080,
            devices: vec![
                GpuDevice {
                    uuid: GpuUuid([1; 16]),
                    name: "NVIDIA H100 80GB HBM3".into(),
                    total_memory: 80 << 30,
                };
                2
            ],
        };
        let labels = node_labels(Some(&gpus));
        assert_eq!(
            labels[GPU_MODEL_LABEL].as_deref(),
            Some("NVIDIA-H100-80GB-HBM3")
        );
        assert_eq!(labels[GPU_DRIVER_LABEL].as_deref(), Some("12080"));
        assert_eq!(labels[GPU_COUNT_LABEL].as_deref(), Some("2"));
        assert_eq!(fingerprint_status(Some(&gpus)).memory_mib, 80 << 10);
    }

    #[test]
    fn a_node_without_gpus_says_so() {
        let labels = node_labels(None);
        assert_eq!(labels[GPU_COUNT_LABEL].as_deref(), Some("0"));
        assert_eq!(labels[GPU_MODEL_LABEL], None);
        assert_eq!(labels[AGENT_READY_LABEL].as_deref(), Some("ready"));
    }
}
