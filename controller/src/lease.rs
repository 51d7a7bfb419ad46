//! Leader election through a `coordination.k8s.io/v1` Lease, so only one controller replica
//! reconciles at a time. The Lease is read and written with a client of its own; the
//! reconcilers' client passes the [`WriteFence`] that each renewal opens or closes.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;

use crate::error::{kube_err, Error};
use crate::fence::WriteFence;

/// One replica's claim on the Lease.
#[derive(Debug, Clone)]
pub struct LeaderLease {
    api: Api<Lease>,
    namespace: String,
    name: String,
    identity: String,
    duration_seconds: i32,
}

impl LeaderLease {
    /// A claim on Lease `namespace/name` by `identity` (the pod name), valid for
    /// `duration_seconds` after each renewal.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration_seconds: i32,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            duration_seconds,
        }
    }

    /// Takes or renews the Lease. `Ok(true)`: we lead until `now + duration`. `Ok(false)`:
    /// another live replica holds it, or it changed under us.
    pub async fn try_acquire(&self, now: Timestamp) -> Result<bool, Error> {
        let ns = self.namespace.clone();
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(kube_err("get", "Lease", &ns, &self.name))?;
        let spec = LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration_seconds),
            renew_time: Some(MicroTime(now)),
            ..LeaseSpec::default()
        };
        let result = match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        acquire_time: Some(MicroTime(now)),
                        ..spec
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            Some(mut lease) => {
                let old = lease.spec.clone().unwrap_or_default();
                let ours = old.holder_identity.as_deref() == Some(self.identity.as_str());
                let expires = old
                    .renew_time
                    .map(|t| t.0.as_second() + i64::from(old.lease_duration_seconds.unwrap_or(0)));
                if !ours && expires.is_some_and(|e| e > now.as_second()) {
                    return Ok(false);
                }
                let transitions = old.lease_transitions.unwrap_or(0) + i32::from(!ours);
                lease.spec = Some(LeaseSpec {
                    acquire_time: if ours {
                        old.acquire_time
                    } else {
                        Some(MicroTime(now))
                    },
                    lease_transitions: Some(transitions),
                    ..spec
                });
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(kube_err("write", "Lease", &ns, &self.name)(e)),
        }
    }

    /// Renews the Lease (or takes it) and sets `fence` to the outcome: open only when the
    /// renewal succeeded within `limit`. Any failure, a refusal or a slow answer closes the
    /// fence before this returns, so no reconcile writes on a Lease that may have lapsed.
    pub async fn renew(&self, fence: &WriteFence, now: Timestamp, limit: Duration) -> bool {
        let leading = match tokio::time::timeout(limit, self.try_acquire(now)).await {
            Ok(Ok(leading)) => leading,
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot renew the Lease; writes are fenced");
                false
            }
            Err(_) => {
                tracing::warn!(?limit, "Lease renewal timed out; writes are fenced");
                false
            }
        };
        if leading {
            fence.open();
        } else {
            fence.close();
        }
        leading
    }
}
