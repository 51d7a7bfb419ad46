//! Lease fencing: when a renewal fails, the reconcilers' writes stop at once (they are
//! refused before they leave the process), reads go on, and writes resume once the Lease
//! is renewed. The mock API server records every request that reaches it.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::{core, kyb, node_path};
use crate::checkpoint::reconcile;
use crate::fence::WriteFence;
use crate::fixtures::*;
use crate::lease::LeaderLease;
use crate::mock::Scenario;
use kybernate_api::*;

const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/kybernate-system/leases/kybernate-controller";

fn our_lease() -> serde_json::Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "kybernate-controller", "namespace": "kybernate-system", "resourceVersion": "3"},
        "spec": {"holderIdentity": "me", "leaseDurationSeconds": 15, "renewTime": ago(5)}})
}

fn unavailable() -> (u16, serde_json::Value) {
    (
        503,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "etcd leader changed", "reason": "ServiceUnavailable", "code": 503}),
    )
}

/// The reads of scheduling `cp1`, up to its first write.
fn scheduling_reads(scenario: Scenario) -> Scenario {
    scenario
        .ok(
            "GET",
            &core("pods", "train"),
            json(&pod("train", Some("n1"), Some("kybernate"), "Running")),
        )
        .ok("GET", &node_path("n1"), json(&node("n1")))
}

#[tokio::test]
async fn a_failed_renewal_stops_writes_at_once_and_a_renewal_resumes_them() {
    let fence = WriteFence::default();
    fence.open();
    let cp = GpuCheckpoint::test("cp1");
    let reply = json(&cp);
    let scenario = Scenario::default().request("GET", LEASE, |_| unavailable());
    let scenario = scheduling_reads(scenario)
        .ok("GET", LEASE, our_lease())
        .step("PUT", LEASE, |b| (200, b.clone()));
    let scenario = scheduling_reads(scenario)
        .ok("PATCH", &kyb("gpucheckpoints", "cp1"), reply.clone())
        .ok("PATCH", &(kyb("gpucheckpoints", "cp1") + "/status"), reply);
    let gate = fence.clone();
    let (outcome, seen) = scenario
        .run_fenced(now(), Some(fence), |ctx, lease_client| async move {
            let lease = LeaderLease::new(
                lease_client,
                "kybernate-system",
                "kybernate-controller",
                "me",
                15,
            );
            let limit = Duration::from_secs(1);
            let failed_renewal = lease.renew(&gate, now(), limit).await;
            let fenced = gate.is_open();
            let during = reconcile(Arc::new(cp.clone()), ctx.clone()).await;
            let renewed = lease.renew(&gate, now(), limit).await;
            let after = reconcile(Arc::new(cp), ctx).await;
            (failed_renewal, fenced, during, renewed, after)
        })
        .await;
    let (failed_renewal, fenced, during, renewed, after) = outcome;
    assert!(
        !failed_renewal && !fenced,
        "a failed renewal closes the fence"
    );
    let error = during.unwrap_err().to_string();
    assert!(error.contains("not the leader"), "{error}");
    let trail: Vec<String> = seen
        .requests
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    let renewal = trail
        .iter()
        .position(|r| r.starts_with("PUT "))
        .expect("the renewal");
    assert!(
        seen.requests[..renewal].iter().all(|r| !r.is_write()),
        "no write reached the API server between the failed and the next renewal: {trail:?}"
    );
    assert_eq!(
        seen.event_reasons(),
        ["Scheduled"],
        "only the reconcile after the renewal got as far as its Event"
    );
    assert!(renewed);
    after.unwrap();
    let writes: Vec<&String> = trail[renewal + 1..]
        .iter()
        .filter(|r| r.starts_with("PATCH"))
        .collect();
    assert_eq!(
        writes.len(),
        2,
        "writes resume after the renewal: {trail:?}"
    );
}

#[tokio::test]
async fn another_live_holder_keeps_the_fence_closed() {
    let fence = WriteFence::default();
    fence.open();
    let other = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "kybernate-controller", "namespace": "kybernate-system", "resourceVersion": "4"},
        "spec": {"holderIdentity": "other", "leaseDurationSeconds": 15, "renewTime": ago(2)}});
    let gate = fence.clone();
    let scenario = Scenario::default().ok("GET", LEASE, other);
    let (leading, seen) = scenario
        .run_fenced(now(), Some(fence), |_, lease_client| async move {
            LeaderLease::new(
                lease_client,
                "kybernate-system",
                "kybernate-controller",
                "me",
                15,
            )
            .renew(&gate, now(), Duration::from_secs(1))
            .await
        })
        .await;
    assert!(!leading);
    assert_eq!(seen.requests.len(), 1, "no attempt to take a live Lease");
}
