use std::sync::Arc;

use super::{core, node_path};
use crate::fixtures::*;
use crate::mock::{list, Scenario};
use crate::workload::{expired, reconcile};
use kybernate_api::*;

const PODS: &str = "/api/v1/namespaces/default/pods";
const CPS: &str = "/apis/kybernate.io/v1alpha1/namespaces/default/gpucheckpoints";
const STATUS: &str = "/apis/kybernate.io/v1alpha1/namespaces/default/gpuworkloads/wl/status";

fn owned_pod(name: &str, node: &str, phase: &str) -> serde_json::Value {
    let mut p = pod(name, Some(node), Some("kybernate"), phase);
    p.metadata.labels = Some([(WORKLOAD_LABEL.to_owned(), "wl".to_owned())].into());
    json(&p)
}

#[tokio::test]
async fn first_reconcile_starts_a_fresh_pod() {
    let wl = GpuWorkload::test("wl", 3);
    let scenario = Scenario::default()
        .ok("GET", PODS, list("PodList", vec![]))
        .ok("GET", CPS, list("GpuCheckpointList", vec![]))
        .step("POST", PODS, |b| (201, b.clone()))
        .ok("PATCH", STATUS, json(&wl));
    let (_, seen) = scenario
        .run(now(), |ctx| reconcile(Arc::new(wl), ctx))
        .await;
    let pod = &seen.bodies[2];
    assert_eq!(pod["metadata"]["name"], "wl-0");
    assert_eq!(pod["metadata"]["labels"][WORKLOAD_LABEL], "wl");
    assert_eq!(pod["spec"]["runtimeClassName"], "kybernate");
    assert!(pod["metadata"].get("annotations").is_none(), "{pod}");
    // What the controller's pod watch selects on, and nothing else.
    assert_eq!(
        pod["metadata"]["labels"][MANAGED_BY_LABEL],
        "kybernate-controller"
    );
    assert_eq!(
        crate::run::managed_pods().label_selector.as_deref(),
        Some("kybernate.io/managed-by=kybernate-controller")
    );
    assert_eq!(seen.bodies[3]["status"]["podName"], "wl-0");
    assert_eq!(seen.bodies[3]["status"]["podsCreated"], 1);
    assert_eq!(seen.event_reasons(), ["PodCreated"]);
}

#[tokio::test]
async fn periodic_checkpoint_is_created_when_due() {
    let wl = GpuWorkload::test("wl", 3);
    let scenario = Scenario::default()
        .ok(
            "GET",
            PODS,
            list("PodList", vec![owned_pod("wl-0", "n1", "Running")]),
        )
        .ok("GET", CPS, list("GpuCheckpointList", vec![]))
        .ok("GET", &node_path("n1"), json(&node("n1")))
        .step("POST", CPS, |b| (201, b.clone()))
        .ok("PATCH", STATUS, json(&wl));
    let (_, seen) = scenario
        .run(now(), |ctx| reconcile(Arc::new(wl), ctx))
        .await;
    let cp = &seen.bodies[3];
    assert_eq!(cp["spec"]["podName"], "wl-0");
    assert_eq!(cp["spec"]["leaveRunning"], true);
    assert_eq!(cp["metadata"]["labels"][WORKLOAD_LABEL], "wl");
    assert_eq!(cp["metadata"]["ownerReferences"][0]["kind"], "GpuWorkload");
    assert_eq!(
        seen.bodies[4]["status"]["lastScheduledAt"],
        "2026-01-01T12:00:00Z"
    );
}

fn completed_list() -> serde_json::Value {
    let cps = [400, 300, 200, 100]
        .iter()
        .enumerate()
        .map(|(i, age)| {
            let mut cp = GpuCheckpoint::completed(&format!("wl-{i}"), *age);
            cp.metadata
                .labels
                .get_or_insert_with(Default::default)
                .insert(WORKLOAD_LABEL.into(), "wl".into());
            json(&cp)
        })
        .collect();
    list("GpuCheckpointList", cps)
}

#[tokio::test]
async fn retention_deletes_the_oldest_checkpoints() {
    let mut wl = GpuWorkload::test("wl", 2);
    wl.status = Some(GpuWorkloadStatus {
        last_scheduled_at: Some(ago(100)),
        pods_created: 1,
        ..Default::default()
    });
    let scenario = Scenario::default()
        .ok(
            "GET",
            PODS,
            list("PodList", vec![owned_pod("wl-0", "n1", "Running")]),
        )
        .ok("GET", CPS, completed_list())
        .ok("GET", &node_path("n1"), json(&node("n1")))
        .ok(
            "DELETE",
            &format!("{CPS}/wl-1"),
            json(&GpuCheckpoint::completed("wl-1", 300)),
        )
        .ok(
            "DELETE",
            &format!("{CPS}/wl-0"),
            json(&GpuCheckpoint::completed("wl-0", 400)),
        )
        .ok("PATCH", STATUS, json(&wl));
    let (_, seen) = scenario
        .run(now(), |ctx| reconcile(Arc::new(wl), ctx))
        .await;
    assert_eq!(seen.bodies[5]["status"]["latestCheckpoint"], "wl-3");
    assert_eq!(
        seen.event_reasons(),
        ["RetentionDeleted", "RetentionDeleted"]
    );
}

#[test]
fn max_age_never_expires_the_latest_checkpoint() {
    let mut wl = GpuWorkload::test("wl", 10);
    wl.spec.retention.max_age_seconds = 50;
    let a = GpuCheckpoint::completed("a", 100);
    let b = GpuCheckpoint::completed("b", 200);
    let gone: Vec<String> = expired(&[&a, &b], &wl, now())
        .iter()
        .map(|c| c.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(
        gone,
        ["b"],
        "a is older than maxAge but the latest, so it stays"
    );
}

async fn assert_restores_from_latest(dead_pod: serde_json::Value, node_alive: bool) {
    let mut wl = GpuWorkload::test("wl", 3);
    wl.status = Some(GpuWorkloadStatus {
        pod_name: Some("wl-0".into()),
        last_scheduled_at: Some(ago(100)),
        pods_created: 1,
        ..Default::default()
    });
    let mut latest = GpuCheckpoint::completed("wl-cp", 100);
    latest
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(WORKLOAD_LABEL.into(), "wl".into());
    let mut scenario = Scenario::default()
        .ok("GET", PODS, list("PodList", vec![dead_pod.clone()]))
        .ok("GET", CPS, list("GpuCheckpointList", vec![json(&latest)]));
    if node_alive {
        // An evicted pod is dead whatever its node does: no node lookup.
    } else {
        scenario = scenario.missing("GET", &node_path("n1"));
    }
    let scenario = scenario
        .ok("DELETE", &core("pods", "wl-0"), dead_pod)
        .step("POST", PODS, |b| (201, b.clone()))
        .ok("PATCH", STATUS, json(&wl));
    let (_, seen) = scenario
        .run(now(), |ctx| reconcile(Arc::new(wl), ctx))
        .await;
    let n = seen.bodies.len();
    let pod = &seen.bodies[n - 2];
    assert_eq!(pod["metadata"]["name"], "wl-1");
    assert_eq!(
        pod["metadata"]["annotations"][RESTORE_FROM_ANNOTATION],
        "default-wl-cp"
    );
    assert_eq!(pod["spec"]["runtimeClassName"], "kybernate");
    assert!(pod["spec"]["affinity"]["nodeAffinity"].is_object(), "{pod}");
    let status = &seen.bodies[n - 1]["status"];
    assert_eq!(status["restores"], 1);
    assert_eq!(status["podName"], "wl-1");
    assert_eq!(status["latestCheckpoint"], "wl-cp");
    assert_eq!(seen.event_reasons(), ["PodLost", "PodRestored"]);
}

#[tokio::test]
async fn evicted_pod_is_restored_from_the_latest_checkpoint() {
    assert_restores_from_latest(owned_pod("wl-0", "n1", "Failed"), true).await;
}

#[tokio::test]
async fn pod_on_a_dead_node_is_restored_from_the_latest_checkpoint() {
    assert_restores_from_latest(owned_pod("wl-0", "n1", "Running"), false).await;
}
