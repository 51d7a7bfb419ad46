//! The GPU group and seat of a container, read from its OCI spec, and their check against
//! the GPUs the node really has. A checkpoint of a container that names a GPU the node lacks
//! is refused before anything is frozen.

use std::collections::BTreeSet;
use std::path::Path;

use oci_spec::runtime::Spec;

/// GPUs a container was given, from every place the OCI spec can name them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuPlacement {
    /// Entries of `NVIDIA_VISIBLE_DEVICES` (indices or `GPU-…` UUIDs), "all" kept as is.
    pub visible: Vec<String>,
    /// Devices named by CDI annotations (`cdi.k8s.io/*`: `nvidia.com/gpu=0`).
    pub cdi: Vec<String>,
    /// Minor numbers of `/dev/nvidiaN` device nodes in `linux.devices`.
    pub device_minors: Vec<u32>,
}

/// The node's GPUs as device nodes and UUIDs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeGpus {
    /// Indices N of `/dev/nvidiaN`.
    pub indices: BTreeSet<u32>,
    /// GPU UUIDs (`GPU-…`), when known.
    pub uuids: BTreeSet<String>,
}

impl NodeGpus {
    /// The GPUs whose device nodes exist under `dev` (normally `/dev`).
    pub fn probe(dev: &Path) -> Self {
        let mut indices = BTreeSet::new();
        if let Ok(entries) = std::fs::read_dir(dev) {
            for entry in entries.flatten() {
                if let Some(n) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("nvidia"))
                    .and_then(|n| n.parse::<u32>().ok())
                {
                    indices.insert(n);
                }
            }
        }
        Self {
            indices,
            uuids: BTreeSet::new(),
        }
    }
}

impl GpuPlacement {
    /// Reads the placement from an OCI spec (`config.json`).
    pub fn from_spec(spec: &Spec) -> Self {
        let mut placement = Self::default();
        let env = spec
            .process()
            .as_ref()
            .and_then(|p| p.env().as_ref())
            .into_iter()
            .flatten();
        for var in env {
            if let Some(list) = var.strip_prefix("NVIDIA_VISIBLE_DEVICES=") {
                placement.visible = list
                    .split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty() && !matches!(*d, "none" | "void"))
                    .map(str::to_owned)
                    .collect();
            }
        }
        let mut annotations: Vec<(&String, &String)> =
            spec.annotations().iter().flatten().collect();
        // Annotations are a map; sorted, the CDI devices come in a stable order.
        annotations.sort();
        for (key, list) in annotations {
            if !key.starts_with("cdi.k8s.io/") {
                continue;
            }
            placement.cdi.extend(
                list.split(',')
                    .map(str::trim)
                    .filter(|d| d.starts_with("nvidia.com/gpu="))
                    .map(str::to_owned),
            );
        }
        let devices = spec
            .linux()
            .as_ref()
            .and_then(|l| l.devices().as_ref())
            .into_iter()
            .flatten();
        for device in devices {
            let minor = device
                .path()
                .to_str()
                .and_then(|p| p.strip_prefix("/dev/nvidia"))
                .and_then(|n| n.parse::<u32>().ok());
            if let Some(n) = minor {
                placement.device_minors.push(n);
            }
        }
        placement
    }

    /// True when the container has no GPU at all.
    pub fn is_empty(&self) -> bool {
        self.visible.is_empty() && self.cdi.is_empty() && self.device_minors.is_empty()
    }

    /// Every GPU named, one canonical list (`0,1,GPU-…`), for the agent's `gpu_group`.
    pub fn group(&self) -> String {
        let mut names: BTreeSet<String> = self.visible.iter().cloned().collect();
        names.extend(
            self.cdi
                .iter()
                .filter_map(|d| d.strip_prefix("nvidia.com/gpu="))
                .map(str::to_owned),
        );
        names.extend(self.device_minors.iter().map(u32::to_string));
        names.into_iter().collect::<Vec<_>>().join(",")
    }

    /// Checks every named GPU against the node's; the error names each one it lacks.
    pub fn validate(&self, node: &NodeGpus) -> Result<(), String> {
        let mut missing = Vec::new();
        let mut check = |name: &str, source: &str| {
            if name == "all" {
                if node.indices.is_empty() {
                    missing.push(format!("{source} asks for all GPUs but the node has none"));
                }
            } else if let Ok(index) = name.parse::<u32>() {
                if !node.indices.contains(&index) {
                    missing.push(format!("{source} names GPU {index}"));
                }
            } else if name.starts_with("GPU-") {
                if !node.uuids.contains(name) {
                    missing.push(format!("{source} names GPU {name}"));
                }
            } else {
                missing.push(format!("{source} names an unrecognised GPU {name:?}"));
            }
        };
        for name in &self.visible {
            check(name, "NVIDIA_VISIBLE_DEVICES");
        }
        for device in &self.cdi {
            let name = device.strip_prefix("nvidia.com/gpu=").unwrap_or(device);
            check(name, "the CDI annotation");
        }
        for minor in &self.device_minors {
            check(&minor.to_string(), "device /dev/nvidia");
        }
        if missing.is_empty() {
            Ok(())
        } else {
            let have: Vec<String> = node.indices.iter().map(u32::to_string).collect();
            Err(format!(
                "{}, which this node lacks (node GPUs: [{}])",
                missing.join("; "),
                have.join(", ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn typed(value: serde_json::Value) -> Spec {
        serde_json::from_value(value).unwrap()
    }

    fn node(indices: &[u32]) -> NodeGpus {
        NodeGpus {
            indices: indices.iter().copied().collect(),
            uuids: ["GPU-aaaa".to_owned()].into_iter().collect(),
        }
    }

    #[test]
    fn placement_comes_from_env_cdi_and_devices() {
        let spec = typed(json!({
            "process": {"env": ["PATH=/bin", "NVIDIA_VISIBLE_DEVICES=0,GPU-aaaa"],
                        "user": {"uid": 0, "gid": 0}, "cwd": "/"},
            "annotations": {"cdi.k8s.io/nvidia": "nvidia.com/gpu=1", "other": "x"},
            "linux": {"devices": [
                {"path": "/dev/nvidia2", "type": "c", "major": 195, "minor": 2},
                {"path": "/dev/nvidiactl", "type": "c", "major": 195, "minor": 255},
                {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}]}
        }));
        let p = GpuPlacement::from_spec(&spec);
        assert_eq!(p.visible, vec!["0", "GPU-aaaa"]);
        assert_eq!(p.cdi, vec!["nvidia.com/gpu=1"]);
        assert_eq!(p.device_minors, vec![2]);
        assert_eq!(p.group(), "0,1,2,GPU-aaaa");
        assert!(p.validate(&node(&[0, 1, 2])).is_ok());
    }

    #[test]
    fn a_gpu_the_node_lacks_is_named() {
        let spec = typed(json!({
            "process": {"env": ["NVIDIA_VISIBLE_DEVICES=3"], "user": {"uid": 0, "gid": 0}, "cwd": "/"},
            "annotations": {"cdi.k8s.io/x": "nvidia.com/gpu=GPU-zzzz"}}));
        let e = GpuPlacement::from_spec(&spec)
            .validate(&node(&[0]))
            .unwrap_err();
        assert!(e.contains("NVIDIA_VISIBLE_DEVICES names GPU 3"), "{e}");
        assert!(e.contains("GPU-zzzz"), "{e}");
        assert!(e.contains("node GPUs: [0]"), "{e}");
    }

    #[test]
    fn none_and_void_mean_no_gpu() {
        let spec = typed(json!({
            "process": {"env": ["NVIDIA_VISIBLE_DEVICES=void"], "user": {"uid": 0, "gid": 0}, "cwd": "/"}}));
        assert!(GpuPlacement::from_spec(&spec).is_empty());
        assert!(GpuPlacement::from_spec(&typed(json!({}))).is_empty());
    }

    #[test]
    fn all_needs_at_least_one_gpu() {
        let spec = typed(json!({
            "process": {"env": ["NVIDIA_VISIBLE_DEVICES=all"], "user": {"uid": 0, "gid": 0}, "cwd": "/"}}));
        let p = GpuPlacement::from_spec(&spec);
        assert!(p.validate(&node(&[0])).is_ok());
        assert!(p.validate(&node(&[])).unwrap_err().contains("has none"));
    }

    #[test]
    fn probe_finds_numbered_device_nodes_only() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["nvidia0", "nvidia3", "nvidiactl", "nvidia-uvm"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let gpus = NodeGpus::probe(dir.path());
        assert_eq!(gpus.indices.into_iter().collect::<Vec<_>>(), vec![0, 3]);
    }
}
