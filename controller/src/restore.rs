//! Reconciling `GpuRestore`: create the pod that restores a completed checkpoint and track
//! it to Running.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action;
use kube::ResourceExt;

use crate::context::Context;
use crate::error::{kube_err, Error};
use crate::pod::{local_node, owner_ref, RestoredPod};
use crate::status::apply_status;
use kybernate_api::apply::{self, CONTROLLER_MANAGER};
use kybernate_api::{
    CheckpointPhase, Condition, GpuCheckpoint, GpuRestore, GpuRestoreStatus, PhaseDuration,
    RestorePhase, FAILED_CONDITION, HOSTNAME_LABEL, NODE_LABEL,
};

const KIND: &str = "GpuRestore";
const POLL: Duration = Duration::from_secs(5);

/// Reconciles one GpuRestore.
#[tracing::instrument(skip_all, fields(namespace = %restore.namespace().unwrap_or_default(), name = %restore.name_any()))]
pub async fn reconcile(restore: Arc<GpuRestore>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconcile(KIND);
    let name = restore.name_any();
    let ns = restore.namespace().ok_or_else(|| Error::NoNamespace {
        kind: KIND,
        name: name.clone(),
    })?;
    if restore.phase().is_terminal() || restore.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let api: Api<GpuRestore> = Api::namespaced(ctx.client.clone(), &ns);
    let status = restore.status.clone().unwrap_or_default();
    match status.pod_name {
        None => create_pod(&restore, &api, &ctx, &ns).await,
        Some(pod_name) => track_pod(&restore, &api, &ctx, &ns, &pod_name).await,
    }
}

async fn create_pod(
    restore: &GpuRestore,
    api: &Api<GpuRestore>,
    ctx: &Context,
    ns: &str,
) -> Result<Action, Error> {
    let cp_name = &restore.spec.checkpoint_name;
    let checkpoints: Api<GpuCheckpoint> = Api::namespaced(ctx.client.clone(), ns);
    let Some(cp) = checkpoints.get_opt(cp_name).await.map_err(kube_err(
        "get",
        "GpuCheckpoint",
        ns,
        cp_name,
    ))?
    else {
        let msg = format!("GpuCheckpoint {ns}/{cp_name} does not exist");
        return fail(restore, api, ctx, "CheckpointNotFound", msg).await;
    };
    match cp.phase() {
        CheckpointPhase::Completed => {}
        CheckpointPhase::Failed => {
            let msg = format!("GpuCheckpoint {cp_name} failed; there is nothing to restore");
            return fail(restore, api, ctx, "CheckpointFailed", msg).await;
        }
        _ => return Ok(Action::requeue(POLL)),
    }
    let owner = owner_ref(restore).ok_or_else(|| Error::PodBuild {
        owner: restore.name_any(),
        reason: "the GpuRestore has no uid yet".into(),
    })?;
    let pod_name = restore
        .spec
        .pod_name
        .clone()
        .unwrap_or_else(|| format!("{}-restored", restore.name_any()));
    // A checkpoint held only in node-local tiers can be restored only on its node: pin the
    // pod there, and hand the restore to that node's agent now so it stages the checkpoint
    // while the pod is still being scheduled.
    let pinned = local_node(&cp);
    let mut node_selector = restore.spec.node_selector.clone();
    if let Some(node) = &pinned {
        node_selector.insert(HOSTNAME_LABEL.into(), node.clone());
        label_node(restore, api, ns, node).await?;
    }
    let pod = RestoredPod {
        name: pod_name.clone(),
        namespace: ns.to_owned(),
        owner,
        labels: BTreeMap::new(),
        checkpoint: Some(&cp),
        template: restore.spec.template.as_ref(),
        node_selector: &node_selector,
    };
    let pod = match pod.build() {
        Ok(pod) => pod,
        Err(e) => return fail(restore, api, ctx, "PodSpecMissing", e.to_string()).await,
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    match pods.create(&PostParams::default(), &pod).await {
        Ok(_) => {}
        // Created by an earlier reconcile whose status write was lost: adopt it.
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(kube_err("create", "Pod", ns, &pod_name)(e)),
    }
    let status = GpuRestoreStatus {
        phase: RestorePhase::Restoring,
        pod_name: Some(pod_name.clone()),
        started_at: Some(ctx.now()),
        artifact_ref: cp.status.as_ref().and_then(|s| s.artifact_ref.clone()),
        ..owned_status(restore)
    };
    apply_status(api, restore, KIND, status).await?;
    ctx.event(
        restore,
        false,
        "PodCreated",
        format!("pod {pod_name} restores checkpoint {cp_name}"),
    )
    .await;
    Ok(Action::requeue(POLL))
}

async fn track_pod(
    restore: &GpuRestore,
    api: &Api<GpuRestore>,
    ctx: &Context,
    ns: &str,
    pod_name: &str,
) -> Result<Action, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let Some(pod) = pods
        .get_opt(pod_name)
        .await
        .map_err(kube_err("get", "Pod", ns, pod_name))?
    else {
        let msg = format!("pod {pod_name} was deleted before it ran");
        return fail(restore, api, ctx, "PodDeleted", msg).await;
    };
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
    let status = restore.status.clone().unwrap_or_default();
    let elapsed = status
        .started_at
        .map(|t| ctx.clock.now().as_second() - t.0.as_second())
        .unwrap_or(0);
    if let Some(node) = &node {
        label_node(restore, api, ns, node).await?;
    }
    match phase.as_deref() {
        Some("Running") => {
            let millis = u64::try_from(elapsed).unwrap_or(0).saturating_mul(1000);
            let status = GpuRestoreStatus {
                phase: RestorePhase::Completed,
                node_name: node.clone(),
                phases: vec![PhaseDuration {
                    phase: "pod_running".into(),
                    millis,
                }],
                ..owned_status(restore)
            };
            apply_status(api, restore, KIND, status).await?;
            ctx.event(
                restore,
                false,
                "Restored",
                format!(
                    "pod {pod_name} runs on node {}",
                    node.as_deref().unwrap_or("?")
                ),
            )
            .await;
            Ok(Action::await_change())
        }
        Some("Failed") => {
            let msg = format!("pod {pod_name} failed while restoring");
            fail(restore, api, ctx, "PodFailed", msg).await
        }
        _ if elapsed >= i64::from(restore.spec.timeout_seconds) => {
            let msg = format!(
                "pod {pod_name} not Running within {} s",
                restore.spec.timeout_seconds
            );
            fail(restore, api, ctx, "Timeout", msg).await
        }
        _ => Ok(Action::requeue(POLL)),
    }
}

/// Hands the restore to `node`'s agent (it watches objects with its node label).
async fn label_node(
    restore: &GpuRestore,
    api: &Api<GpuRestore>,
    ns: &str,
    node: &str,
) -> Result<(), Error> {
    if restore.labels().get(NODE_LABEL).map(String::as_str) == Some(node) {
        return Ok(());
    }
    let name = restore.name_any();
    let labels = ObjectMeta {
        name: Some(name.clone()),
        labels: Some([(NODE_LABEL.to_owned(), node.to_owned())].into()),
        ..ObjectMeta::default()
    };
    api.patch(
        &name,
        &apply::params(CONTROLLER_MANAGER),
        &apply::metadata::<GpuRestore>(labels),
    )
    .await
    .map_err(kube_err("patch", KIND, ns, &name))?;
    Ok(())
}

/// The status fields the controller owns, as it last applied them (server-side apply drops
/// owned fields an apply leaves out). `staging` and the `Staged` condition are the agent's.
fn owned_status(restore: &GpuRestore) -> GpuRestoreStatus {
    let status = restore.status.clone().unwrap_or_default();
    GpuRestoreStatus {
        phase: status.phase,
        node_name: status.node_name,
        pod_name: status.pod_name,
        started_at: status.started_at,
        artifact_ref: status.artifact_ref,
        phases: status.phases,
        ..GpuRestoreStatus::default()
    }
}

/// Marks the restore Failed with the controller's `Failed` condition; the agent's
/// `Staged` condition stays.
async fn fail(
    restore: &GpuRestore,
    api: &Api<GpuRestore>,
    ctx: &Context,
    reason: &str,
    message: String,
) -> Result<Action, Error> {
    let status = GpuRestoreStatus {
        phase: RestorePhase::Failed,
        conditions: vec![Condition::new(
            FAILED_CONDITION,
            reason,
            message.clone(),
            ctx.now(),
        )],
        ..owned_status(restore)
    };
    apply_status(api, restore, KIND, status).await?;
    ctx.metrics.failure(KIND, reason);
    ctx.event(restore, true, reason, message).await;
    Ok(Action::await_change())
}
