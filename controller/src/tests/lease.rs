use serde_json::json;

use crate::fixtures::{ago, now};
use crate::lease::LeaderLease;
use crate::mock::Scenario;

const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/kybernate-system/leases/kybernate-controller";

fn lease(holder: &str, renewed_ago: i64) -> serde_json::Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "kybernate-controller", "namespace": "kybernate-system", "resourceVersion": "3"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                 "renewTime": ago(renewed_ago)}})
}

async fn try_acquire(scenario: Scenario) -> (bool, crate::mock::Seen) {
    let (result, seen) = scenario
        .run(now(), |ctx| async move {
            LeaderLease::new(
                ctx.client.clone(),
                "kybernate-system",
                "kybernate-controller",
                "me",
                15,
            )
            .try_acquire(now())
            .await
        })
        .await;
    (result.unwrap(), seen)
}

#[tokio::test]
async fn creates_a_missing_lease() {
    let scenario = Scenario::default().missing("GET", LEASE).step(
        "POST",
        "/apis/coordination.k8s.io/v1/namespaces/kybernate-system/leases",
        |b| (201, b.clone()),
    );
    let (leading, seen) = try_acquire(scenario).await;
    assert!(leading);
    assert_eq!(seen.bodies[1]["spec"]["holderIdentity"], "me");
}

#[tokio::test]
async fn leaves_a_live_lease_of_another_replica_alone() {
    let scenario = Scenario::default().ok("GET", LEASE, lease("other", 5));
    let (leading, seen) = try_acquire(scenario).await;
    assert!(!leading);
    assert_eq!(seen.bodies.len(), 1, "no write");
}

#[tokio::test]
async fn takes_over_an_expired_lease() {
    let scenario = Scenario::default()
        .ok("GET", LEASE, lease("other", 60))
        .step("PUT", LEASE, |b| (200, b.clone()));
    let (leading, seen) = try_acquire(scenario).await;
    assert!(leading);
    assert_eq!(seen.bodies[1]["spec"]["holderIdentity"], "me");
    assert_eq!(seen.bodies[1]["spec"]["leaseTransitions"], 1);
    assert_eq!(
        seen.bodies[1]["metadata"]["resourceVersion"], "3",
        "replace is guarded"
    );
}

#[tokio::test]
async fn losing_the_race_is_not_an_error() {
    let scenario = Scenario::default()
        .ok("GET", LEASE, lease("other", 60))
        .step("PUT", LEASE, |_| {
            (
                409,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": "Conflict", "code": 409, "message": "conflict"}),
            )
        });
    let (leading, _) = try_acquire(scenario).await;
    assert!(!leading);
}
