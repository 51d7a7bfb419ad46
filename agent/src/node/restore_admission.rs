//! Who may restore a checkpoint here: the tenancy check ([`crate::tenancy`]) with the grants
//! the node worker watches, for container restores (the shim's Stage) and GpuRestores. A
//! refusal is logged, counted and handed to the node worker, which posts it as a Kubernetes
//! Event on the pod that asked.

use actix::prelude::*;
use kybernate_dataplane::CheckpointName;
use kybernate_proto::agent::v1 as pb;

use super::NodeAgent;
use crate::catalog::CheckpointRecord;
use crate::error::AgentError;
use crate::tenancy::{check_restore, Allowed, Grants, Refused};

/// A restore into a pod refused by the tenancy check, for the node worker's Event.
#[derive(Debug, Clone)]
pub struct RefusedRestore {
    /// The refusal, naming the checkpoint and both namespaces.
    pub refused: Refused,
    /// The pod that asked.
    pub pod: pb::PodIdentity,
}

/// From now on decide with `0`: the grants the node worker's watch keeps.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct UseGrants(pub Grants);

impl Handler<UseGrants> for NodeAgent {
    type Result = ();
    fn handle(&mut self, msg: UseGrants, _: &mut Self::Context) {
        self.grants = msg.0;
    }
}

/// From now on record the service account of container checkpoints' pods from `0`: the
/// pods of this node the node worker's watch keeps.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct UsePods(pub kube::runtime::reflector::Store<k8s_openapi::api::core::v1::Pod>);

impl Handler<UsePods> for NodeAgent {
    type Result = ();
    fn handle(&mut self, msg: UsePods, _: &mut Self::Context) {
        self.parts.pods.attach(msg.0);
    }
}

/// A receiver of every refused restore into a pod.
#[derive(Debug, Message)]
#[rtype(result = "tokio::sync::broadcast::Receiver<RefusedRestore>")]
pub struct SubscribeRefusals;

impl Handler<SubscribeRefusals> for NodeAgent {
    type Result = MessageResult<SubscribeRefusals>;
    fn handle(&mut self, _: SubscribeRefusals, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.refusals.subscribe())
    }
}

/// May a pod of `namespace` restore `checkpoint_ref`? `Ok(false)`: this node does not hold
/// it (yet), so nothing was decided. Used for GpuRestores before their checkpoint is staged.
#[derive(Debug, Message)]
#[rtype(result = "Result<bool, AgentError>")]
pub struct CheckRestoreInto {
    /// The agent's name of the checkpoint.
    pub checkpoint_ref: String,
    /// The namespace the restored pod will run in.
    pub namespace: String,
}

impl Handler<CheckRestoreInto> for NodeAgent {
    type Result = Result<bool, AgentError>;
    fn handle(&mut self, msg: CheckRestoreInto, _: &mut Self::Context) -> Self::Result {
        let name = CheckpointName::new(&msg.checkpoint_ref)?;
        let Some(record) = self.catalog.get(&name) else {
            return Ok(false);
        };
        self.admit_restore(&name, record, Some(&msg.namespace), None)?;
        Ok(true)
    }
}

impl NodeAgent {
    /// Checks that `record` may be restored into a pod of `namespace` (`None`: not into a
    /// pod); `pod` is the pod that asked, when there is one yet. Refusals are logged,
    /// counted and published for the node worker.
    pub(super) fn admit_restore(
        &self,
        name: &CheckpointName,
        record: &CheckpointRecord,
        namespace: Option<&str>,
        pod: Option<&pb::PodIdentity>,
    ) -> Result<(), AgentError> {
        match check_restore(name.as_str(), &record.origin, namespace, &self.grants) {
            Ok(Allowed::Granted(grant)) => {
                tracing::info!(checkpoint = %name, namespace = namespace.unwrap_or_default(),
                    %grant, "restore across namespaces allowed by a GpuCheckpointGrant");
                Ok(())
            }
            Ok(Allowed::SameNamespace | Allowed::NotIntoAPod) => Ok(()),
            Err(refused) => {
                self.parts
                    .metrics
                    .failure("restore", "tenancy", "refused_tenant");
                tracing::warn!(checkpoint = %name, pod = pod.map(|p| p.pod_name.as_str()).unwrap_or_default(),
                    %refused, "refused a container restore across tenants");
                if let Some(pod) = pod {
                    // Nobody listening (no API server) is fine: the log and metric remain.
                    let _ = self.refusals.send(RefusedRestore {
                        refused: refused.clone(),
                        pod: pod.clone(),
                    });
                }
                Err(refused.into())
            }
        }
    }
}
