use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use serde_json::json;

use super::{core, kyb, node_path};
use crate::checkpoint::reconcile;
use crate::fixtures::*;
use crate::mock::{list, Scenario};
use kybernate_api::*;

fn run_on(
    cp: GpuCheckpoint,
    scenario: Scenario,
) -> impl std::future::Future<Output = (Result<Action, crate::Error>, crate::mock::Seen)> {
    scenario.run(now(), move |ctx| reconcile(Arc::new(cp), ctx))
}

#[tokio::test]
async fn happy_path_labels_for_the_node_and_records_the_target() {
    let cp = GpuCheckpoint::test("cp1");
    let reply = json(&cp);
    let scenario = Scenario::default()
        .ok(
            "GET",
            &core("pods", "train"),
            json(&pod("train", Some("n1"), Some("kybernate"), "Running")),
        )
        .ok("GET", &node_path("n1"), json(&node("n1")))
        .ok("PATCH", &kyb("gpucheckpoints", "cp1"), reply.clone())
        .ok("PATCH", &(kyb("gpucheckpoints", "cp1") + "/status"), reply);
    let (result, seen) = run_on(cp, scenario).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(30)));
    assert_eq!(seen.bodies[2]["metadata"]["labels"][NODE_LABEL], "n1");
    let status = &seen.bodies[3]["status"];
    assert_eq!(status["phase"], "Scheduled");
    assert_eq!(status["nodeName"], "n1");
    assert_eq!(status["podUid"], "uid-train");
    assert_eq!(
        status["containers"],
        json!([{"name": "trainer", "containerId": "0123abcd"}])
    );
    assert_eq!(status["scheduledAt"], "2026-01-01T12:00:00Z");
    assert_eq!(status["capturedPodSpec"]["runtimeClassName"], "kybernate");
    assert!(
        status["capturedPodSpec"].get("nodeName").is_none(),
        "{status}"
    );
    assert_eq!(seen.event_reasons(), ["Scheduled"]);
}

#[tokio::test]
async fn adds_the_finalizer_first_and_nothing_else() {
    let mut cp = GpuCheckpoint::test("cp1");
    cp.metadata.finalizers = None;
    let reply = json(&cp);
    let scenario = Scenario::default().ok("PATCH", &kyb("gpucheckpoints", "cp1"), reply);
    let (result, seen) = run_on(cp, scenario).await;
    assert_eq!(result.unwrap(), Action::await_change());
    let patch = &seen.requests[0];
    assert_eq!(patch.content_type, "application/json-patch+json");
    assert_eq!(
        patch.body,
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [REFERENCED_FINALIZER]},
        ]),
        "kube-runtime's finalizer helper, guarded by a test of the list"
    );
}

#[tokio::test]
async fn status_and_labels_are_applied_as_the_controller() {
    let cp = GpuCheckpoint::test("cp1");
    let reply = json(&cp);
    let scenario = Scenario::default()
        .ok(
            "GET",
            &core("pods", "train"),
            json(&pod("train", Some("n1"), Some("kybernate"), "Running")),
        )
        .ok("GET", &node_path("n1"), json(&node("n1")))
        .ok("PATCH", &kyb("gpucheckpoints", "cp1"), reply.clone())
        .ok("PATCH", &(kyb("gpucheckpoints", "cp1") + "/status"), reply);
    let (_, seen) = run_on(cp, scenario).await;
    for write in seen.requests.iter().filter(|r| r.is_write()) {
        assert_eq!(write.content_type, "application/apply-patch+yaml");
        assert!(
            write.query.contains("fieldManager=kybernate-controller"),
            "{}",
            write.query
        );
        assert!(write.query.contains("force=true"), "{}", write.query);
        assert_eq!(write.body["apiVersion"], "kybernate.io/v1alpha1");
        assert_eq!(write.body["kind"], "GpuCheckpoint");
        assert_eq!(write.body["metadata"]["name"], "cp1");
    }
    let status = seen.requests[3].body["status"].as_object().unwrap();
    let mut fields: Vec<&str> = status.keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "capturedPodSpec",
            "containers",
            "nodeName",
            "phase",
            "podUid",
            "scheduledAt"
        ],
        "only the controller's fields; the agent's (bytes, tiers, ...) are left to it"
    );
}

async fn assert_fails_with(cp: GpuCheckpoint, scenario: Scenario, reason: &str) -> String {
    let reply = json(&cp);
    let status_path = kyb("gpucheckpoints", &cp.metadata.name.clone().unwrap()) + "/status";
    let scenario = scenario.ok("PATCH", &status_path, reply);
    let (result, seen) = run_on(cp, scenario).await;
    assert_eq!(result.unwrap(), Action::await_change());
    let status = &seen.bodies.last().unwrap()["status"];
    assert_eq!(status["phase"], "Failed");
    assert_eq!(status["conditions"][0]["type"], "Failed");
    assert_eq!(status["conditions"][0]["reason"], reason);
    assert_eq!(seen.event_reasons(), [reason]);
    assert_eq!(seen.events[0]["type"], "Warning");
    status["conditions"][0]["message"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn missing_pod_fails_with_pod_not_found() {
    let scenario = Scenario::default().missing("GET", &core("pods", "train"));
    let msg = assert_fails_with(GpuCheckpoint::test("cp1"), scenario, "PodNotFound").await;
    assert_eq!(msg, "pod default/train does not exist");
}

#[tokio::test]
async fn pod_without_kybernate_runtime_is_refused() {
    let scenario = Scenario::default().ok(
        "GET",
        &core("pods", "train"),
        json(&pod("train", Some("n1"), Some("runc"), "Running")),
    );
    let msg = assert_fails_with(GpuCheckpoint::test("cp1"), scenario, "NotKybernateRuntime").await;
    assert!(msg.contains("RuntimeClass runc"), "{msg}");
    assert!(msg.contains("runtimeClassName: kybernate"), "{msg}");
}

#[tokio::test]
async fn unknown_container_is_refused() {
    let mut cp = GpuCheckpoint::test("cp1");
    cp.spec.container = Some("sidecar".into());
    let scenario = Scenario::default().ok(
        "GET",
        &core("pods", "train"),
        json(&pod("train", Some("n1"), Some("kybernate"), "Running")),
    );
    let msg = assert_fails_with(cp, scenario, "ContainerNotFound").await;
    assert!(msg.contains("sidecar"), "{msg}");
}

#[tokio::test]
async fn pod_not_yet_running_is_retried_without_writes() {
    let scenario = Scenario::default().ok(
        "GET",
        &core("pods", "train"),
        json(&pod("train", None, Some("kybernate"), "Pending")),
    );
    let (result, seen) = run_on(GpuCheckpoint::test("cp1"), scenario).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(5)));
    assert!(seen.events.is_empty());
}

#[tokio::test]
async fn node_gone_before_scheduling_fails() {
    let scenario = Scenario::default()
        .ok(
            "GET",
            &core("pods", "train"),
            json(&pod("train", Some("n1"), Some("kybernate"), "Running")),
        )
        .missing("GET", &node_path("n1"));
    let msg = assert_fails_with(GpuCheckpoint::test("cp1"), scenario, "NodeGone").await;
    assert!(msg.contains("node n1"), "{msg}");
}

#[tokio::test]
async fn node_gone_while_checkpointing_fails() {
    let cp = GpuCheckpoint::test("cp1").in_phase(CheckpointPhase::Checkpointing, "n1", 10);
    let scenario = Scenario::default().missing("GET", &node_path("n1"));
    let msg = assert_fails_with(cp, scenario, "NodeGone").await;
    assert!(msg.contains("disappeared"), "{msg}");
}

#[tokio::test]
async fn overall_timeout_fails_the_checkpoint() {
    let cp = GpuCheckpoint::test("cp1").in_phase(CheckpointPhase::Draining, "n1", 1800);
    let scenario = Scenario::default().ok("GET", &node_path("n1"), json(&node("n1")));
    let msg = assert_fails_with(cp, scenario, "Timeout").await;
    assert!(msg.contains("1800 s"), "{msg}");
}

#[tokio::test]
async fn within_the_timeout_it_waits_for_the_agent() {
    let cp = GpuCheckpoint::test("cp1").in_phase(CheckpointPhase::Checkpointing, "n1", 1790);
    let scenario = Scenario::default().ok("GET", &node_path("n1"), json(&node("n1")));
    let (result, seen) = run_on(cp, scenario).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(10)));
    assert!(seen.events.is_empty());
}

#[tokio::test]
async fn agent_reported_failure_becomes_a_warning_event_and_no_write() {
    let mut cp = GpuCheckpoint::test("cp1").in_phase(CheckpointPhase::Failed, "n1", 10);
    cp.status.as_mut().unwrap().conditions = vec![Condition::new(
        "Failed",
        "CriuDumpFailed",
        "criu dump exited with 1",
        ago(1),
    )];
    let (result, seen) = run_on(cp, Scenario::default()).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_eq!(seen.event_reasons(), ["CriuDumpFailed"]);
    assert_eq!(seen.events[0]["note"], "criu dump exited with 1");
    assert!(seen.bodies.is_empty());
}

fn no_users() -> Scenario {
    Scenario::default()
        .ok(
            "GET",
            "/apis/kybernate.io/v1alpha1/namespaces/default/gpurestores",
            list("GpuRestoreList", vec![]),
        )
        .ok(
            "GET",
            "/apis/kybernate.io/v1alpha1/namespaces/default/gpuworkloads",
            list("GpuWorkloadList", vec![]),
        )
}

fn removal(index: usize, finalizer: &str) -> serde_json::Value {
    let path = format!("/metadata/finalizers/{index}");
    json!([
        {"op": "test", "path": path, "value": finalizer},
        {"op": "remove", "path": path},
    ])
}

#[tokio::test]
async fn finalizer_released_when_nothing_references_the_checkpoint() {
    let cp = GpuCheckpoint::completed("cp1", 100).deleting();
    let mut other = GpuWorkload::test("wl", 3);
    other.status = Some(GpuWorkloadStatus {
        latest_checkpoint: Some("cp2".into()),
        ..Default::default()
    });
    let scenario = Scenario::default()
        .ok(
            "GET",
            "/apis/kybernate.io/v1alpha1/namespaces/default/gpurestores",
            list("GpuRestoreList", vec![]),
        )
        .ok(
            "GET",
            "/apis/kybernate.io/v1alpha1/namespaces/default/gpuworkloads",
            list("GpuWorkloadList", vec![json(&other)]),
        )
        .ok("PATCH", &kyb("gpucheckpoints", "cp1"), json(&cp));
    let (result, seen) = run_on(cp, scenario).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_eq!(seen.bodies[2], removal(0, REFERENCED_FINALIZER));
}

async fn assert_kept(cp: GpuCheckpoint, scenario: Scenario, user: &str) {
    let (result, seen) = run_on(cp, scenario).await;
    let error = result.unwrap_err();
    assert!(
        matches!(&error, crate::Error::StillReferenced { user: u, .. } if u.contains(user)),
        "{error}"
    );
    assert!(
        seen.requests.iter().all(|r| !r.is_write()),
        "the finalizer stays"
    );
    assert_eq!(seen.event_reasons(), ["StillReferenced"]);
    assert!(seen.events[0]["note"].as_str().unwrap().contains(user));
    // Waiting for a user is not a failure: no backoff growth, the same interval each time.
    let (actions, _) = Scenario::default()
        .run(now(), |ctx| async move {
            let cp = Arc::new(GpuCheckpoint::test("cp1"));
            [(); 3].map(|_| crate::run::error_policy(cp.clone(), &error, ctx.clone()))
        })
        .await;
    assert_eq!(
        actions,
        [(); 3].map(|_| Action::requeue(Duration::from_secs(30)))
    );
}

#[tokio::test]
async fn finalizer_kept_while_a_workload_still_uses_the_checkpoint() {
    let cp = GpuCheckpoint::completed("cp1", 100).deleting();
    let mut wl = GpuWorkload::test("wl", 3);
    wl.status = Some(GpuWorkloadStatus {
        latest_checkpoint: Some("cp1".into()),
        ..Default::default()
    });
    let scenario = Scenario::default()
        .ok(
            "GET",
            "/apis/kybernate.io/v1alpha1/namespaces/default/gpurestores",
            list("GpuRestoreList", vec![]),
        )
        .ok(
            "GET",
            "/apis/kybernate.io/v1alpha1/namespaces/default/gpuworkloads",
            list("GpuWorkloadList", vec![json(&wl)]),
        );
    assert_kept(cp, scenario, "GpuWorkload wl").await;
}

#[tokio::test]
async fn finalizer_kept_while_a_restore_is_running() {
    let cp = GpuCheckpoint::completed("cp1", 100).deleting();
    let restore = GpuRestore::test("r1", "cp1");
    let scenario = Scenario::default().ok(
        "GET",
        "/apis/kybernate.io/v1alpha1/namespaces/default/gpurestores",
        list("GpuRestoreList", vec![json(&restore)]),
    );
    assert_kept(cp, scenario, "GpuRestore r1").await;
}

#[tokio::test]
async fn finalizer_cleanup_drops_the_agent_finalizer_when_its_node_is_gone() {
    let mut cp = GpuCheckpoint::completed("cp1", 100).deleting();
    cp.metadata.finalizers = Some(vec![
        REFERENCED_FINALIZER.into(),
        ARTIFACTS_FINALIZER.into(),
    ]);
    let scenario = no_users()
        .missing("GET", &node_path("n1"))
        .ok("PATCH", &kyb("gpucheckpoints", "cp1"), json(&cp))
        .ok("PATCH", &kyb("gpucheckpoints", "cp1"), json(&cp));
    let (result, seen) = run_on(cp, scenario).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_eq!(seen.bodies[3], removal(1, ARTIFACTS_FINALIZER));
    assert_eq!(seen.bodies[4], removal(0, REFERENCED_FINALIZER));
    assert_eq!(seen.event_reasons(), ["ArtifactsLost"]);
}

#[tokio::test]
async fn finalizer_cleanup_leaves_the_agent_finalizer_to_a_live_agent() {
    let mut cp = GpuCheckpoint::completed("cp1", 100).deleting();
    cp.metadata.finalizers = Some(vec![
        REFERENCED_FINALIZER.into(),
        ARTIFACTS_FINALIZER.into(),
    ]);
    let scenario = no_users()
        .ok("GET", &node_path("n1"), json(&node("n1")))
        .ok("PATCH", &kyb("gpucheckpoints", "cp1"), json(&cp));
    let (_, seen) = run_on(cp, scenario).await;
    assert_eq!(seen.bodies[3], removal(0, REFERENCED_FINALIZER));
    assert!(seen.events.is_empty());
}

#[tokio::test]
async fn draining_is_watched_like_checkpointing_and_times_out_naming_it() {
    let cp = GpuCheckpoint::test("cp1").in_phase(CheckpointPhase::Draining, "n1", 600);
    let scenario = Scenario::default().ok("GET", &node_path("n1"), json(&node("n1")));
    let (result, seen) = run_on(cp, scenario).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(30)));
    assert!(seen.bodies.len() == 1 && seen.events.is_empty());

    let cp = GpuCheckpoint::test("cp1").in_phase(CheckpointPhase::Draining, "n1", 1800);
    let scenario = Scenario::default().ok("GET", &node_path("n1"), json(&node("n1")));
    let msg = assert_fails_with(cp, scenario, "Timeout").await;
    assert!(msg.contains("phase Draining"), "{msg}");
}
