//! The byte-rate limits in force. Background work (drains past the tier a checkpoint asked
//! for, demotions, prefetches) always runs under them; foreground work (a checkpoint storing
//! up to its tier, a restore) only when `foreground_exceeds_limits` is off. A reload replaces
//! the limiters as a whole: work already running keeps the ones it started with, new work
//! gets the new ones, and all work of one kind shares one limiter, so the limit holds for
//! the node, not per transfer.

use std::sync::{Arc, Mutex};

use kybernate_dataplane::{ByteRate, Pacing, WorkClass};

use crate::config::BandwidthConfig;
use crate::metrics::Metrics;

/// Whether work is what a caller waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Urgency {
    /// A checkpoint up to the tier it asked for, or a restore.
    Foreground,
    /// Copying a checkpoint nearer ahead of its restore: limited like background work, and
    /// served by the data plane after foreground work and before background work.
    Prefetch,
    /// Drains past that tier and demotions.
    Background,
}

impl Urgency {
    /// The data plane's priority class of work of this urgency.
    pub fn class(self) -> WorkClass {
        match self {
            Urgency::Foreground => WorkClass::Foreground,
            Urgency::Prefetch => WorkClass::Prefetch,
            Urgency::Background => WorkClass::Background,
        }
    }
}

/// The limiters built from the running config.
#[derive(Debug)]
pub struct Bandwidth {
    metrics: Arc<Metrics>,
    current: Mutex<Arc<InForce>>,
}

#[derive(Debug)]
struct InForce {
    config: BandwidthConfig,
    limited: Pacing,
}

impl Bandwidth {
    /// The limits of `config` (validated).
    pub fn new(config: &BandwidthConfig, metrics: Arc<Metrics>) -> Self {
        let in_force = build(config, &metrics);
        Self {
            metrics,
            current: Mutex::new(Arc::new(in_force)),
        }
    }

    /// Puts the limits of `config` in force for new work, if they changed.
    pub fn apply(&self, config: &BandwidthConfig) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.config != *config {
            *current = Arc::new(build(config, &self.metrics));
            tracing::info!(?config, "bandwidth limits changed; new transfers use them");
        }
    }

    /// The limits and the priority class work of `urgency` starting now runs under, with a
    /// cancel token of its own.
    pub fn pacing(&self, urgency: Urgency) -> Pacing {
        let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let limits = match urgency {
            Urgency::Foreground if current.config.foreground_exceeds_limits => Pacing::default(),
            _ => current.limited.clone(),
        };
        Pacing {
            class: urgency.class(),
            cancel: kybernate_dataplane::CancelToken::new(),
            ..limits
        }
    }
}

fn build(config: &BandwidthConfig, metrics: &Arc<Metrics>) -> InForce {
    let limiter =
        |name: &'static str, bytes_per_sec: u64| {
            metrics.bandwidth_limit(name, bytes_per_sec);
            let hook_metrics = metrics.clone();
            ByteRate::new(bytes_per_sec)
                .unwrap_or_else(|problem| {
                    // The config was validated before it got here.
                    tracing::error!(limit = name, %problem, "bandwidth limit ignored");
                    None
                })
                .map(|rate| {
                    Arc::new(rate.with_wait_hook(Arc::new(move |waited| {
                        hook_metrics.throttled(name, waited)
                    })))
                })
        };
    InForce {
        config: config.clone(),
        limited: Pacing {
            disk_write: limiter("nvme_write", config.nvme_write_bytes_per_sec),
            upload: limiter("s3_upload", config.s3_upload_bytes_per_sec),
            download: limiter("s3_download", config.s3_download_bytes_per_sec),
            ..Pacing::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreground_work_is_limited_only_when_configured_and_reloads_replace_limiters() {
        let metrics = Metrics::new();
        let mut config = BandwidthConfig {
            s3_upload_bytes_per_sec: 1 << 20,
            ..BandwidthConfig::default()
        };
        let bandwidth = Bandwidth::new(&config, metrics.clone());
        let background = bandwidth.pacing(Urgency::Background);
        assert_eq!(background.upload.as_ref().unwrap().bytes_per_sec(), 1 << 20);
        assert!(background.download.is_none() && background.disk_write.is_none());
        assert_eq!(background.class, WorkClass::Background);
        assert_eq!(
            bandwidth.pacing(Urgency::Prefetch).class,
            WorkClass::Prefetch
        );
        let foreground = bandwidth.pacing(Urgency::Foreground);
        assert_eq!(foreground.class, WorkClass::Foreground);
        // Each transfer gets a token of its own: cancelling one stops only that one.
        foreground.cancel.cancel();
        assert!(!bandwidth.pacing(Urgency::Foreground).cancel.is_cancelled());
        assert!(bandwidth.pacing(Urgency::Foreground).upload.is_none());
        assert!(metrics
            .encode()
            .contains("kybernate_bandwidth_limit_bytes_per_second{limit=\"s3_upload\"} 1048576"));

        // Unchanged config: the same limiter, shared by all work.
        bandwidth.apply(&config);
        let again = bandwidth.pacing(Urgency::Background);
        assert!(Arc::ptr_eq(
            background.upload.as_ref().unwrap(),
            again.upload.as_ref().unwrap()
        ));

        config.s3_upload_bytes_per_sec = 2 << 20;
        config.foreground_exceeds_limits = false;
        bandwidth.apply(&config);
        assert_eq!(
            bandwidth
                .pacing(Urgency::Foreground)
                .upload
                .unwrap()
                .bytes_per_sec(),
            2 << 20
        );
        // Work that started before keeps its limiter.
        assert_eq!(background.upload.unwrap().bytes_per_sec(), 1 << 20);
    }
}
