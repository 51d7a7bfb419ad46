//! Reconciling `GpuCheckpoint`: pod → node resolution, RuntimeClass check, node label,
//! overall timeout, and the finalizer that keeps referenced checkpoints.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{finalizer, Event};
use kube::ResourceExt;

use crate::context::Context;
use crate::error::{finalizer_err, kube_err, Error};
use crate::status::apply_status;
use kybernate_api::apply::{self, CONTROLLER_MANAGER};
use kybernate_api::{
    CheckpointPhase, Condition, GpuCheckpoint, GpuCheckpointStatus, GpuRestore, GpuWorkload,
    TargetContainer, ARTIFACTS_FINALIZER, FAILED_CONDITION, NODE_LABEL, REFERENCED_FINALIZER,
    RUNTIME_CLASS,
};

const KIND: &str = "GpuCheckpoint";
/// How often a running checkpoint is looked at even without changes (node loss, timeout),
/// and a deleted one that is still referenced.
pub const POLL: Duration = Duration::from_secs(30);
/// How often to look again at a pod that is not yet running.
const WAIT_FOR_POD: Duration = Duration::from_secs(5);

/// Reconciles one GpuCheckpoint. The finalizer `kybernate.io/referenced` is kept by
/// kube-runtime's finalizer helper: added before anything else happens, and removed on
/// deletion only once [`release`] finds no user of the checkpoint.
#[tracing::instrument(skip_all, fields(namespace = %cp.namespace().unwrap_or_default(), name = %cp.name_any()))]
pub async fn reconcile(cp: Arc<GpuCheckpoint>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconcile(KIND);
    let name = cp.name_any();
    let ns = cp.namespace().ok_or_else(|| Error::NoNamespace {
        kind: KIND,
        name: name.clone(),
    })?;
    let api: Api<GpuCheckpoint> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, REFERENCED_FINALIZER, cp, |event| async {
        match event {
            Event::Apply(cp) => apply_phase(&cp, &api, &ctx, &ns).await,
            Event::Cleanup(cp) => release(&cp, &api, &ctx, &ns).await,
        }
    })
    .await
    .map_err(finalizer_err(REFERENCED_FINALIZER, KIND, &ns, &name))
}

/// Takes a live checkpoint one step further according to its phase.
async fn apply_phase(
    cp: &GpuCheckpoint,
    api: &Api<GpuCheckpoint>,
    ctx: &Context,
    ns: &str,
) -> Result<Action, Error> {
    match cp.phase() {
        CheckpointPhase::Completed => Ok(Action::await_change()),
        CheckpointPhase::Failed => {
            report_failure(cp, ctx).await;
            Ok(Action::await_change())
        }
        CheckpointPhase::Pending => schedule(cp, api, ctx, ns).await,
        CheckpointPhase::Scheduled | CheckpointPhase::Checkpointing | CheckpointPhase::Draining => {
            watch_running(cp, api, ctx).await
        }
    }
}

/// The status fields the controller owns, as it last applied them; every apply of the
/// controller carries them, since server-side apply drops owned fields left out.
fn owned_status(cp: &GpuCheckpoint) -> GpuCheckpointStatus {
    let status = cp.status.clone().unwrap_or_default();
    GpuCheckpointStatus {
        node_name: status.node_name,
        pod_uid: status.pod_uid,
        containers: status.containers,
        scheduled_at: status.scheduled_at,
        captured_pod_spec: status.captured_pod_spec,
        ..GpuCheckpointStatus::default()
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
    let labels = ObjectMeta {
        name: Some(name.clone()),
        labels: Some([(NODE_LABEL.to_owned(), node_name.clone())].into()),
        ..ObjectMeta::default()
    };
    api.patch(
        &name,
        &apply::params(CONTROLLER_MANAGER),
        &apply::metadata::<GpuCheckpoint>(labels),
    )
    .await
    .map_err(kube_err("patch", KIND, ns, &name))?;
    let mut captured = spec;
    captured.node_name = None;
    let status = GpuCheckpointStatus {
        phase: CheckpointPhase::Scheduled,
        node_name: Some(node_name.clone()),
        pod_uid: pod.metadata.uid.clone(),
        containers,
        scheduled_at: Some(ctx.now()),
        captured_pod_spec: Some(captured),
        ..GpuCheckpointStatus::default()
    };
    apply_status(api, cp, KIND, status).await?;
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

/// Marks the object Failed with a reason (the controller's `Failed` condition; the
/// agent's conditions stay).
async fn fail(
    cp: &GpuCheckpoint,
    api: &Api<GpuCheckpoint>,
    ctx: &Context,
    reason: &str,
    message: String,
) -> Result<Action, Error> {
    let now = ctx.now();
    let status = GpuCheckpointStatus {
        phase: CheckpointPhase::Failed,
        finished_at: Some(now.clone()),
        conditions: vec![Condition::new(
            FAILED_CONDITION,
            reason,
            message.clone(),
            now,
        )],
        ..owned_status(cp)
    };
    apply_status(api, cp, KIND, status).await?;
    ctx.metrics.failure(KIND, reason);
    ctx.event(cp, true, reason, message).await;
    Ok(Action::await_change())
}

/// A Failed object written by the agent: publish its reason.
async fn report_failure(cp: &GpuCheckpoint, ctx: &Context) {
    let Some(condition) = cp
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == FAILED_CONDITION))
    else {
        return;
    };
    ctx.event(cp, true, &condition.reason, condition.message.clone())
        .await;
}

/// On deletion: keep the checkpoint while a restore or a workload still needs it (an
/// error keeps the finalizer), and drop the agent's finalizer when the node that held the
/// artifacts is gone. The finalizer helper removes ours once this returns Ok.
async fn release(
    cp: &GpuCheckpoint,
    api: &Api<GpuCheckpoint>,
    ctx: &Context,
    ns: &str,
) -> Result<Action, Error> {
    let name = cp.name_any();
    if let Some(user) = referenced_by(&name, ctx, ns).await? {
        ctx.event(
            cp,
            true,
            "StillReferenced",
            format!("kept: {user} still needs this checkpoint"),
        )
        .await;
        return Err(Error::StillReferenced {
            namespace: ns.to_owned(),
            name,
            user,
        });
    }
    let Some(node) = cp.labels().get(NODE_LABEL) else {
        return Ok(Action::await_change());
    };
    let Some(index) = cp
        .finalizers()
        .iter()
        .position(|f| f == ARTIFACTS_FINALIZER)
    else {
        return Ok(Action::await_change());
    };
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let gone = nodes
        .get_opt(node)
        .await
        .map_err(kube_err("get", "Node", "", node))?
        .is_none();
    if gone {
        drop_finalizer(api, cp, index, ARTIFACTS_FINALIZER).await?;
        ctx.event(
            cp,
            true,
            "ArtifactsLost",
            format!("node {node} is gone; its local copies went with it"),
        )
        .await;
    }
    Ok(Action::await_change())
}

/// Removes `finalizer` at `index`, refused by the API server when the list changed since
/// we read it. (Dropping one before ours shifts ours: the helper's own removal is then
/// refused and retried on the next reconcile, which finds the list as it is.)
async fn drop_finalizer(
    api: &Api<GpuCheckpoint>,
    cp: &GpuCheckpoint,
    index: usize,
    finalizer: &str,
) -> Result<(), Error> {
    use json_patch::{jsonptr::PointerBuf, PatchOperation, RemoveOperation, TestOperation};
    let index = index.to_string();
    let path = PointerBuf::from_tokens(["metadata", "finalizers", index.as_str()]);
    let patch = json_patch::Patch(vec![
        PatchOperation::Test(TestOperation {
            path: path.clone(),
            value: finalizer.into(),
        }),
        PatchOperation::Remove(RemoveOperation { path }),
    ]);
    let name = cp.name_any();
    api.patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .map_err(kube_err(
            "patch",
            "finalizers",
            &cp.namespace().unwrap_or_default(),
            &name,
        ))?;
    Ok(())
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
