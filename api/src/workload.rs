//! `GpuWorkload`: a pod template plus a checkpoint and restore policy.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::checkpoint::StorageTier;
use super::common::Condition;

/// Condition type set on a GpuWorkload whose `spec.schedule.cron` does not parse.
pub const SCHEDULE_INVALID_CONDITION: &str = "ScheduleInvalid";

/// The workload and its policy.
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "kybernate.io",
    version = "v1alpha1",
    kind = "GpuWorkload",
    namespaced,
    status = "GpuWorkloadStatus",
    shortname = "gwl",
    category = "kybernate",
    printcolumn = r#"{"name":"Pod","type":"string","jsonPath":".status.podName"}"#,
    printcolumn = r#"{"name":"Latest","type":"string","jsonPath":".status.latestCheckpoint"}"#,
    printcolumn = r#"{"name":"Restores","type":"integer","jsonPath":".status.restores"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct GpuWorkloadSpec {
    /// The pod to run (runtimeClassName is forced to `kybernate`).
    #[schemars(schema_with = "crate::preserve_unknown")]
    pub template: PodTemplateSpec,
    /// When to checkpoint.
    pub schedule: CheckpointSchedule,
    /// Which checkpoints to keep.
    #[serde(default)]
    pub retention: Retention,
    /// Recreate the pod from the latest completed checkpoint when it is evicted or deleted,
    /// or its node dies.
    #[serde(default = "yes")]
    pub restore_on_reschedule: bool,
    /// Tier each periodic checkpoint must reach.
    #[serde(default)]
    pub storage_tier: StorageTier,
}

fn yes() -> bool {
    true
}

/// Checkpoint schedule: a fixed interval or a cron expression, exactly one of them. The
/// schema cannot parse cron, so the controller validates it and reports an invalid one
/// with the condition `ScheduleInvalid`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.intervalSeconds) != has(self.cron)").message("set exactly one of intervalSeconds and cron"))]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSchedule {
    /// Seconds between checkpoints, counted from the last one's creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60, max = 2592000))]
    pub interval_seconds: Option<u32>,
    /// Five-field cron expression in UTC (`minute hour day-of-month month day-of-week`,
    /// e.g. `0 */6 * * *`); the next checkpoint is the first time it matches after the
    /// last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.size() > 0 && self.size() <= 128").message("cron must be a cron expression of at most 128 characters"))]
    pub cron: Option<String>,
}

/// How many checkpoints to keep. The latest completed one is always kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("self.keepLast >= 1").message("keepLast must keep at least one checkpoint"))]
#[serde(rename_all = "camelCase")]
pub struct Retention {
    /// Keep at most this many completed checkpoints.
    #[schemars(range(min = 1, max = 1000))]
    pub keep_last: u32,
    /// Delete completed checkpoints older than this (0 = no age limit).
    #[serde(default)]
    pub max_age_seconds: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            keep_last: 3,
            max_age_seconds: 0,
        }
    }
}

/// What the workload's controller observed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuWorkloadStatus {
    /// The current pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// The latest Completed GpuCheckpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_checkpoint: Option<String>,
    /// When the latest periodic checkpoint was requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scheduled_at: Option<Time>,
    /// Pods recreated from a checkpoint so far.
    #[serde(default)]
    pub restores: u32,
    /// Pods created so far (fresh or restored); names the next pod `<name>-<podsCreated>`.
    #[serde(default)]
    pub pods_created: u32,
    /// Observations with reasons, one per type. A list-map keyed by `type`: the controller
    /// and the agent each apply only their own types and the API server merges them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
