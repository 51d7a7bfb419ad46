use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use serde_json::json;

use super::{core, kyb};
use crate::fixtures::*;
use crate::mock::Scenario;
use crate::restore::reconcile;
use kybernate_api::*;

#[tokio::test]
async fn creates_the_restored_pod_with_runtime_annotation_and_gpu_affinity() {
    let restore = GpuRestore::test("r1", "cp1");
    let scenario = Scenario::default()
        .ok(
            "GET",
            &kyb("gpucheckpoints", "cp1"),
            json(&GpuCheckpoint::completed("cp1", 100)),
        )
        .step("POST", "/api/v1/namespaces/default/pods", |body| {
            (201, body.clone())
        })
        .ok(
            "PATCH",
            &(kyb("gpurestores", "r1") + "/status"),
            json(&restore),
        );
    let (result, seen) = scenario
        .run(now(), |ctx| reconcile(Arc::new(restore), ctx))
        .await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(5)));
    let pod = &seen.bodies[1];
    assert_eq!(pod["metadata"]["name"], "r1-restored");
    assert_eq!(
        pod["metadata"]["annotations"][RESTORE_FROM_ANNOTATION],
        "default-cp1"
    );
    assert_eq!(pod["metadata"]["ownerReferences"][0]["kind"], "GpuRestore");
    assert_eq!(
        pod["metadata"]["labels"][MANAGED_BY_LABEL],
        "kybernate-controller"
    );
    assert_eq!(pod["spec"]["runtimeClassName"], "kybernate");
    let terms = &pod["spec"]["affinity"]["nodeAffinity"]
        ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"];
    assert_eq!(
        terms[0]["matchExpressions"],
        json!([
            {"key": GPU_MODEL_LABEL, "operator": "In", "values": ["NVIDIA-H100"]},
            {"key": GPU_DRIVER_LABEL, "operator": "Gt", "values": ["12079"]},
            {"key": GPU_COUNT_LABEL, "operator": "Gt", "values": ["1"]},
        ])
    );
    assert_eq!(seen.bodies[2]["status"]["phase"], "Restoring");
    assert_eq!(seen.bodies[2]["status"]["podName"], "r1-restored");
    assert_eq!(seen.event_reasons(), ["PodCreated"]);
}

#[tokio::test]
async fn tracks_the_pod_to_running() {
    let mut restore = GpuRestore::test("r1", "cp1");
    restore.status = Some(GpuRestoreStatus {
        phase: RestorePhase::Restoring,
        pod_name: Some("r1-restored".into()),
        started_at: Some(ago(12)),
        ..Default::default()
    });
    let scenario = Scenario::default()
        .ok(
            "GET",
            &core("pods", "r1-restored"),
            json(&pod(
                "r1-restored",
                Some("n2"),
                Some("kybernate"),
                "Running",
            )),
        )
        .ok("PATCH", &kyb("gpurestores", "r1"), json(&restore))
        .ok(
            "PATCH",
            &(kyb("gpurestores", "r1") + "/status"),
            json(&restore),
        );
    let (result, seen) = scenario
        .run(now(), |ctx| reconcile(Arc::new(restore), ctx))
        .await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_eq!(seen.bodies[1]["metadata"]["labels"][NODE_LABEL], "n2");
    let status = &seen.bodies[2]["status"];
    assert_eq!(status["phase"], "Completed");
    assert_eq!(status["nodeName"], "n2");
    assert_eq!(
        status["phases"],
        json!([{"phase": "pod_running", "millis": 12000}])
    );
}

#[tokio::test]
async fn waits_for_an_unfinished_checkpoint() {
    let restore = GpuRestore::test("r1", "cp1");
    let cp = GpuCheckpoint::test("cp1").in_phase(CheckpointPhase::Draining, "n1", 5);
    let scenario = Scenario::default().ok("GET", &kyb("gpucheckpoints", "cp1"), json(&cp));
    let (result, seen) = scenario
        .run(now(), |ctx| reconcile(Arc::new(restore), ctx))
        .await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(5)));
    assert!(seen.events.is_empty());
}

#[tokio::test]
async fn missing_checkpoint_fails() {
    let restore = GpuRestore::test("r1", "cp1");
    let scenario = Scenario::default()
        .missing("GET", &kyb("gpucheckpoints", "cp1"))
        .ok(
            "PATCH",
            &(kyb("gpurestores", "r1") + "/status"),
            json(&restore),
        );
    let (_, seen) = scenario
        .run(now(), |ctx| reconcile(Arc::new(restore), ctx))
        .await;
    assert_eq!(seen.bodies[1]["status"]["phase"], "Failed");
    assert_eq!(
        seen.bodies[1]["status"]["conditions"][0]["reason"],
        "CheckpointNotFound"
    );
}

#[tokio::test]
async fn a_restore_the_agent_refused_across_tenants_stays_failed() {
    let mut restore = GpuRestore::test("r1", "cp1");
    restore.status = Some(GpuRestoreStatus {
        phase: RestorePhase::Failed,
        conditions: vec![Condition::new(
            FAILED_CONDITION,
            "CheckpointRestoreRefused",
            "checkpoint default_cp1 was taken from a process of the node (node-local) and \
             cannot be restored into a pod of namespace default",
            ago(1),
        )],
        ..Default::default()
    });
    // No request at all: no pod is created, the agent's condition is not overwritten.
    let (result, seen) = Scenario::default()
        .run(now(), |ctx| reconcile(Arc::new(restore), ctx))
        .await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert!(seen.requests.is_empty() && seen.events.is_empty());
}

#[tokio::test]
async fn deleted_pod_fails_the_restore() {
    let mut restore = GpuRestore::test("r1", "cp1");
    restore.status = Some(GpuRestoreStatus {
        phase: RestorePhase::Restoring,
        pod_name: Some("r1-restored".into()),
        ..Default::default()
    });
    let scenario = Scenario::default()
        .missing("GET", &core("pods", "r1-restored"))
        .ok(
            "PATCH",
            &(kyb("gpurestores", "r1") + "/status"),
            json(&restore),
        );
    let (_, seen) = scenario
        .run(now(), |ctx| reconcile(Arc::new(restore), ctx))
        .await;
    assert_eq!(
        seen.bodies[1]["status"]["conditions"][0]["reason"],
        "PodDeleted"
    );
}

#[tokio::test]
async fn node_local_checkpoint_pins_the_pod_and_hands_the_restore_to_that_agent() {
    let restore = GpuRestore::test("r1", "cp1");
    let mut cp = GpuCheckpoint::completed("cp1", 100);
    cp.status.as_mut().unwrap().tiers = vec!["ram".into(), "nvme".into()];
    let scenario = Scenario::default()
        .ok("GET", &kyb("gpucheckpoints", "cp1"), json(&cp))
        .ok("PATCH", &kyb("gpurestores", "r1"), json(&restore))
        .step("POST", "/api/v1/namespaces/default/pods", |body| {
            (201, body.clone())
        })
        .ok(
            "PATCH",
            &(kyb("gpurestores", "r1") + "/status"),
            json(&restore),
        );
    let (result, seen) = scenario
        .run(now(), |ctx| reconcile(Arc::new(restore), ctx))
        .await;
    result.unwrap();
    assert_eq!(
        seen.bodies[1]["metadata"]["labels"][NODE_LABEL], "n1",
        "labelled before the pod exists, so the agent stages while it is scheduled"
    );
    let pod = &seen.bodies[2];
    assert_eq!(pod["spec"]["nodeSelector"][HOSTNAME_LABEL], "n1");
    let status = &seen.bodies[3]["status"];
    assert_eq!(status["artifactRef"], "default-cp1");
    assert_eq!(status["phase"], "Restoring");
}

#[tokio::test]
async fn checkpoint_in_s3_is_labelled_only_once_the_pod_is_bound() {
    let restore = GpuRestore::test("r1", "cp1");
    let scenario = Scenario::default()
        .ok(
            "GET",
            &kyb("gpucheckpoints", "cp1"),
            json(&GpuCheckpoint::completed("cp1", 100)),
        )
        .step("POST", "/api/v1/namespaces/default/pods", |body| {
            (201, body.clone())
        })
        .ok(
            "PATCH",
            &(kyb("gpurestores", "r1") + "/status"),
            json(&restore),
        );
    let (_, seen) = scenario
        .run(now(), |ctx| reconcile(Arc::new(restore), ctx))
        .await;
    assert!(seen.bodies[1]["spec"].get("nodeSelector").is_none());
    assert_eq!(seen.bodies[2]["status"]["artifactRef"], "default-cp1");
}
