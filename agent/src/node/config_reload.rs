//! The config on the node agent: the one it started with, applying a reloaded one, reporting
//! a rejected one, and the view behind `kybernatectl config show`.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix::prelude::*;
use kybernate_proto::agent::v1 as pb;

use super::policy::publish_budgets;
use super::NodeAgent;
use crate::reload::{self, LoadedConfig};

/// Where the running config came from and how its reloads went.
#[derive(Debug, Default)]
pub(super) struct ConfigView {
    loaded: Option<LoadedConfig>,
    /// Keys the file changed that take effect at the next restart, with the file's value.
    pending: BTreeMap<String, String>,
    applied: u64,
    rejected: u64,
    last_error: String,
}

/// The config the agent started with, for `config show`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ConfigLoaded(pub LoadedConfig);

impl Handler<ConfigLoaded> for NodeAgent {
    type Result = ();
    fn handle(&mut self, msg: ConfigLoaded, _: &mut Self::Context) {
        self.config_view.loaded = Some(msg.0);
    }
}

/// A changed, validated config file: its live keys apply at once.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ApplyConfig(pub LoadedConfig);

impl Handler<ApplyConfig> for NodeAgent {
    type Result = ();
    fn handle(&mut self, msg: ApplyConfig, ctx: &mut Self::Context) {
        let loaded = msg.0;
        let running = self.parts.config.clone();
        let restart = reload::restart_keys(&running, &loaded.config);
        let mut file_values = BTreeMap::new();
        if let Ok(value) = toml::Value::try_from(&*loaded.config) {
            reload::flatten("", &value, &mut file_values);
        }
        self.config_view.pending = restart
            .iter()
            .map(|k| {
                let value = file_values
                    .get(k)
                    .cloned()
                    .unwrap_or_else(|| "(changed)".into());
                (k.clone(), value)
            })
            .collect();
        if !restart.is_empty() {
            tracing::warn!(keys = ?restart, "config keys changed that take effect only after a restart of the agent");
        }
        self.parts.config = Arc::new(reload::apply_live(&running, &loaded.config));
        self.config_view.loaded = Some(loaded);
        self.config_view.applied += 1;
        self.config_view.last_error.clear();
        self.parts.metrics.config_reload("applied");
        tracing::info!(
            ram_budget = self.parts.config.ram_budget(),
            nvme_budget = ?self.parts.config.tiers.nvme_budget_bytes,
            "config reloaded; budgets re-evaluated"
        );
        publish_budgets(&self.parts);
        self.parts.bandwidth.apply(&self.parts.config.bandwidth);
        self.enforce_budgets(ctx);
    }
}

/// A changed config file was rejected; the running config stays.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ConfigRejected(pub String);

impl Handler<ConfigRejected> for NodeAgent {
    type Result = ();
    fn handle(&mut self, msg: ConfigRejected, _: &mut Self::Context) {
        self.config_view.rejected += 1;
        // No subscriber (no node worker) is fine: the log and the metric already tell.
        let _ = self.config_rejections.send(msg.0.clone());
        self.config_view.last_error = msg.0;
    }
}

/// A receiver of every rejected config change (the problem, naming the key), for the node
/// worker to report as Events.
#[derive(Debug, Message)]
#[rtype(result = "tokio::sync::broadcast::Receiver<String>")]
pub struct SubscribeConfigRejections;

impl Handler<SubscribeConfigRejections> for NodeAgent {
    type Result = MessageResult<SubscribeConfigRejections>;
    fn handle(&mut self, _: SubscribeConfigRejections, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.config_rejections.subscribe())
    }
}

/// What the running data plane resolved from `[dataplane]`: the worker counts (0 means a
/// share of the cores; shown here as the number), the pinned buffer pool, and the I/O engine
/// the probe chose.
fn data_plane_values(
    config: &crate::config::AgentConfig,
    nvme: Option<&kybernate_dataplane::NvmeTier>,
) -> Vec<(&'static str, String)> {
    let chunks = config.dataplane.chunk_config();
    let (workers, background, pool, backend) = match nvme.map(|t| t.plane()) {
        Some(plane) => (
            plane.workers(),
            plane.background_workers(),
            plane.pinned_pool_bytes(),
            plane.io_backend().to_string(),
        ),
        None => (
            chunks.worker_count(),
            chunks.background_worker_count(),
            kybernate_dataplane::DataPlane::pinned_pool_bytes_for(&chunks),
            "not started".into(),
        ),
    };
    vec![
        ("dataplane.workers", workers.to_string()),
        ("dataplane.background_workers", background.to_string()),
        ("dataplane.pinned_pool_bytes", pool.to_string()),
        ("dataplane.io_backend", format!("{backend:?}")),
    ]
}

/// The effective config and the source of each value.
#[derive(Debug, Message)]
#[rtype(result = "pb::ConfigShowReply")]
pub struct ConfigShow;

impl Handler<ConfigShow> for NodeAgent {
    type Result = MessageResult<ConfigShow>;
    fn handle(&mut self, _: ConfigShow, _: &mut Self::Context) -> Self::Result {
        let config = &self.parts.config;
        let mut values = BTreeMap::new();
        if let Ok(value) = toml::Value::try_from(&**config) {
            reload::flatten("", &value, &mut values);
        }
        values
            .entry("tiers.ram_budget_bytes".into())
            .or_insert_with(|| config.ram_budget().to_string());
        values
            .entry("tiers.nvme_budget_bytes".into())
            .or_insert_with(|| "\"unlimited\"".into());
        for (key, value) in data_plane_values(config, self.parts.tiers.nvme.as_deref()) {
            values.insert(key.into(), value);
        }
        if let Some(s3) = &config.s3 {
            for (key, value) in [
                ("s3.endpoint", &s3.endpoint),
                ("s3.bucket", &s3.bucket),
                ("s3.prefix", &s3.prefix),
            ] {
                values.insert(key.into(), format!("{value:?}"));
            }
        }
        let view = &self.config_view;
        let loaded = view.loaded.as_ref();
        let values = values
            .into_iter()
            .map(|(key, value)| {
                let source = match loaded {
                    Some(l) if l.flag_keys.contains(&key) => "flag",
                    Some(l) if l.file_keys.contains(&key) => "file",
                    _ => "default",
                };
                pb::ConfigValue {
                    pending: view.pending.get(&key).cloned().unwrap_or_default(),
                    source: source.into(),
                    key,
                    value,
                }
            })
            .collect();
        MessageResult(pb::ConfigShowReply {
            path: loaded
                .and_then(|l| l.path.as_ref())
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            values,
            reloads_applied: view.applied,
            reloads_rejected: view.rejected,
            last_error: view.last_error.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentConfig;
    use kybernate_dataplane::{DataPlane, IoMode, NvmeTier};

    fn value<'a>(values: &'a [(&'static str, String)], key: &str) -> &'a str {
        &values.iter().find(|(k, _)| *k == key).unwrap().1
    }

    #[test]
    fn config_show_reports_the_data_planes_workers_pool_and_io_engine() {
        let mut config = AgentConfig::default();
        config.dataplane.workers = 3;
        config.dataplane.chunk_size_mib = 1;
        let chunks = config.dataplane.chunk_config();
        let planned = data_plane_values(&config, None);
        assert_eq!(value(&planned, "dataplane.workers"), "3");
        assert_eq!(value(&planned, "dataplane.background_workers"), "1");
        // 4 buffers per worker plus 28 shared ones, 1 MiB each; the 30 of the chunk pool
        // have room for a sealed chunk's tag and nonce, one more I/O block each.
        assert_eq!(
            value(&planned, "dataplane.pinned_pool_bytes"),
            ((40u64 << 20) + 30 * 4096).to_string()
        );
        assert_eq!(value(&planned, "dataplane.io_backend"), "\"not started\"");

        let dir = tempfile::tempdir().unwrap();
        let plane = DataPlane::start(IoMode::Pread, &chunks).unwrap();
        let tier = NvmeTier::open_on(dir.path(), chunks, plane).unwrap();
        let running = data_plane_values(&config, Some(&tier));
        assert_eq!(value(&running, "dataplane.workers"), "3");
        assert_eq!(value(&running, "dataplane.background_workers"), "1");
        assert_eq!(
            value(&running, "dataplane.pinned_pool_bytes"),
            value(&planned, "dataplane.pinned_pool_bytes")
        );
        assert!(
            value(&running, "dataplane.io_backend").starts_with("\"pread/pwrite (forced"),
            "{running:?}"
        );
    }
}
