//! Prometheus metrics of the agent, served over HTTP at the configured (loopback) address.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kybernate_dataplane::StoreReport;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of a phase: which operation ("checkpoint", "restore") and which phase.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// "checkpoint" or "restore".
    pub operation: String,
    /// Phase name.
    pub phase: String,
}

/// Labels of a failure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// "checkpoint" or "restore".
    pub operation: String,
    /// Phase that failed.
    pub phase: String,
    /// Short reason, from the error's metric label.
    pub reason: String,
}

/// Labels naming a tier.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    /// "ram", "nvme" or "s3".
    pub tier: String,
}

/// Labels of finished operations.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// "checkpoint" or "restore".
    pub operation: String,
    /// "ok" or "failed".
    pub result: String,
}

/// Labels of a config reload.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// "applied" or "rejected".
    pub result: String,
}

/// Labels of a byte-rate limit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// "s3_upload", "s3_download" or "nvme_write".
    pub limit: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;
type SecondsCounter = Counter<f64, std::sync::atomic::AtomicU64>;

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    phase_seconds: HistogramFamily<PhaseLabels>,
    failures: Family<FailureLabels, Counter>,
    operations: Family<OperationLabels, Counter>,
    raw_bytes: Counter,
    stored_bytes: Family<TierLabels, Counter>,
    loaded_bytes: Family<TierLabels, Counter>,
    tier_used_bytes: Family<TierLabels, Gauge>,
    tier_budget_bytes: Family<TierLabels, Gauge>,
    compression_input_bytes: Family<TierLabels, Counter>,
    compression_output_bytes: Family<TierLabels, Counter>,
    dedup_saved_bytes: Family<TierLabels, Counter>,
    config_reloads: Family<ReloadLabels, Counter>,
    bandwidth_limit: Family<LimitLabels, Gauge>,
    throttled_seconds: Family<LimitLabels, SecondsCounter>,
}

fn phase_histogram() -> Histogram {
    // 1 ms .. ~9 min
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

impl Metrics {
    /// Registers every metric under the `kybernate` prefix.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("kybernate");
        let metrics = Self {
            phase_seconds: Family::new_with_constructor(phase_histogram as fn() -> Histogram),
            failures: Family::default(),
            operations: Family::default(),
            raw_bytes: Counter::default(),
            stored_bytes: Family::default(),
            loaded_bytes: Family::default(),
            tier_used_bytes: Family::default(),
            tier_budget_bytes: Family::default(),
            compression_input_bytes: Family::default(),
            compression_output_bytes: Family::default(),
            dedup_saved_bytes: Family::default(),
            config_reloads: Family::default(),
            bandwidth_limit: Family::default(),
            throttled_seconds: Family::default(),
            registry: Mutex::new(Registry::default()),
        };
        registry.register(
            "phase_duration_seconds",
            "Duration of each checkpoint and restore phase",
            metrics.phase_seconds.clone(),
        );
        registry.register(
            "failures",
            "Failed checkpoints and restores by phase and reason",
            metrics.failures.clone(),
        );
        registry.register(
            "operations",
            "Finished checkpoints and restores by result",
            metrics.operations.clone(),
        );
        registry.register(
            "checkpoint_raw_bytes",
            "Bytes of image sets written by CRIU",
            metrics.raw_bytes.clone(),
        );
        registry.register(
            "tier_stored_bytes",
            "Bytes added to each tier by checkpoints",
            metrics.stored_bytes.clone(),
        );
        registry.register(
            "tier_loaded_bytes",
            "Bytes read back from each tier by restores",
            metrics.loaded_bytes.clone(),
        );
        registry.register(
            "tier_used_bytes",
            "Bytes each tier currently holds",
            metrics.tier_used_bytes.clone(),
        );
        registry.register(
            "tier_budget_bytes",
            "Bytes each tier may hold before checkpoints are demoted (from the config)",
            metrics.tier_budget_bytes.clone(),
        );
        registry.register(
            "compression_input_bytes",
            "Raw bytes of the chunks each tier compressed (neither zero nor already held)",
            metrics.compression_input_bytes.clone(),
        );
        registry.register(
            "compression_output_bytes",
            "Bytes those chunks took in each tier once compressed",
            metrics.compression_output_bytes.clone(),
        );
        registry.register(
            "dedup_saved_bytes",
            "Raw bytes each tier did not store again because it already held the chunks",
            metrics.dedup_saved_bytes.clone(),
        );
        registry.register(
            "config_reloads",
            "Changes of the config file, applied or rejected",
            metrics.config_reloads.clone(),
        );
        registry.register(
            "bandwidth_limit_bytes_per_second",
            "Byte-rate limit of background transfers, 0 for none (from the config)",
            metrics.bandwidth_limit.clone(),
        );
        registry.register(
            "throttled_seconds",
            "Time transfers waited for their byte-rate limit",
            metrics.throttled_seconds.clone(),
        );
        *metrics.registry.lock().unwrap_or_else(|e| e.into_inner()) = registry;
        Arc::new(metrics)
    }

    /// Records a finished phase.
    pub fn phase(&self, operation: &str, phase: &str, took: Duration) {
        self.phase_seconds
            .get_or_create(&PhaseLabels {
                operation: operation.into(),
                phase: phase.into(),
            })
            .observe(took.as_secs_f64());
    }

    /// Records a failed operation.
    pub fn failure(&self, operation: &str, phase: &str, reason: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                operation: operation.into(),
                phase: phase.into(),
                reason: reason.into(),
            })
            .inc();
        self.finished(operation, "failed");
    }

    /// Records a finished operation.
    pub fn finished(&self, operation: &str, result: &str) {
        self.operations
            .get_or_create(&OperationLabels {
                operation: operation.into(),
                result: result.into(),
            })
            .inc();
    }

    /// Records the bytes of a checkpoint and what each tier stored of it.
    pub fn stored(&self, raw: u64, per_tier: &[(&str, u64)]) {
        self.raw_bytes.inc_by(raw);
        for (tier, bytes) in per_tier {
            self.stored_bytes
                .get_or_create(&TierLabels {
                    tier: (*tier).into(),
                })
                .inc_by(*bytes);
        }
    }

    /// Records what one store into `tier` added: its bytes, what it compressed into what, and
    /// what content addressing saved. Tiers that keep files as they are report no compression.
    pub fn drained(&self, tier: &str, report: &StoreReport) {
        let labels = TierLabels { tier: tier.into() };
        self.stored_bytes
            .get_or_create(&labels)
            .inc_by(report.stored_bytes);
        self.dedup_saved_bytes
            .get_or_create(&labels)
            .inc_by(report.dedup_bytes);
        if report.compression_input_bytes > 0 || report.compression_output_bytes > 0 {
            self.compression_input_bytes
                .get_or_create(&labels)
                .inc_by(report.compression_input_bytes);
            self.compression_output_bytes
                .get_or_create(&labels)
                .inc_by(report.compression_output_bytes);
        }
    }

    /// Creates the byte counters of `tier` at 0 (the compression counters only when the tier
    /// `compresses`), so that the first store or load into it is an increase Prometheus sees:
    /// a series born at its first value has no rate.
    pub fn tier_present(&self, tier: &str, compresses: bool) {
        let labels = TierLabels { tier: tier.into() };
        let mut families = vec![
            &self.stored_bytes,
            &self.loaded_bytes,
            &self.dedup_saved_bytes,
        ];
        if compresses {
            families.extend([
                &self.compression_input_bytes,
                &self.compression_output_bytes,
            ]);
        }
        for family in families {
            drop(family.get_or_create(&labels));
        }
    }

    /// Records bytes a restore read from `tier`.
    pub fn loaded(&self, tier: &str, bytes: u64) {
        self.loaded_bytes
            .get_or_create(&TierLabels { tier: tier.into() })
            .inc_by(bytes);
    }

    /// Sets the current occupancy of `tier`.
    pub fn tier_used(&self, tier: &str, bytes: u64) {
        self.tier_used_bytes
            .get_or_create(&TierLabels { tier: tier.into() })
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Sets the budget of `tier`, from the config at start and again on every reload.
    pub fn tier_budget(&self, tier: &str, bytes: u64) {
        self.tier_budget_bytes
            .get_or_create(&TierLabels { tier: tier.into() })
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Sets the configured byte rate of `limit` (0: none).
    pub fn bandwidth_limit(&self, limit: &str, bytes_per_sec: u64) {
        self.bandwidth_limit
            .get_or_create(&LimitLabels {
                limit: limit.into(),
            })
            .set(i64::try_from(bytes_per_sec).unwrap_or(i64::MAX));
    }

    /// Adds a wait a transfer spent on the byte-rate limit `limit`.
    pub fn throttled(&self, limit: &str, waited: Duration) {
        self.throttled_seconds
            .get_or_create(&LimitLabels {
                limit: limit.into(),
            })
            .inc_by(waited.as_secs_f64());
    }

    /// Counts a change of the config file: `result` is "applied" or "rejected".
    pub fn config_reload(&self, result: &str) {
        self.config_reloads
            .get_or_create(&ReloadLabels {
                result: result.into(),
            })
            .inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves `/metrics` (and `/healthz`) on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_phases_failures_and_bytes() {
        let m = Metrics::new();
        m.phase("checkpoint", "criu_dump", Duration::from_millis(20));
        m.failure("restore", "verify", "corrupt");
        m.stored(100, &[("ram", 100), ("nvme", 40)]);
        m.tier_used("nvme", 40);
        m.tier_budget("ram", 1 << 30);
        m.tier_present("s3", true);
        m.tier_present("ram", false);
        m.drained(
            "nvme",
            &StoreReport {
                raw_bytes: 100,
                stored_bytes: 12,
                compression_input_bytes: 50,
                compression_output_bytes: 12,
                dedup_bytes: 20,
                zero_bytes: 30,
            },
        );
        m.config_reload("rejected");
        let text = m.encode();
        for needle in [
            "kybernate_phase_duration_seconds_count{operation=\"checkpoint\",phase=\"criu_dump\"} 1",
            "kybernate_failures_total{operation=\"restore\",phase=\"verify\",reason=\"corrupt\"} 1",
            "kybernate_tier_stored_bytes_total{tier=\"nvme\"} 52",
            "kybernate_compression_input_bytes_total{tier=\"nvme\"} 50",
            "kybernate_compression_output_bytes_total{tier=\"nvme\"} 12",
            "kybernate_dedup_saved_bytes_total{tier=\"nvme\"} 20",
            "kybernate_tier_budget_bytes{tier=\"ram\"} 1073741824",
            "kybernate_compression_input_bytes_total{tier=\"s3\"} 0",
            "kybernate_tier_loaded_bytes_total{tier=\"ram\"} 0",
            "kybernate_checkpoint_raw_bytes_total 100",
            "kybernate_tier_used_bytes{tier=\"nvme\"} 40",
            "kybernate_config_reloads_total{result=\"rejected\"} 1",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        assert!(
            !text.contains("kybernate_compression_input_bytes_total{tier=\"ram\"}"),
            "a tier that does not compress got a compression series:\n{text}"
        );
    }
}
