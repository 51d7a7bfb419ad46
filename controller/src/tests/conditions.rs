//! Two writers, one object: the controller's real reconcilers apply their status as
//! `kybernate-controller`, and the agent's writes are applied as `kybernate-agent` in the
//! shape the node worker sends (the same `apply::status` builder and the same status type).
//! The mock API server merges them with server-side-apply semantics (see
//! [`crate::mock::apply`]: per-manager ownership of top-level status fields, conditions as
//! a list-map keyed by `type`). This proves that neither writer's apply drops the other's
//! conditions or fields under those semantics; that the CRD declares the list-map for the
//! real API server is checked in `crdgen.rs`.

use std::sync::{Arc, Mutex};

use kube::api::Patch;
use serde::Serialize;

use super::{core, kyb, node_path};
use crate::fixtures::*;
use crate::mock::apply::AppliedObject;
use crate::mock::Scenario;
use kybernate_api::apply::{self, AGENT_MANAGER, CONTROLLER_MANAGER};
use kybernate_api::*;

/// What the agent sends for `status`, as JSON.
fn agent_apply<K, S>(name: &str, status: S) -> serde_json::Value
where
    K: kube::Resource<DynamicType = ()>,
    S: Serialize,
{
    let Patch::Apply(applied) = apply::status::<K, S>(name, status) else {
        unreachable!("apply::status builds an apply")
    };
    serde_json::to_value(applied).unwrap()
}

fn staged(now: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> GpuRestoreStatus {
    GpuRestoreStatus {
        staging: Some(RestoreStaging {
            node_name: "n1".into(),
            tier: "ram".into(),
            from_tier: Some("nvme".into()),
            phases: vec![],
        }),
        conditions: vec![Condition::new(
            STAGED_CONDITION,
            "Prefetched",
            "copied",
            now,
        )],
        ..GpuRestoreStatus::default()
    }
}

fn restoring() -> GpuRestore {
    let mut restore = GpuRestore::test("r1", "cp1");
    restore.status = Some(GpuRestoreStatus {
        phase: RestorePhase::Restoring,
        pod_name: Some("r1-restored".into()),
        started_at: Some(ago(12)),
        artifact_ref: Some("default-cp1".into()),
        ..Default::default()
    });
    restore
}

fn types(status: &serde_json::Value) -> Vec<String> {
    status["conditions"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|c| c["type"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn the_controllers_failure_keeps_the_agents_staged_condition() {
    let mut model = AppliedObject::new(json(&restoring()), CONTROLLER_MANAGER);
    model.apply(
        AGENT_MANAGER,
        &agent_apply::<GpuRestore, _>("r1", staged(ago(5))),
    );
    let delivered: GpuRestore = serde_json::from_value(model.object()).unwrap();
    let model = Arc::new(Mutex::new(model));
    let server = model.clone();
    let scenario = Scenario::default()
        .missing("GET", &core("pods", "r1-restored"))
        .request("PATCH", &(kyb("gpurestores", "r1") + "/status"), move |r| {
            server.lock().unwrap().patch_status(r)
        });
    let (result, _) = scenario
        .run(now(), |ctx| {
            crate::restore::reconcile(Arc::new(delivered), ctx)
        })
        .await;
    result.unwrap();
    let model = model.lock().unwrap();
    let status = model.status();
    assert_eq!(status["phase"], "Failed");
    assert_eq!(types(&status), ["Staged", "Failed"], "{status}");
    assert_eq!(status["conditions"][1]["reason"], "PodDeleted");
    assert_eq!(status["staging"]["tier"], "ram", "the agent's field stays");
    assert_eq!(
        status["podName"], "r1-restored",
        "the controller's own fields stay"
    );
    assert_eq!(status["artifactRef"], "default-cp1");
    assert_eq!(
        model.condition_owners(),
        [
            ("Staged".to_owned(), AGENT_MANAGER.to_owned()),
            ("Failed".to_owned(), CONTROLLER_MANAGER.to_owned())
        ]
    );
}

#[tokio::test]
async fn the_agents_staging_keeps_what_the_controller_applied_and_the_reverse() {
    let mut model = AppliedObject::new(json(&GpuRestore::test("r1", "cp1")), CONTROLLER_MANAGER);
    // The controller created the pod and applied Restoring; then the agent staged.
    let delivered = GpuRestore::test("r1", "cp1");
    let server = Arc::new(Mutex::new(model.clone()));
    let handle = server.clone();
    let scenario = Scenario::default()
        .ok(
            "GET",
            &kyb("gpucheckpoints", "cp1"),
            json(&GpuCheckpoint::completed("cp1", 100)),
        )
        .step("POST", "/api/v1/namespaces/default/pods", |b| {
            (201, b.clone())
        })
        .request("PATCH", &(kyb("gpurestores", "r1") + "/status"), move |r| {
            handle.lock().unwrap().patch_status(r)
        });
    let (result, _) = scenario
        .run(now(), |ctx| {
            crate::restore::reconcile(Arc::new(delivered), ctx)
        })
        .await;
    result.unwrap();
    model = server.lock().unwrap().clone();
    model.apply(
        AGENT_MANAGER,
        &agent_apply::<GpuRestore, _>("r1", staged(ago(1))),
    );
    let status = model.status();
    assert_eq!(status["phase"], "Restoring", "{status}");
    assert_eq!(status["podName"], "r1-restored");
    assert_eq!(types(&status), ["Staged"]);

    // The pod runs: the controller completes the restore; Staged and staging stay.
    let delivered: GpuRestore = serde_json::from_value(model.object()).unwrap();
    let server = Arc::new(Mutex::new(model));
    let handle = server.clone();
    let running = pod("r1-restored", Some("n1"), Some("kybernate"), "Running");
    let scenario = Scenario::default()
        .ok("GET", &core("pods", "r1-restored"), json(&running))
        .ok("PATCH", &kyb("gpurestores", "r1"), json(&restoring()))
        .request("PATCH", &(kyb("gpurestores", "r1") + "/status"), move |r| {
            handle.lock().unwrap().patch_status(r)
        });
    let (result, _) = scenario
        .run(now(), |ctx| {
            crate::restore::reconcile(Arc::new(delivered), ctx)
        })
        .await;
    result.unwrap();
    let status = server.lock().unwrap().status();
    assert_eq!(status["phase"], "Completed", "{status}");
    assert_eq!(status["nodeName"], "n1");
    assert_eq!(status["podName"], "r1-restored");
    assert_eq!(types(&status), ["Staged"]);
    assert_eq!(status["staging"]["fromTier"], "nvme");
}

#[tokio::test]
async fn a_controller_timeout_keeps_the_agents_draining_condition_and_fields() {
    let cp = GpuCheckpoint::test("cp1").in_phase(CheckpointPhase::Scheduled, "n1", 1800);
    let mut model = AppliedObject::new(json(&cp), CONTROLLER_MANAGER);
    let draining = GpuCheckpointStatus {
        phase: CheckpointPhase::Draining,
        artifact_ref: Some("default_cp1".into()),
        conditions: vec![Condition::new(
            "Draining",
            "Dumped",
            "storing into s3",
            ago(60),
        )],
        ..GpuCheckpointStatus::default()
    };
    model.apply(
        AGENT_MANAGER,
        &agent_apply::<GpuCheckpoint, _>("cp1", draining),
    );
    let delivered: GpuCheckpoint = serde_json::from_value(model.object()).unwrap();
    let server = Arc::new(Mutex::new(model));
    let handle = server.clone();
    let scenario = Scenario::default()
        .ok("GET", &node_path("n1"), json(&node("n1")))
        .request(
            "PATCH",
            &(kyb("gpucheckpoints", "cp1") + "/status"),
            move |r| handle.lock().unwrap().patch_status(r),
        );
    let (result, seen) = scenario
        .run(now(), |ctx| {
            crate::checkpoint::reconcile(Arc::new(delivered), ctx)
        })
        .await;
    result.unwrap();
    assert_eq!(seen.event_reasons(), ["Timeout"]);
    let status = server.lock().unwrap().status();
    assert_eq!(status["phase"], "Failed");
    assert_eq!(types(&status), ["Draining", "Failed"], "{status}");
    assert_eq!(
        status["artifactRef"], "default_cp1",
        "the agent's field stays"
    );
    assert_eq!(status["nodeName"], "n1", "the controller's field stays");
    assert!(status["scheduledAt"].is_string(), "{status}");
}
