//! Builders for test objects: checkpoints, restores, workloads, pods and nodes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerStatus, Node, Pod, PodSpec, PodStatus, PodTemplateSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::Value;

use kybernate_api::*;

/// The fixed "now" of every test.
pub fn now() -> Timestamp {
    "2026-01-01T12:00:00Z".parse().expect("timestamp")
}

/// `now - seconds`.
pub fn ago(seconds: i64) -> Time {
    Time(now() - SignedDuration::from_secs(seconds))
}

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some("default".into()),
        uid: Some(format!("uid-{name}")),
        resource_version: Some("7".into()),
        creation_timestamp: Some(ago(1000)),
        ..ObjectMeta::default()
    }
}

/// Serializes a fixture for a reply.
pub fn json<T: serde::Serialize>(obj: &T) -> Value {
    serde_json::to_value(obj).expect("fixture JSON")
}

/// Test objects of `GpuCheckpoint` (the type lives in the api crate).
pub trait CheckpointFixture {
    /// A new checkpoint of pod `train`, already carrying the controller's finalizer.
    fn test(name: &str) -> Self;
    /// Sets the phase (and node) as the controller or agent would have.
    fn in_phase(self, phase: CheckpointPhase, node: &str, scheduled_ago: i64) -> Self;
    /// A Completed checkpoint created `created_ago` seconds ago, restorable.
    fn completed(name: &str, created_ago: i64) -> Self;
    /// Marked for deletion.
    fn deleting(self) -> Self;
}

impl CheckpointFixture for GpuCheckpoint {
    fn test(name: &str) -> Self {
        let mut cp = GpuCheckpoint::new(
            name,
            GpuCheckpointSpec {
                pod_name: "train".into(),
                ..GpuCheckpointSpec::default()
            },
        );
        cp.metadata = meta(name);
        cp.metadata.finalizers = Some(vec![REFERENCED_FINALIZER.into()]);
        cp
    }

    fn in_phase(mut self, phase: CheckpointPhase, node: &str, scheduled_ago: i64) -> Self {
        self.metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(NODE_LABEL.into(), node.into());
        let status = self.status.get_or_insert_with(Default::default);
        status.phase = phase;
        status.node_name = Some(node.into());
        status.scheduled_at = Some(ago(scheduled_ago));
        self
    }

    fn completed(name: &str, created_ago: i64) -> Self {
        let mut cp = Self::test(name).in_phase(CheckpointPhase::Completed, "n1", created_ago);
        cp.metadata.creation_timestamp = Some(ago(created_ago));
        let status = cp.status.get_or_insert_with(Default::default);
        status.artifact_ref = Some(format!("default-{name}"));
        status.tiers = vec!["ram".into(), "nvme".into(), "s3".into()];
        status.captured_pod_spec = Some(pod_spec());
        status.gpu = Some(GpuFingerprintStatus {
            driver_version: 12080,
            model: "NVIDIA-H100".into(),
            count: 2,
            memory_mib: 81559,
        });
        cp
    }

    fn deleting(mut self) -> Self {
        self.metadata.deletion_timestamp = Some(ago(1));
        self
    }
}

/// Test objects of `GpuRestore`.
pub trait RestoreFixture {
    /// A restore of checkpoint `cp`.
    fn test(name: &str, cp: &str) -> Self;
}

impl RestoreFixture for GpuRestore {
    fn test(name: &str, cp: &str) -> Self {
        let mut r = GpuRestore::new(
            name,
            GpuRestoreSpec {
                checkpoint_name: cp.into(),
                timeout_seconds: 900,
                ..GpuRestoreSpec::default()
            },
        );
        r.metadata = meta(name);
        r
    }
}

/// Test objects of `GpuWorkload`.
pub trait WorkloadFixture {
    /// A workload checkpointing every 600 s, keeping `keep_last`.
    fn test(name: &str, keep_last: u32) -> Self;
}

impl WorkloadFixture for GpuWorkload {
    fn test(name: &str, keep_last: u32) -> Self {
        let mut w = GpuWorkload::new(
            name,
            GpuWorkloadSpec {
                template: PodTemplateSpec {
                    metadata: None,
                    spec: Some(pod_spec()),
                },
                schedule: CheckpointSchedule {
                    interval_seconds: Some(600),
                    cron: None,
                },
                retention: Retention {
                    keep_last,
                    max_age_seconds: 0,
                },
                restore_on_reschedule: true,
                storage_tier: StorageTier::Nvme,
            },
        );
        w.metadata = meta(name);
        w
    }
}

/// The workload's container spec.
pub fn pod_spec() -> PodSpec {
    PodSpec {
        containers: vec![Container {
            name: "trainer".into(),
            image: Some("example/trainer:1".into()),
            ..Container::default()
        }],
        ..PodSpec::default()
    }
}

/// A pod in `phase` on `node` under `runtime_class`.
pub fn pod(name: &str, node: Option<&str>, runtime_class: Option<&str>, phase: &str) -> Pod {
    let mut spec = pod_spec();
    spec.node_name = node.map(Into::into);
    spec.runtime_class_name = runtime_class.map(Into::into);
    Pod {
        metadata: meta(name),
        spec: Some(spec),
        status: Some(PodStatus {
            phase: Some(phase.into()),
            container_statuses: Some(vec![ContainerStatus {
                name: "trainer".into(),
                container_id: Some("containerd://0123abcd".into()),
                ..ContainerStatus::default()
            }]),
            ..PodStatus::default()
        }),
    }
}

/// A node.
pub fn node(name: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        ..Node::default()
    }
}
