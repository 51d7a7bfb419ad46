//! Cron and interval schedules of GpuWorkload: parsing, the next run counted from the last
//! checkpoint, no second checkpoint on a re-delivery, and a clear condition for a bad
//! expression.

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;

use super::node_path;
use crate::fixtures::*;
use crate::mock::{list, Scenario};
use crate::schedule::{parse_cron, Schedule, ScheduleError};
use crate::workload::{due_at, reconcile};
use kybernate_api::*;

const PODS: &str = "/api/v1/namespaces/default/pods";
const CPS: &str = "/apis/kybernate.io/v1alpha1/namespaces/default/gpucheckpoints";
const STATUS: &str = "/apis/kybernate.io/v1alpha1/namespaces/default/gpuworkloads/wl/status";

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn cron(expr: &str) -> Schedule {
    Schedule::parse(&CheckpointSchedule {
        interval_seconds: None,
        cron: Some(expr.into()),
    })
    .unwrap()
}

fn hourly(name: &str) -> GpuWorkload {
    let mut wl = GpuWorkload::test(name, 3);
    wl.spec.schedule = CheckpointSchedule {
        interval_seconds: None,
        cron: Some("0 * * * *".into()),
    };
    wl
}

fn running_pod() -> serde_json::Value {
    let mut p = pod("wl-0", Some("n1"), Some("kybernate"), "Running");
    p.metadata.labels = Some([(WORKLOAD_LABEL.to_owned(), "wl".to_owned())].into());
    json(&p)
}

fn owned_completed(name: &str, created_ago: i64) -> serde_json::Value {
    let mut cp = GpuCheckpoint::completed(name, created_ago);
    cp.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(WORKLOAD_LABEL.into(), "wl".into());
    json(&cp)
}

#[test]
fn cron_next_run_follows_the_last_checkpoint() {
    let every_6h = cron("0 */6 * * *");
    assert_eq!(
        every_6h.next_after(ts("2026-01-01T06:00:00Z")),
        Some(ts("2026-01-01T12:00:00Z"))
    );
    assert_eq!(
        every_6h.next_after(ts("2026-01-01T05:59:59Z")),
        Some(ts("2026-01-01T06:00:00Z"))
    );
    // 2026-01-01 is a Thursday; weekdays 1-5 are Monday to Friday as in crontab.
    let weekdays_9 = cron("30 9 * * 1-5");
    assert_eq!(
        weekdays_9.next_after(ts("2026-01-02T10:00:00Z")),
        Some(ts("2026-01-05T09:30:00Z"))
    );
    // 0 and 7 are both Sunday.
    for sunday in ["0 0 * * 0", "0 0 * * 7", "0 0 * * SUN", "0 0 * * 5-7"] {
        let next = cron(sunday).next_after(ts("2026-01-03T12:00:00Z")).unwrap();
        assert_eq!(next, ts("2026-01-04T00:00:00Z"), "{sunday}");
    }
    let interval = Schedule::parse(&CheckpointSchedule {
        interval_seconds: Some(600),
        cron: None,
    })
    .unwrap();
    assert_eq!(
        interval.next_after(ts("2026-01-01T11:55:00Z")),
        Some(ts("2026-01-01T12:05:00Z"))
    );
}

#[test]
fn bad_cron_expressions_are_named_with_the_reason() {
    for (expr, why) in [
        ("0 * * *", "expected 5 fields"),
        ("0 0 * * * *", "found 6"),
        ("61 * * * *", ""),
        ("0 0 * * 8", "day-of-week \"8\""),
        ("every hour", "found 2"),
    ] {
        let err = parse_cron(expr).unwrap_err();
        let ScheduleError::InvalidCron { expr: named, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(named, expr);
        assert!(err.to_string().contains(why), "{expr}: {err}");
    }
}

#[test]
fn due_only_when_the_next_run_has_come() {
    let now = now(); // 12:00:00
    let hourly = cron("0 * * * *");
    assert_eq!(
        due_at(&hourly, Some(ts("2026-01-01T11:30:00Z")), None, now),
        Some(now)
    );
    assert_eq!(due_at(&hourly, Some(now), None, now), None);
    assert_eq!(
        due_at(&hourly, Some(ts("2026-01-01T11:59:59Z")), None, now),
        Some(now)
    );
    // A missed run fires once, named after the first missed time.
    assert_eq!(
        due_at(&hourly, Some(ts("2026-01-01T09:10:00Z")), None, now),
        Some(ts("2026-01-01T10:00:00Z"))
    );
    // No checkpoint yet: the first match after the workload's creation.
    assert_eq!(due_at(&hourly, None, Some(ago(0)), now), None);
    assert_eq!(due_at(&hourly, None, Some(ago(30)), now), Some(now));
    assert_eq!(due_at(&hourly, None, Some(ago(3600)), now), Some(now));
}

#[tokio::test]
async fn cron_checkpoint_is_created_at_its_time_and_named_after_it() {
    let mut wl = hourly("wl");
    wl.status = Some(GpuWorkloadStatus {
        last_scheduled_at: Some(ago(1800)),
        pods_created: 1,
        ..Default::default()
    });
    let scenario = Scenario::default()
        .ok("GET", PODS, list("PodList", vec![running_pod()]))
        .ok(
            "GET",
            CPS,
            list("GpuCheckpointList", vec![owned_completed("wl-a", 1800)]),
        )
        .ok("GET", &node_path("n1"), json(&node("n1")))
        .step("POST", CPS, |b| (201, b.clone()))
        .ok("PATCH", STATUS, json(&wl));
    let (result, seen) = scenario
        .run(now(), |ctx| reconcile(Arc::new(wl), ctx))
        .await;
    result.unwrap();
    let fire = now().as_second();
    assert_eq!(seen.bodies[3]["metadata"]["name"], format!("wl-{fire}"));
    assert_eq!(
        seen.bodies[4]["status"]["lastScheduledAt"],
        "2026-01-01T12:00:00Z"
    );
    assert_eq!(seen.event_reasons(), ["CheckpointScheduled"]);
}

#[tokio::test]
async fn redelivered_stale_workload_does_not_fire_twice() {
    // The status still says 11:30 (stale), but the checkpoint for 12:00 exists and has
    // already completed: the next run is 13:00.
    let mut wl = hourly("wl");
    wl.status = Some(GpuWorkloadStatus {
        last_scheduled_at: Some(ago(1800)),
        pods_created: 1,
        ..Default::default()
    });
    let scenario = Scenario::default()
        .ok("GET", PODS, list("PodList", vec![running_pod()]))
        .ok(
            "GET",
            CPS,
            list(
                "GpuCheckpointList",
                vec![owned_completed("wl-b", 0), owned_completed("wl-a", 1800)],
            ),
        )
        .ok("GET", &node_path("n1"), json(&node("n1")))
        .ok("PATCH", STATUS, json(&wl));
    let (result, seen) = scenario
        .run(now(), |ctx| reconcile(Arc::new(wl.clone()), ctx))
        .await;
    result.unwrap();
    assert!(seen.events.is_empty(), "{:?}", seen.event_reasons());

    // Neither the status nor the list has caught up yet: the same run computes the same
    // name, and the API server's conflict stops a second checkpoint.
    let fire = now().as_second();
    let scenario = Scenario::default()
        .ok("GET", PODS, list("PodList", vec![running_pod()]))
        .ok(
            "GET",
            CPS,
            list("GpuCheckpointList", vec![owned_completed("wl-a", 1800)]),
        )
        .ok("GET", &node_path("n1"), json(&node("n1")))
        .step("POST", CPS, |_| {
            (
                409,
                serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "reason": "AlreadyExists", "code": 409}),
            )
        })
        .ok("PATCH", STATUS, json(&wl));
    let (result, seen) = scenario
        .run(now(), |ctx| reconcile(Arc::new(wl), ctx))
        .await;
    result.unwrap();
    assert_eq!(seen.bodies[3]["metadata"]["name"], format!("wl-{fire}"));
}

#[tokio::test]
async fn invalid_cron_is_reported_and_takes_no_checkpoint() {
    let mut wl = hourly("wl");
    wl.spec.schedule.cron = Some("0 25 * * *".into());
    wl.status = Some(GpuWorkloadStatus {
        pods_created: 1,
        ..Default::default()
    });
    let scenario = Scenario::default()
        .ok("GET", PODS, list("PodList", vec![running_pod()]))
        .ok("GET", CPS, list("GpuCheckpointList", vec![]))
        .ok("GET", &node_path("n1"), json(&node("n1")))
        .ok("PATCH", STATUS, json(&wl));
    let (result, seen) = scenario
        .run(now(), |ctx| reconcile(Arc::new(wl), ctx))
        .await;
    result.unwrap();
    let condition = &seen.bodies[3]["status"]["conditions"][0];
    assert_eq!(condition["type"], SCHEDULE_INVALID_CONDITION);
    assert_eq!(condition["reason"], "InvalidCron");
    let message = condition["message"].as_str().unwrap();
    assert!(message.contains("\"0 25 * * *\""), "{message}");
    assert_eq!(seen.event_reasons(), ["InvalidCron"]);
}

#[tokio::test]
async fn fixed_cron_clears_the_condition() {
    let mut wl = hourly("wl");
    wl.status = Some(GpuWorkloadStatus {
        last_scheduled_at: Some(ago(0)),
        pods_created: 1,
        conditions: vec![Condition::new(
            SCHEDULE_INVALID_CONDITION,
            "InvalidCron",
            "old",
            ago(60),
        )],
        ..Default::default()
    });
    let scenario = Scenario::default()
        .ok("GET", PODS, list("PodList", vec![running_pod()]))
        .ok("GET", CPS, list("GpuCheckpointList", vec![]))
        .ok("GET", &node_path("n1"), json(&node("n1")))
        .ok("PATCH", STATUS, json(&wl));
    let (result, seen) = scenario
        .run(now(), |ctx| reconcile(Arc::new(wl), ctx))
        .await;
    result.unwrap();
    assert!(
        seen.bodies[3]["status"].get("conditions").is_none(),
        "left out of the controller's apply, so the API server removes it: {}",
        seen.bodies[3]
    );
}
