//! Building the pod that a restore starts: the `kybernate` RuntimeClass, the
//! `kybernate.io/restore-from` annotation and node affinity to GPU-compatible nodes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod,
    PodTemplateSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::error::Error;
use kybernate_api::apply::CONTROLLER_MANAGER;
use kybernate_api::{
    GpuCheckpoint, GpuFingerprintStatus, StorageTier, GPU_COUNT_LABEL, GPU_DRIVER_LABEL,
    GPU_MODEL_LABEL, MANAGED_BY_LABEL, RESTORE_FROM_ANNOTATION, RUNTIME_CLASS,
};

/// What the new pod is made from.
#[derive(Debug)]
pub struct RestoredPod<'a> {
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// The GpuRestore or GpuWorkload that owns the pod.
    pub owner: OwnerReference,
    /// Labels to add (e.g. the workload label).
    pub labels: BTreeMap<String, String>,
    /// The checkpoint to restore, or `None` to start fresh (a workload's first pod).
    pub checkpoint: Option<&'a GpuCheckpoint>,
    /// A template that overrides the spec captured at checkpoint time.
    pub template: Option<&'a PodTemplateSpec>,
    /// Extra node selector.
    pub node_selector: &'a BTreeMap<String, String>,
}

impl RestoredPod<'_> {
    /// The pod to create.
    pub fn build(&self) -> Result<Pod, Error> {
        let fail = |reason: &str| Error::PodBuild {
            owner: format!("{}/{}", self.namespace, self.owner.name),
            reason: reason.into(),
        };
        let captured = self
            .checkpoint
            .and_then(|cp| cp.status.as_ref())
            .and_then(|s| s.captured_pod_spec.clone());
        let (template_meta, spec) = match (self.template, captured) {
            (Some(t), _) => (t.metadata.clone().unwrap_or_default(), t.spec.clone()),
            (None, spec) => (ObjectMeta::default(), spec),
        };
        let mut spec = spec.ok_or_else(|| {
            fail("neither a pod template nor a pod spec captured by the checkpoint")
        })?;
        spec.runtime_class_name = Some(RUNTIME_CLASS.into());
        spec.node_name = None;
        if !self.node_selector.is_empty() {
            let selector = spec.node_selector.get_or_insert_with(BTreeMap::new);
            selector.extend(self.node_selector.clone());
        }
        let mut annotations = template_meta.annotations.unwrap_or_default();
        if let Some(cp) = self.checkpoint {
            let status = cp.status.clone().unwrap_or_default();
            let artifact = status
                .artifact_ref
                .ok_or_else(|| fail("the checkpoint has no artifact reference"))?;
            annotations.insert(RESTORE_FROM_ANNOTATION.into(), artifact);
            let gpu = status.gpu.unwrap_or_default();
            let affinity = spec.affinity.get_or_insert_with(Affinity::default);
            let node = affinity
                .node_affinity
                .get_or_insert_with(NodeAffinity::default);
            let required = node
                .required_during_scheduling_ignored_during_execution
                .get_or_insert_with(NodeSelector::default);
            let expressions = gpu_requirements(&gpu);
            if required.node_selector_terms.is_empty() {
                required
                    .node_selector_terms
                    .push(NodeSelectorTerm::default());
            }
            // Terms are ORed: every term must carry the GPU requirements.
            for term in &mut required.node_selector_terms {
                term.match_expressions
                    .get_or_insert_with(Vec::new)
                    .extend(expressions.clone());
            }
        }
        let mut labels = template_meta.labels.unwrap_or_default();
        labels.extend(self.labels.clone());
        // The controller's pod watches select this label, not every pod in the cluster.
        labels.insert(MANAGED_BY_LABEL.into(), CONTROLLER_MANAGER.into());
        Ok(Pod {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(labels),
                annotations: (!annotations.is_empty()).then_some(annotations),
                owner_references: Some(vec![self.owner.clone()]),
                ..ObjectMeta::default()
            },
            spec: Some(spec),
            status: None,
        })
    }
}

/// Node requirements for restoring a checkpoint taken on `gpu`: a node with a Kybernate
/// agent (it labels its node), the same GPU model, at least as new a driver and at least as
/// many GPUs.
pub fn gpu_requirements(gpu: &GpuFingerprintStatus) -> Vec<NodeSelectorRequirement> {
    let req = |key: &str, operator: &str, values: Vec<String>| NodeSelectorRequirement {
        key: key.into(),
        operator: operator.into(),
        values: (!values.is_empty()).then_some(values),
    };
    if gpu.count == 0 {
        return vec![req(GPU_COUNT_LABEL, "Exists", vec![])];
    }
    vec![
        req(GPU_MODEL_LABEL, "In", vec![gpu.model.clone()]),
        req(
            GPU_DRIVER_LABEL,
            "Gt",
            vec![(i64::from(gpu.driver_version) - 1).to_string()],
        ),
        req(
            GPU_COUNT_LABEL,
            "Gt",
            vec![(i64::from(gpu.count) - 1).to_string()],
        ),
    ]
}

/// An owner reference that makes the owner's deletion remove the pod.
pub fn owner_ref<K: kube::Resource<DynamicType = ()>>(owner: &K) -> Option<OwnerReference> {
    owner.controller_owner_ref(&())
}

/// The node whose local tiers hold the only copies of `cp` (no S3 copy), if any.
pub fn local_node(cp: &GpuCheckpoint) -> Option<String> {
    let status = cp.status.as_ref()?;
    if status.tiers.iter().any(|t| t == StorageTier::S3.as_str()) {
        return None;
    }
    status.node_name.clone()
}
