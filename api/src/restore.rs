//! `GpuRestore`: start a new pod from a completed checkpoint.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Condition, PhaseDuration};

/// Which checkpoint to restore and into what pod.
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "kybernate.io",
    version = "v1alpha1",
    kind = "GpuRestore",
    namespaced,
    status = "GpuRestoreStatus",
    shortname = "grs",
    category = "kybernate",
    printcolumn = r#"{"name":"Checkpoint","type":"string","jsonPath":".spec.checkpointName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Pod","type":"string","jsonPath":".status.podName"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.nodeName"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable; create a new GpuRestore"))]
#[serde(rename_all = "camelCase")]
pub struct GpuRestoreSpec {
    /// The GpuCheckpoint (same namespace) to restore.
    #[x_kube(validation = Rule::new("self.size() > 0").message("checkpointName must not be empty"))]
    pub checkpoint_name: String,
    /// Name of the new pod; `<restore name>-restored` when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// Pod template to use instead of the spec captured at checkpoint time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::preserve_unknown")]
    pub template: Option<PodTemplateSpec>,
    /// Extra node selector for the new pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Seconds until the new pod must be Running.
    #[serde(default = "default_restore_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_seconds: u32,
}

fn default_restore_timeout() -> u32 {
    900
}

/// Where a restore is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RestorePhase {
    /// Waiting for the checkpoint to complete.
    #[default]
    Pending,
    /// The pod exists and is being scheduled and restored.
    Restoring,
    /// The pod runs.
    Completed,
    /// Gave up; see the conditions.
    Failed,
}

impl RestorePhase {
    /// Completed or Failed.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed)
    }

    /// No writer has set a phase yet.
    pub fn is_pending(&self) -> bool {
        *self == Self::Pending
    }
}

/// What happened to a restore.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuRestoreStatus {
    /// Current phase. Pending is never written (see `GpuCheckpointStatus::phase`).
    #[serde(default, skip_serializing_if = "RestorePhase::is_pending")]
    pub phase: RestorePhase,
    /// The node the new pod landed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The new pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// When the pod was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// The agent's name of the stored checkpoint (the pod's `restore-from`), so the node's
    /// agent knows what to stage without reading the GpuCheckpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_ref: Option<String>,
    /// What the node's agent did to have the checkpoint near when the pod starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging: Option<RestoreStaging>,
    /// Durations per phase (`pod_running`: creation to Running).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseDuration>,
    /// Observations with reasons, one per type. A list-map keyed by `type`: the controller
    /// and the agent each apply only their own types and the API server merges them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// The agent's preparation of a restore: the checkpoint copied into a near tier ahead of
/// the pod's start, written by the agent of the labelled node (condition `Staged`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreStaging {
    /// The node whose agent staged it.
    pub node_name: String,
    /// The tier that now holds the checkpoint (`ram` or `nvme`).
    pub tier: String,
    /// Where the copy came from; absent when the tier held it already.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_tier: Option<String>,
    /// Durations of the staging phases (`load_s3`, `verify_ram`, `store_nvme`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseDuration>,
}

/// Condition type the agent sets once the checkpoint is staged on the restore's node.
pub const STAGED_CONDITION: &str = "Staged";

impl GpuRestore {
    /// The status phase, Pending without a status.
    pub fn phase(&self) -> RestorePhase {
        self.status.as_ref().map(|s| s.phase).unwrap_or_default()
    }
}
