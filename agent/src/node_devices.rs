//! The node's GPUs as device nodes (`/dev/nvidiaN`), reported to the shim so that it can
//! check a container's GPU placement before freezing anything.

use std::path::Path;

use kybernate_proto::agent::v1 as pb;

/// Every `nvidiaN` device node under `dev`, sorted.
pub fn probe(dev: &Path) -> pb::NodeDevicesReply {
    let mut gpu_indices: Vec<u32> = std::fs::read_dir(dev)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("nvidia")?
                .parse::<u32>()
                .ok()
        })
        .collect();
    gpu_indices.sort_unstable();
    pb::NodeDevicesReply {
        gpu_indices,
        gpu_uuids: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_numbered_nvidia_nodes_count() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["nvidia1", "nvidia0", "nvidiactl", "nvidia-uvm", "null"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        assert_eq!(probe(dir.path()).gpu_indices, vec![0, 1]);
        assert!(probe(&dir.path().join("missing")).gpu_indices.is_empty());
    }
}
