//! Status pieces shared by the three kinds: conditions, phase durations, the GPU fingerprint.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One observation about an object, in the Kubernetes condition shape, so `kubectl describe`
/// and `kubectl wait --for=condition=...` work on our kinds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Ready` or `Failed`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A machine-readable CamelCase reason, e.g. `PodNotFound`.
    pub reason: String,
    /// What happened, for people.
    pub message: String,
    /// When the condition last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
}

impl Condition {
    /// A `True` condition of `type_` with a reason and message.
    pub fn new(type_: &str, reason: &str, message: impl Into<String>, now: Time) -> Self {
        Self {
            type_: type_.into(),
            status: "True".into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: Some(now),
        }
    }
}

/// Condition type of a failure, written by whichever writer gave up (the controller for
/// scheduling, timeouts and lost pods; the agent for failed dumps and missing checkpoints).
pub const FAILED_CONDITION: &str = "Failed";

/// `serde` helper: leave a zero counter out of an apply, so it stays the other writer's.
pub(crate) fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// How long one phase took, as the agent measured it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PhaseDuration {
    /// Phase name (`cuda_lock`, `criu_dump`, `store_nvme`, ...).
    pub phase: String,
    /// Milliseconds.
    pub millis: u64,
}

/// The GPUs a checkpoint ran on, in the shape the node labels use, so a restore can pick
/// a compatible node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuFingerprintStatus {
    /// CUDA driver version (`cuDriverGetVersion`, e.g. 12080); 0 = no GPU driver.
    pub driver_version: i32,
    /// GPU model (label-safe form of the device name); empty without GPUs.
    #[serde(default)]
    pub model: String,
    /// Number of GPUs the workload used.
    pub count: u32,
    /// Memory of the smallest of those GPUs in MiB.
    #[serde(default)]
    pub memory_mib: u64,
}

/// Node label with the GPU model.
pub const GPU_MODEL_LABEL: &str = "kybernate.io/gpu-model";
/// Node label with the CUDA driver version.
pub const GPU_DRIVER_LABEL: &str = "kybernate.io/gpu-driver";
/// Node label with the GPU count.
pub const GPU_COUNT_LABEL: &str = "kybernate.io/gpu-count";
/// Node label saying the agent (and so the `kybernate` runtime) is ready on the node
/// (value `ready`); the RuntimeClass schedules onto it.
pub const AGENT_READY_LABEL: &str = "kybernate.io/agent";
/// Label naming the node whose agent executes an object.
pub const NODE_LABEL: &str = "kybernate.io/node";
/// The well-known node label with the node's name, to pin a pod to one node.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";
/// Label naming the GpuWorkload that owns a pod or checkpoint.
pub const WORKLOAD_LABEL: &str = "kybernate.io/workload";
/// Label on the pods the controller creates (value `kybernate-controller`), so its pod
/// watches select only those.
pub const MANAGED_BY_LABEL: &str = "kybernate.io/managed-by";
/// Pod annotation the shim reads (in the OCI spec, where CRI copies it) to restore the
/// container from the named checkpoint instead of starting it.
pub const RESTORE_FROM_ANNOTATION: &str = "kybernate.io/restore-from";
/// The RuntimeClass (and containerd handler) of pods Kybernate can checkpoint.
pub const RUNTIME_CLASS: &str = "kybernate";
/// Finalizer the controller holds while a checkpoint is still referenced.
pub const REFERENCED_FINALIZER: &str = "kybernate.io/referenced";
/// Finalizer the agent holds until it has deleted the stored artifacts.
pub const ARTIFACTS_FINALIZER: &str = "kybernate.io/artifacts";

/// Turns a GPU device name into a label value (`NVIDIA H100 80GB HBM3` → `NVIDIA-H100-80GB-HBM3`).
pub fn label_value(raw: &str) -> String {
    let mut out: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    out.truncate(63);
    out.trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}
