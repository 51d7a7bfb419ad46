//! Reconciling `GpuWorkload`: keep its pod alive (restoring it from the latest completed
//! checkpoint when it was evicted, deleted or lost with its node), take periodic
//! checkpoints and apply retention.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::runtime::controller::Action;
use kube::ResourceExt;

use crate::context::Context;
use crate::error::{kube_err, Error};
use crate::pod::{local_node, owner_ref, RestoredPod};
use crate::schedule::{Schedule, ScheduleError};
use kybernate_api::apply::{self, CONTROLLER_MANAGER};
use kybernate_api::{
    CheckpointPhase, CheckpointTimeouts, Condition, GpuCheckpoint, GpuCheckpointSpec, GpuWorkload,
    GpuWorkloadStatus, HOSTNAME_LABEL, SCHEDULE_INVALID_CONDITION, WORKLOAD_LABEL,
};

const KIND: &str = "GpuWorkload";
const POLL: Duration = Duration::from_secs(30);

/// Reconciles one GpuWorkload.
#[tracing::instrument(skip_all, fields(namespace = %wl.namespace().unwrap_or_default(), name = %wl.name_any()))]
pub async fn reconcile(wl: Arc<GpuWorkload>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconcile(KIND);
    let name = wl.name_any();
    let ns = wl.namespace().ok_or_else(|| Error::NoNamespace {
        kind: KIND,
        name: name.clone(),
    })?;
    if wl.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let selector = ListParams::default().labels(&format!("{WORKLOAD_LABEL}={name}"));
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let cps_api: Api<GpuCheckpoint> = Api::namespaced(ctx.client.clone(), &ns);
    let pods = pods_api
        .list(&selector)
        .await
        .map_err(kube_err("list", "Pod", &ns, &name))?
        .items;
    let mut checkpoints = cps_api
        .list(&selector)
        .await
        .map_err(kube_err("list", "GpuCheckpoint", &ns, &name))?
        .items;
    checkpoints.sort_by_key(|c| std::cmp::Reverse(c.creation_timestamp().map(|t| t.0)));
    let completed: Vec<&GpuCheckpoint> = checkpoints
        .iter()
        .filter(|c| {
            c.phase() == CheckpointPhase::Completed && c.metadata.deletion_timestamp.is_none()
        })
        .collect();
    let latest = completed.first().copied();
    let mut status = wl.status.clone().unwrap_or_default();
    status.latest_checkpoint = latest.map(|c| c.name_any());

    let mut alive = None;
    for pod in &pods {
        if is_alive(pod, &ctx).await? {
            alive = Some(pod);
        } else if pod.metadata.deletion_timestamp.is_none() {
            pods_api
                .delete(&pod.name_any(), &DeleteParams::default())
                .await
                .map_err(kube_err("delete", "Pod", &ns, &pod.name_any()))?;
            ctx.event(
                &*wl,
                true,
                "PodLost",
                format!(
                    "pod {} was evicted, failed or lost its node",
                    pod.name_any()
                ),
            )
            .await;
        }
    }
    let now = ctx.clock.now();
    let schedule = Schedule::parse(&wl.spec.schedule);
    report_schedule(&wl, &ctx, &mut status, schedule.as_ref().err()).await;
    match alive {
        None => {
            let restore_from = latest.filter(|_| wl.spec.restore_on_reschedule);
            let pod_name = format!("{name}-{}", status.pods_created);
            let pinned: BTreeMap<String, String> = restore_from
                .and_then(local_node)
                .map(|node| (HOSTNAME_LABEL.to_owned(), node))
                .into_iter()
                .collect();
            let pod = RestoredPod {
                name: pod_name.clone(),
                namespace: ns.clone(),
                owner: owner_ref(&*wl).ok_or_else(|| Error::PodBuild {
                    owner: name.clone(),
                    reason: "the GpuWorkload has no uid yet".into(),
                })?,
                labels: BTreeMap::from([(WORKLOAD_LABEL.to_owned(), name.clone())]),
                checkpoint: restore_from,
                template: Some(&wl.spec.template),
                node_selector: &pinned,
            }
            .build()?;
            match pods_api.create(&PostParams::default(), &pod).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(kube_err("create", "Pod", &ns, &pod_name)(e)),
            }
            status.pods_created += 1;
            status.pod_name = Some(pod_name.clone());
            let note = match restore_from {
                Some(cp) => {
                    status.restores += 1;
                    format!("pod {pod_name} restores checkpoint {}", cp.name_any())
                }
                None => format!("pod {pod_name} starts fresh"),
            };
            let reason = if restore_from.is_some() {
                "PodRestored"
            } else {
                "PodCreated"
            };
            ctx.event(&*wl, false, reason, note).await;
        }
        Some(pod) => {
            status.pod_name = Some(pod.name_any());
            let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            let in_flight = checkpoints.iter().any(|c| !c.phase().is_terminal());
            let last = last_checkpoint(status.last_scheduled_at.as_ref(), &checkpoints);
            let due = match &schedule {
                Ok(schedule) => due_at(schedule, last, wl.creation_timestamp(), now),
                Err(_) => None,
            };
            if let (true, false, Some(fire)) = (running, in_flight, due) {
                // Named after the run it serves: a re-delivered, stale object computes
                // the same name and gets a conflict instead of a second checkpoint.
                let cp_name = format!("{name}-{}", fire.as_second());
                let cp = GpuCheckpoint {
                    metadata: ObjectMeta {
                        name: Some(cp_name.clone()),
                        namespace: Some(ns.clone()),
                        labels: Some(BTreeMap::from([(WORKLOAD_LABEL.to_owned(), name.clone())])),
                        owner_references: owner_ref(&*wl).map(|o| vec![o]),
                        ..ObjectMeta::default()
                    },
                    spec: GpuCheckpointSpec {
                        pod_name: pod.name_any(),
                        container: None,
                        storage_tier: wl.spec.storage_tier,
                        leave_running: true,
                        timeouts: CheckpointTimeouts::default(),
                        retention_labels: BTreeMap::new(),
                    },
                    status: None,
                };
                match cps_api.create(&PostParams::default(), &cp).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(e) => return Err(kube_err("create", "GpuCheckpoint", &ns, &cp_name)(e)),
                }
                status.last_scheduled_at = Some(ctx.now());
                ctx.event(
                    &*wl,
                    false,
                    "CheckpointScheduled",
                    format!("created {cp_name}"),
                )
                .await;
            }
        }
    }
    for old in expired(&completed, &wl, now) {
        cps_api
            .delete(&old.name_any(), &DeleteParams::default())
            .await
            .map_err(kube_err("delete", "GpuCheckpoint", &ns, &old.name_any()))?;
        ctx.event(
            &*wl,
            false,
            "RetentionDeleted",
            format!("deleted checkpoint {}", old.name_any()),
        )
        .await;
    }
    // The controller is this status's only writer: it applies all of it, and a condition
    // it leaves out (a fixed schedule's ScheduleInvalid) is removed by the API server.
    let api: Api<GpuWorkload> = Api::namespaced(ctx.client.clone(), &ns);
    api.patch_status(
        &name,
        &apply::params(CONTROLLER_MANAGER),
        &apply::status::<GpuWorkload, _>(&name, &status),
    )
    .await
    .map_err(kube_err("patch", KIND, &ns, &name))?;
    Ok(Action::requeue(POLL))
}

/// The time of the last periodic checkpoint: the later of what the status recorded and
/// the newest checkpoint object (the status may be stale on a re-delivery).
fn last_checkpoint(recorded: Option<&Time>, newest_first: &[GpuCheckpoint]) -> Option<Timestamp> {
    let newest = newest_first
        .first()
        .and_then(|c| c.creation_timestamp())
        .map(|t| t.0);
    recorded.map(|t| t.0).into_iter().chain(newest).max()
}

/// The run that is due at `now`, if any. Without any checkpoint yet, an interval schedule
/// runs at once and a cron schedule at its first match after the workload's creation.
pub fn due_at(
    schedule: &Schedule,
    last: Option<Timestamp>,
    created: Option<Time>,
    now: Timestamp,
) -> Option<Timestamp> {
    let fire = match (schedule, last) {
        (_, Some(last)) => schedule.next_after(last)?,
        (Schedule::Interval(_), None) => now,
        (Schedule::Cron(_), None) => schedule.next_after(created.map_or(now, |t| t.0))?,
    };
    (fire <= now).then_some(fire)
}

/// Keeps the `ScheduleInvalid` condition in step with the schedule, with a Warning event
/// when it first appears.
async fn report_schedule(
    wl: &GpuWorkload,
    ctx: &Context,
    status: &mut GpuWorkloadStatus,
    error: Option<&ScheduleError>,
) {
    let had = status
        .conditions
        .iter()
        .any(|c| c.type_ == SCHEDULE_INVALID_CONDITION);
    status
        .conditions
        .retain(|c| c.type_ != SCHEDULE_INVALID_CONDITION);
    let Some(error) = error else { return };
    let reason = match error {
        ScheduleError::InvalidCron { .. } => "InvalidCron",
        ScheduleError::Missing => "NoSchedule",
    };
    let message = format!("{error}; no periodic checkpoints are taken until it is fixed");
    status.conditions.push(Condition::new(
        SCHEDULE_INVALID_CONDITION,
        reason,
        message.clone(),
        ctx.now(),
    ));
    if !had {
        ctx.metrics.failure(KIND, reason);
        ctx.event(wl, true, reason, message).await;
    }
}

/// Completed checkpoints (newest first) beyond `keepLast` or older than `maxAgeSeconds`.
/// The newest is never among them: it is what a restore would use.
pub fn expired<'a>(
    completed: &[&'a GpuCheckpoint],
    wl: &GpuWorkload,
    now: k8s_openapi::jiff::Timestamp,
) -> Vec<&'a GpuCheckpoint> {
    let keep = usize::try_from(wl.spec.retention.keep_last)
        .unwrap_or(usize::MAX)
        .max(1);
    let max_age = i64::try_from(wl.spec.retention.max_age_seconds).unwrap_or(i64::MAX);
    completed
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(i, cp)| {
            let age = cp
                .creation_timestamp()
                .map(|t| now.as_second() - t.0.as_second())
                .unwrap_or(0);
            *i >= keep || (max_age > 0 && age > max_age)
        })
        .map(|(_, cp)| *cp)
        .collect()
}

/// Still running or about to: not Failed/Succeeded/evicted, not being deleted, and its
/// node (if any) still exists.
async fn is_alive(pod: &Pod, ctx: &Context) -> Result<bool, Error> {
    if pod.metadata.deletion_timestamp.is_some() {
        return Ok(false);
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Failed") | Some("Succeeded")) {
        return Ok(false);
    }
    let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) else {
        return Ok(true);
    };
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    Ok(nodes
        .get_opt(node)
        .await
        .map_err(kube_err("get", "Node", "", node))?
        .is_some())
}
