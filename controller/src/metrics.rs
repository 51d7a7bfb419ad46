//! Prometheus metrics of the controller: reconciles and errors by kind and reason.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Labels of the reconcile counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// GpuCheckpoint, GpuRestore or GpuWorkload.
    pub kind: String,
}

/// Labels of the error and failure counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Object kind.
    pub kind: String,
    /// `Error::metric_label()` or a condition reason.
    pub reason: String,
}

/// The controller's counters and the registry that exposes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Family<KindLabels, Counter>,
    errors: Family<ReasonLabels, Counter>,
    failures: Family<ReasonLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every counter.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kybernate_controller");
        let reconciles = Family::<KindLabels, Counter>::default();
        let errors = Family::<ReasonLabels, Counter>::default();
        let failures = Family::<ReasonLabels, Counter>::default();
        registry.register("reconciles", "Reconciles started", reconciles.clone());
        registry.register(
            "errors",
            "Reconciles that failed, by reason",
            errors.clone(),
        );
        registry.register(
            "object_failures",
            "Objects that reached phase Failed, by condition reason",
            failures.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            failures,
        }
    }

    /// Counts a reconcile of `kind`.
    pub fn reconcile(&self, kind: &str) {
        self.reconciles
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    /// Counts a failed reconcile.
    pub fn error(&self, kind: &str, reason: &str) {
        self.errors
            .get_or_create(&ReasonLabels {
                kind: kind.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// Counts an object that failed (its condition reason).
    pub fn failure(&self, kind: &str, reason: &str) {
        self.failures
            .get_or_create(&ReasonLabels {
                kind: kind.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_reconciles_and_errors_by_kind_and_reason() {
        let m = Metrics::new();
        m.reconcile("GpuCheckpoint");
        m.reconcile("GpuCheckpoint");
        m.error("GpuRestore", "kube_get");
        m.failure("GpuCheckpoint", "Timeout");
        let text = m.encode();
        assert!(
            text.contains("kybernate_controller_reconciles_total{kind=\"GpuCheckpoint\"} 2"),
            "{text}"
        );
        assert!(
            text.contains(
                "kybernate_controller_errors_total{kind=\"GpuRestore\",reason=\"kube_get\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("kybernate_controller_object_failures_total{kind=\"GpuCheckpoint\",reason=\"Timeout\"} 1"),
            "{text}"
        );
    }
}
