//! Reconciling `GpuCheckpoint`: pod → node resolution, RuntimeClass check, node label,
//! overall timeout, and the finalizer that keeps referenced checkpoints.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::ResourceExt;
use serde_json::json;

use crate::context::Context;
use crate::crd::{
    CheckpointPhase, Condition, GpuCheckpoint, GpuRestore, GpuWorkload, TargetContainer,
    ARTIFACTS_FINALIZER, NODE_LABEL, REFERENCED_FINALIZER, RUNTIME_CLASS,
};
use crate::error::{kube_err, Error};

const KIND: &str = "GpuCheckpoint";
/// How often a running checkpoint is looked at even without changes (node loss, timeout).
const POLL: Duration = Duration::from_secs(30);
/// How often to look again at a pod that is not yet running.
const WAIT_FOR_POD: Duration = Duration::from_secs(5);

/// Reconciles one GpuCheckpoint.
pub async fn reconcile(cp: Arc<GpuCheckpoint>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconcile(KIND);
    let name = cp.name_any();
    let ns = cp.namespace().ok_or_else(|| Error::NoNamespace {
        kind: KIND,
        name: name.clone(),
    })?;
    let api: Api<GpuCheckpoint> = Api::namespaced(ctx.client.clone(), &ns);
    if cp.metadata.deletion_timestamp.is_some() {
        return release(&cp, &api, &ctx, &ns).await;
    }
    if !cp.finalizers().iter().any(|f| f == REFERENCED_FINALIZER) {
        let mut finalizers = cp.finalizers().to_vec();
        finalizers.push(REFERENCED_FINALIZER.into());
        set_finalizers(&api, &cp, finalizers).await?;
    }
    match cp.phase() {
        CheckpointPhase::Completed => Ok(Action::await_change()),
        CheckpointPhase::Failed => {
            report_failure(&cp, &ctx).await;
            Ok(Action::await_change())
        }
        CheckpointPhase::Pending => schedule(&cp, &api, &ctx, &ns).await,
        CheckpointPhase::Scheduled | CheckpointPhase::Checkpointing | CheckpointPhase::Draining => {
            watch_running(&cp, &api, &ctx).await
        }
    }
}

/// Resolves the pod to its node and containers and hands the object to that node's agent.
async fn schedule(
    cp: &GpuCheckpoint,
    api: &Api<GpuCheckpoint>,
    ctx: &Context,
    ns: &str,
) -> Result<Action, Error> {
    let pod_name = &cp.spec.pod_name;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let Some(pod) = pods
        .get_opt(pod_name)
        .await
        .map_err(kube_err("get", "Pod", ns, pod_name))?
    else {
        let msg = format!("pod {ns}/{pod_name} does not exist");
        return fail(cp, api, ctx, "PodNotFound", msg).await;
    };
    let spec = pod.spec.clone().unwrap_or_default();
    if spec.runtime_class_name.as_deref() != Some(RUNTIME_CLASS) {
        let msg = format!(
            "pod {ns}/{pod_name} runs under RuntimeClass {}; only pods with runtimeClassName: \
             {RUNTIME_CLASS} can be checkpointed (recreate the pod with it)",
            spec.runtime_class_name.as_deref().unwrap_or("<none>")
        );
        return fail(cp, api, ctx, "NotKybernateRuntime", msg).await;
    }
    let status = pod.status.clone().unwrap_or_default();
    let (Some(node_name), Some("Running")) = (spec.node_name.clone(), status.phase.as_deref())
    else {
        return Ok(Action::requeue(WAIT_FOR_POD));
    };
    let containers = match target_containers(&pod, cp.spec.container.as_deref()) {
        Ok(c) => c,
        Err(msg) => return fail(cp, api, ctx, "ContainerNotFound", msg).await,
    };
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    if nodes
        .get_opt(&node_name)
        .await
        .map_err(kube_err("get", "Node", "", &node_name))?
        .is_none()
    {
        let msg = format!("node {node_name} of pod {ns}/{pod_name} no longer exists");
        return fail(cp, api, ctx, "NodeGone", msg).await;
    }
    let name = cp.name_any();
    api.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {NODE_LABEL: node_name}}})),
    )
    .await
    .map_err(kube_err("patch", KIND, ns, &name))?;
    let mut captured = spec;
    captured.node_name = None;
    let status = json!({"status": {
        "phase": CheckpointPhase::Scheduled,
        "nodeName": node_name,
        "podUid": pod.metadata.uid,
        "containers": containers,
        "scheduledAt": ctx.now(),
        "capturedPodSpec": captured,
    }});
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .map_err(kube_err("patch", KIND, ns, &name))?;
    ctx.event(
        cp,
        false,
        "Scheduled",
        format!("pod {pod_name} runs on node {node_name}; its agent checkpoints it"),
    )
    .await;
    Ok(Action::requeue(POLL))
}

/// The containers to checkpoint, with their runtime IDs.
fn target_containers(pod: &Pod, only: Option<&str>) -> Result<Vec<TargetContainer>, String> {
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default();
    let picked: Vec<TargetContainer> = statuses
        .iter()
        .filter(|c| only.is_none_or(|o| o == c.name))
        .filter_map(|c| {
            let id = c.container_id.as_deref()?;
            let id = id.split_once("://").map_or(id, |(_, id)| id);
            Some(TargetContainer {
                name: c.name.clone(),
                container_id: id.to_owned(),
            })
        })
        .collect();
    if picked.is_empty() {
        return Err(match only {
            Some(o) => format!("pod {} has no running container {o}", pod.name_any()),
            None => format!("pod {} has no running containers", pod.name_any()),
        });
    }
    Ok(picked)
}

/// Enforces the overall timeout and notices a lost node while the agent works.
async fn watch_running(
    cp: &GpuCheckpoint,
    api: &Api<GpuCheckpoint>,
    ctx: &Context,
) -> Result<Action, Error> {
    let status = cp.status.clone().unwrap_or_default();
    if let Some(node_name) = &status.node_name {
        let nodes: Api<Node> = Api::all(ctx.client.clone());
        if nodes
            .get_opt(node_name)
            .await
            .map_err(kube_err("get", "Node", "", node_name))?
            .is_none()
        {
            let msg = format!("node {node_name} disappeared while its agent was checkpointing");
            return fail(cp, api, ctx, "NodeGone", msg).await;
        }
    }
    let limit = i64::from(cp.spec.timeouts.overall_seconds);
    let started = status
        .scheduled_at
        .map(|t| t.0)
        .unwrap_or_else(|| ctx.clock.now());
    let elapsed = ctx.clock.now().as_second() - started.as_second();
    if elapsed >= limit {
        let msg = format!(
            "not Completed within {limit} s (phase {:?} on node {})",
            status.phase,
            status.node_name.as_deref().unwrap_or("?")
        );
        return fail(cp, api, ctx, "Timeout", msg).await;
    }
    let left = u64::try_from(limit - elapsed).unwrap_or(1);
    Ok(Action::requeue(POLL.min(Duration::from_secs(left))))
}

/// Marks the object Failed with a reason.
async fn fail(
    cp: &GpuCheckpoint,
    api: &Api<GpuCheckpoint>,
    ctx: &Context,
    reason: &str,
    message: String,
) -> Result<Action, Error> {
    let name = cp.name_any();
    let ns = cp.namespace().unwrap_or_default();
    let now = ctx.now();
    let condition = Condition::new("Failed", reason, message.clone(), now.clone());
    let status = json!({"status": {
        "phase": CheckpointPhase::Failed,
        "finishedAt": now,
        "conditions": [condition],
    }});
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .map_err(kube_err("patch", KIND, &ns, &name))?;
    ctx.metrics.failure(KIND, reason);
    ctx.event(cp, true, reason, message).await;
    Ok(Action::await_change())
}

/// A Failed object written by the agent: publish its reason.
async fn report_failure(cp: &GpuCheckpoint, ctx: &Context) {
    let Some(condition) = cp
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Failed"))
    else {
        return;
    };
    ctx.event(cp, true, &condition.reason, condition.message.clone())
        .await;
}

/// On deletion: keep the checkpoint while a restore or a workload still needs it, and drop
/// the agent's finalizer when the node that held the artifacts is gone.
async fn release(
    cp: &GpuCheckpoint,
    api: &Api<GpuCheckpoint>,
    ctx: &Context,
    ns: &str,
) -> Result<Action, Error> {
    let name = cp.name_any();
    if !cp.finalizers().iter().any(|f| f == REFERENCED_FINALIZER) {
        return Ok(Action::await_change());
    }
    if let Some(user) = referenced_by(&name, ctx, ns).await? {
        ctx.event(
            cp,
            true,
            "StillReferenced",
            format!("kept: {user} still needs this checkpoint"),
        )
        .await;
        return Ok(Action::requeue(POLL));
    }
    let mut keep: Vec<String> = cp
        .finalizers()
        .iter()
        .filter(|f| *f != REFERENCED_FINALIZER)
        .cloned()
        .collect();
    if let Some(node) = cp.labels().get(NODE_LABEL) {
        let nodes: Api<Node> = Api::all(ctx.client.clone());
        let gone = nodes
            .get_opt(node)
            .await
            .map_err(kube_err("get", "Node", "", node))?
            .is_none();
        if gone && keep.iter().any(|f| f == ARTIFACTS_FINALIZER) {
            keep.retain(|f| f != ARTIFACTS_FINALIZER);
            ctx.event(
                cp,
                true,
                "ArtifactsLost",
                format!("node {node} is gone; its local copies went with it"),
            )
            .await;
        }
    }
    set_finalizers(api, cp, keep).await?;
    Ok(Action::await_change())
}

/// Who still needs checkpoint `name`: an unfinished restore, or a workload whose latest
/// completed checkpoint it is.
async fn referenced_by(name: &str, ctx: &Context, ns: &str) -> Result<Option<String>, Error> {
    let restores: Api<GpuRestore> = Api::namespaced(ctx.client.clone(), ns);
    let list = restores
        .list(&ListParams::default())
        .await
        .map_err(kube_err("list", "GpuRestore", ns, "*"))?;
    if let Some(r) = list
        .items
        .iter()
        .find(|r| r.spec.checkpoint_name == name && !r.phase().is_terminal())
    {
        return Ok(Some(format!("GpuRestore {}", r.name_any())));
    }
    let workloads: Api<GpuWorkload> = Api::namespaced(ctx.client.clone(), ns);
    let list = workloads
        .list(&ListParams::default())
        .await
        .map_err(kube_err("list", "GpuWorkload", ns, "*"))?;
    Ok(list
        .items
        .iter()
        .find(|w| {
            w.metadata.deletion_timestamp.is_none()
                && w.status
                    .as_ref()
                    .and_then(|s| s.latest_checkpoint.as_deref())
                    == Some(name)
        })
        .map(|w| format!("GpuWorkload {} (its latest checkpoint)", w.name_any())))
}

/// Replaces the finalizer list, guarded by the resourceVersion we read.
pub(crate) async fn set_finalizers<K>(
    api: &Api<K>,
    obj: &K,
    finalizers: Vec<String>,
) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = obj.name_any();
    let patch = json!({"metadata": {
        "finalizers": finalizers,
        "resourceVersion": obj.resource_version(),
    }});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map_err(kube_err(
            "patch",
            "finalizers",
            &obj.namespace().unwrap_or_default(),
            &name,
        ))?;
    Ok(())
}
