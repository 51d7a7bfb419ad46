//! The restore gate: before anything is locked or CRIU runs on the target node, the
//! facts a checkpoint recorded are compared with the node's, and every fact that does
//! not fit gives one reason. The agent reports the same node facts so that a
//! controller can pick a node that fits.

use crate::driver::{GpuDevice, GpuPair};
use crate::error::CudaError;
use crate::fingerprint::{plan_restore, GpuFingerprint};
use crate::mode::CheckpointMode;

/// What a checkpoint records about its GPUs, beyond the fingerprint.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecordedGpu {
    /// Driver API version and the GPUs used.
    pub fingerprint: GpuFingerprint,
    /// The driver release (`615.20.04`), when NVML told it.
    pub driver_release: Option<String>,
    /// How the VRAM was saved.
    pub mode: CheckpointMode,
    /// GPU memory the workload held on each recorded GPU, in bytes (same order as
    /// `fingerprint.devices`); empty when unknown.
    pub used: Vec<u64>,
}

/// A node's GPU facts, as its agent sees them now.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeGpuFacts {
    /// Driver API version (`cuDriverGetVersion`), `None` without a driver.
    pub driver_version: Option<i32>,
    /// Driver release, when known.
    pub driver_release: Option<String>,
    /// The GPUs, in ordinal order.
    pub devices: Vec<GpuDevice>,
    /// Free bytes of each GPU, when known.
    pub free_memory: Option<Vec<u64>>,
    /// Whether custom-storage restores can run here.
    pub custom_storage: bool,
}

/// How strict the gate is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GatePolicy {
    /// Accept another driver branch (e.g. 580 → 615). Off by default: the checkpoint
    /// format is only promised within a branch.
    pub allow_other_branch: bool,
    /// Accept an older patch level of the same branch.
    pub allow_older_patch: bool,
    /// Free GPU memory required beyond the recorded usage, per GPU.
    pub free_margin: u64,
}

impl Default for GatePolicy {
    fn default() -> Self {
        GatePolicy {
            allow_other_branch: false,
            allow_older_patch: false,
            free_margin: 256 * 1024 * 1024,
        }
    }
}

fn mib(bytes: u64) -> u64 {
    bytes / (1024 * 1024)
}

/// `615.20.04` → (615, [20, 4]); `None` when it does not parse.
fn parse_release(text: &str) -> Option<(u32, Vec<u32>)> {
    let mut parts = text.trim().split('.');
    let branch = parts.next()?.parse().ok()?;
    let rest = parts
        .map(|p| p.parse().ok())
        .collect::<Option<Vec<u32>>>()?;
    Some((branch, rest))
}

fn driver_reasons(recorded: &RecordedGpu, node: &NodeGpuFacts, policy: &GatePolicy) -> Vec<String> {
    let Some(version) = node.driver_version else {
        return vec![format!(
            "driver: the checkpoint used {} GPU(s) but this node has no CUDA driver",
            recorded.fingerprint.devices.len()
        )];
    };
    let releases = (
        recorded.driver_release.as_deref().and_then(parse_release),
        node.driver_release.as_deref().and_then(parse_release),
    );
    if let (Some((rec_branch, rec_patch)), Some((node_branch, node_patch))) = releases {
        let (rec_text, node_text) = (
            recorded.driver_release.as_deref().unwrap_or_default(),
            node.driver_release.as_deref().unwrap_or_default(),
        );
        if rec_branch != node_branch && !policy.allow_other_branch {
            return vec![format!(
                "driver: this node runs branch {node_branch} ({node_text}) but the checkpoint \
                 was made on branch {rec_branch} ({rec_text})"
            )];
        }
        if rec_branch == node_branch && node_patch < rec_patch && !policy.allow_older_patch {
            return vec![format!(
                "driver: {node_text} on this node is older than {rec_text} recorded at checkpoint"
            )];
        }
        return Vec::new();
    }
    if version < recorded.fingerprint.driver_version {
        return vec![format!(
            "driver: API version {version} on this node is older than {} recorded at checkpoint",
            recorded.fingerprint.driver_version
        )];
    }
    Vec::new()
}

fn device_reasons(recorded: &GpuFingerprint, node: &NodeGpuFacts) -> Vec<String> {
    let mut reasons = Vec::new();
    let (want, have) = (recorded.devices.len(), node.devices.len());
    if have < want {
        reasons.push(format!(
            "GPU count: the checkpoint used {want} GPU(s), this node has {have}"
        ));
    }
    for (i, rec) in recorded.devices.iter().enumerate() {
        let same_model: Vec<&GpuDevice> =
            node.devices.iter().filter(|d| d.name == rec.name).collect();
        if same_model.is_empty() {
            reasons.push(format!(
                "GPU model: recorded GPU #{i} is {:?}; this node has none",
                rec.name
            ));
        } else if same_model.iter().all(|d| d.total_memory < rec.total_memory) {
            reasons.push(format!(
                "GPU memory: recorded GPU #{i} ({:?}) had {} MiB; this node's have at most {} MiB",
                rec.name,
                mib(rec.total_memory),
                same_model
                    .iter()
                    .map(|d| mib(d.total_memory))
                    .max()
                    .unwrap_or(0)
            ));
        }
    }
    reasons
}

fn free_reasons(
    recorded: &RecordedGpu,
    node: &NodeGpuFacts,
    pairs: &[GpuPair],
    margin: u64,
) -> Vec<String> {
    let Some(free) = &node.free_memory else {
        return if recorded.used.is_empty() {
            Vec::new()
        } else {
            vec!["free GPU memory: this node cannot report it (no NVML)".into()]
        };
    };
    let mut reasons = Vec::new();
    for (i, (rec, used)) in recorded
        .fingerprint
        .devices
        .iter()
        .zip(&recorded.used)
        .enumerate()
    {
        let target = pairs
            .iter()
            .find(|p| p.old == rec.uuid)
            .map_or(rec.uuid, |p| p.new);
        let Some(index) = node.devices.iter().position(|d| d.uuid == target) else {
            continue;
        };
        let available = free.get(index).copied().unwrap_or(0);
        let needed = used.saturating_add(margin);
        if available < needed {
            reasons.push(format!(
                "free GPU memory: GPU {target} (for recorded GPU #{i}) has {} MiB free; the \
                 restore needs {} MiB ({} MiB recorded usage + {} MiB margin)",
                mib(available),
                mib(needed),
                mib(*used),
                mib(margin)
            ));
        }
    }
    reasons
}

/// Checks `recorded` against `node` and returns the UUID pairs for the restore, or
/// [`CudaError::Refused`] with one reason per failing fact: driver, checkpoint mode,
/// GPU count, model, total memory, free memory.
pub fn check_gate(
    recorded: &RecordedGpu,
    node: &NodeGpuFacts,
    policy: &GatePolicy,
) -> Result<Vec<GpuPair>, CudaError> {
    if recorded.fingerprint.devices.is_empty() {
        return Ok(Vec::new());
    }
    let mut reasons = driver_reasons(recorded, node, policy);
    if recorded.mode == CheckpointMode::CustomStorage && !node.custom_storage {
        reasons.push(
            "checkpoint mode: the checkpoint was made with custom storage, which this node \
             does not offer (driver branch 615 / CUDA 13.4 or newer, custom_storage not \"off\")"
                .into(),
        );
    }
    let device_problems = device_reasons(&recorded.fingerprint, node);
    let no_device_problems = device_problems.is_empty();
    reasons.extend(device_problems);
    let mut pairs = Vec::new();
    if no_device_problems && node.driver_version.is_some() {
        let current = GpuFingerprint {
            driver_version: node.driver_version.unwrap_or_default(),
            devices: node.devices.clone(),
        };
        match plan_restore(&recorded.fingerprint, Some(&current)) {
            Ok(found) => pairs = found,
            Err(e) => reasons.push(format!("GPU assignment: {e}")),
        }
        reasons.extend(free_reasons(recorded, node, &pairs, policy.free_margin));
    }
    if reasons.is_empty() {
        Ok(pairs)
    } else {
        Err(CudaError::Refused { reasons })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::GpuUuid;

    const GIB: u64 = 1 << 30;

    fn gpu(byte: u8, name: &str, gib: u64) -> GpuDevice {
        GpuDevice {
            uuid: GpuUuid([byte; 16]),
            name: name.into(),
            total_memory: gib * GIB,
        }
    }

    fn recorded() -> RecordedGpu {
        RecordedGpu {
            fingerprint: GpuFingerprint {
                driver_version: 13040,
                devices: vec![gpu(1, "H100", 80), gpu(2, "H100", 80)],
            },
            driver_release: Some("615.20.04".into()),
            mode: CheckpointMode::CustomStorage,
            used: vec![40 * GIB, 10 * GIB],
        }
    }

    fn node() -> NodeGpuFacts {
        NodeGpuFacts {
            driver_version: Some(13040),
            driver_release: Some("615.20.04".into()),
            devices: vec![gpu(1, "H100", 80), gpu(2, "H100", 80)],
            free_memory: Some(vec![80 * GIB, 80 * GIB]),
            custom_storage: true,
        }
    }

    fn refusal(node: &NodeGpuFacts) -> Vec<String> {
        match check_gate(&recorded(), node, &GatePolicy::default()) {
            Err(CudaError::Refused { reasons }) => reasons,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_fitting_node_passes() {
        assert_eq!(
            check_gate(&recorded(), &node(), &GatePolicy::default()).unwrap(),
            vec![]
        );
    }

    #[test]
    fn each_failing_fact_gives_its_own_reason() {
        let mut older = node();
        older.driver_release = Some("615.10.01".into());
        let r = refusal(&older);
        assert!(
            r.len() == 1 && r[0].contains("older than 615.20.04"),
            "{r:?}"
        );

        let mut branch = node();
        branch.driver_release = Some("580.82.07".into());
        let r = refusal(&branch);
        assert!(r.len() == 1 && r[0].contains("branch 580"), "{r:?}");

        let mut mode = node();
        mode.custom_storage = false;
        let r = refusal(&mode);
        assert!(r.len() == 1 && r[0].starts_with("checkpoint mode"), "{r:?}");

        let mut fewer = node();
        fewer.devices.pop();
        fewer.free_memory = Some(vec![80 * GIB]);
        let r = refusal(&fewer);
        assert!(r.iter().any(|x| x.starts_with("GPU count")), "{r:?}");

        let mut model = node();
        model.devices = vec![gpu(1, "A100", 80), gpu(2, "A100", 80)];
        let r = refusal(&model);
        assert!(r.iter().any(|x| x.starts_with("GPU model")), "{r:?}");

        let mut small = node();
        small.devices = vec![gpu(1, "H100", 40), gpu(2, "H100", 40)];
        let r = refusal(&small);
        assert!(r.iter().any(|x| x.starts_with("GPU memory")), "{r:?}");

        let mut busy = node();
        busy.free_memory = Some(vec![30 * GIB, 80 * GIB]);
        let r = refusal(&busy);
        assert!(r.len() == 1 && r[0].starts_with("free GPU memory"), "{r:?}");
        assert!(r[0].contains("recorded GPU #0"), "{r:?}");
    }

    #[test]
    fn several_failures_are_all_named() {
        let mut bad = node();
        bad.driver_release = Some("615.01.01".into());
        bad.custom_storage = false;
        bad.free_memory = Some(vec![GIB, GIB]);
        let r = refusal(&bad);
        assert_eq!(r.len(), 4, "{r:?}");
    }

    #[test]
    fn policy_can_accept_an_older_patch() {
        let mut older = node();
        older.driver_release = Some("615.10.01".into());
        let policy = GatePolicy {
            allow_older_patch: true,
            ..GatePolicy::default()
        };
        assert!(check_gate(&recorded(), &older, &policy).is_ok());
    }

    #[test]
    fn no_driver_is_refused() {
        let mut none = node();
        none.driver_version = None;
        let r = refusal(&none);
        assert!(r[0].contains("no CUDA driver"), "{r:?}");
    }

    #[test]
    fn record_round_trips_through_json() {
        let text = serde_json::to_string(&recorded()).unwrap();
        assert!(text.contains("\"custom_storage\""), "{text}");
        assert_eq!(
            serde_json::from_str::<RecordedGpu>(&text).unwrap(),
            recorded()
        );
    }
}
