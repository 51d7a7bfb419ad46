//! `GpuCheckpoint`: checkpoint one pod (or one of its containers) on its node.

use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Condition, GpuFingerprintStatus, PhaseDuration};

/// What to checkpoint and how far to take it.
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "kybernate.io",
    version = "v1alpha1",
    kind = "GpuCheckpoint",
    namespaced,
    status = "GpuCheckpointStatus",
    shortname = "gcp",
    category = "kybernate",
    printcolumn = r#"{"name":"Pod","type":"string","jsonPath":".spec.podName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.nodeName"}"#,
    printcolumn = r#"{"name":"Stored","type":"integer","jsonPath":".status.storedBytes"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable; create a new GpuCheckpoint"))]
#[serde(rename_all = "camelCase")]
pub struct GpuCheckpointSpec {
    /// The pod to checkpoint, in the object's namespace.
    #[x_kube(validation = Rule::new("self.size() > 0 && self.size() <= 253").message("podName must be a pod name"))]
    pub pod_name: String,
    /// One container of the pod; all containers when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The tier the checkpoint must reach before it counts as Completed.
    #[serde(default)]
    pub storage_tier: StorageTier,
    /// Keep the workload running after the dump (`true`) or stop it (`false`).
    #[serde(default)]
    pub leave_running: bool,
    /// Per-phase and overall timeouts.
    #[serde(default)]
    pub timeouts: CheckpointTimeouts,
    /// Labels copied to the stored checkpoint, used by retention.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub retention_labels: std::collections::BTreeMap<String, String>,
}

/// Storage tiers, nearest first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum StorageTier {
    /// Host RAM (tmpfs): fastest, lost on reboot.
    #[serde(rename = "ram")]
    Ram,
    /// Local NVMe.
    #[default]
    #[serde(rename = "nvme")]
    Nvme,
    /// S3-compatible object storage: survives the node.
    #[serde(rename = "s3")]
    S3,
}

impl StorageTier {
    /// The tier name the agent uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ram => "ram",
            Self::Nvme => "nvme",
            Self::S3 => "s3",
        }
    }
}

/// Timeouts in seconds; the agent applies the phase ones, the controller the overall one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("self.overallSeconds >= self.dumpSeconds").message("overallSeconds must cover dumpSeconds"))]
#[serde(rename_all = "camelCase")]
pub struct CheckpointTimeouts {
    /// Freeze + dump (CUDA lock, CUDA checkpoint, CRIU dump).
    #[schemars(range(min = 1, max = 86400))]
    pub dump_seconds: u32,
    /// From the object's scheduling to Completed, including draining to the tier.
    #[schemars(range(min = 1, max = 86400))]
    pub overall_seconds: u32,
}

impl Default for CheckpointTimeouts {
    fn default() -> Self {
        Self {
            dump_seconds: 300,
            overall_seconds: 1800,
        }
    }
}

/// Where a checkpoint is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum CheckpointPhase {
    /// Accepted, not yet resolved to a node.
    #[default]
    Pending,
    /// Resolved and labelled for the node's agent.
    Scheduled,
    /// The agent is freezing and dumping the workload.
    Checkpointing,
    /// The dump is done; data moves to the requested tier.
    Draining,
    /// Stored in the requested tier.
    Completed,
    /// Gave up; see the conditions.
    Failed,
}

impl CheckpointPhase {
    /// Completed or Failed: nothing more happens.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed)
    }

    /// No writer has set a phase yet.
    pub fn is_pending(&self) -> bool {
        *self == Self::Pending
    }
}

/// What happened to a checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuCheckpointStatus {
    /// Current phase. Pending is never written: it is what an object without a phase is,
    /// so an apply that leaves the phase to the other writer carries none.
    #[serde(default, skip_serializing_if = "CheckpointPhase::is_pending")]
    pub phase: CheckpointPhase,
    /// The node the pod runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The pod's UID at resolution time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// Containers to checkpoint: name and runtime ID.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<TargetContainer>,
    /// When the controller scheduled it (start of the overall timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_at: Option<Time>,
    /// When it reached Completed or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// Durations per phase.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseDuration>,
    /// Bytes dumped (the agent's; 0 is left out so the controller's applies carry none).
    #[serde(default, skip_serializing_if = "super::common::is_zero")]
    pub raw_bytes: u64,
    /// Bytes stored after zero-skipping and compression.
    #[serde(default, skip_serializing_if = "super::common::is_zero")]
    pub stored_bytes: u64,
    /// The GPUs the workload used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuFingerprintStatus>,
    /// Tiers holding the checkpoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tiers: Vec<String>,
    /// The agent's name for the stored checkpoint (what `restore-from` points at).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_ref: Option<String>,
    /// The pod spec that was captured, for restores without a template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::preserve_unknown")]
    pub captured_pod_spec: Option<PodSpec>,
    /// Observations with reasons, one per type. A list-map keyed by `type`: the controller
    /// and the agent each apply only their own types and the API server merges them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// A container of the target pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetContainer {
    /// Container name in the pod spec.
    pub name: String,
    /// Runtime ID without the `containerd://` prefix.
    pub container_id: String,
}

impl GpuCheckpoint {
    /// The status phase, Pending when no status exists yet.
    pub fn phase(&self) -> CheckpointPhase {
        self.status.as_ref().map(|s| s.phase).unwrap_or_default()
    }
}
