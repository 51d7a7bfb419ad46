//! Stats, Update and OOM events: the container's cgroup as runc and the kernel report it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_shim::api::UpdateTaskRequest;
use containerd_shim::protos::cgroups_v2::metrics::{CPUStat, MemoryStat, Metrics, PidsStat};
use containerd_shim::protos::events::task::TaskOOM;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::topics;

use crate::error::{Result, ShimError};
use crate::service::TaskService;

/// Metrics from `runc events --stats` output.
pub fn metrics_from_runc(stats: &serde_json::Value) -> Metrics {
    let data = stats.get("data").unwrap_or(stats);
    let num = |path: &str| data.pointer(path).and_then(|v| v.as_u64()).unwrap_or(0);
    Metrics {
        pids: MessageField::some(PidsStat {
            current: num("/pids/current"),
            limit: num("/pids/limit"),
            ..Default::default()
        }),
        cpu: MessageField::some(CPUStat {
            usage_usec: num("/cpu/usage/total") / 1000,
            user_usec: num("/cpu/usage/user") / 1000,
            system_usec: num("/cpu/usage/kernel") / 1000,
            ..Default::default()
        }),
        memory: MessageField::some(MemoryStat {
            usage: num("/memory/usage/usage"),
            usage_limit: num("/memory/usage/limit"),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The OOM-kill counter in a cgroup v2 `memory.events` file.
pub fn oom_kills(memory_events: &str) -> u64 {
    memory_events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// The container's cgroup v2 directory (cgroupfs driver), from its spec.
pub fn cgroup_dir(spec: &serde_json::Value) -> Option<PathBuf> {
    let path = spec.pointer("/linux/cgroupsPath")?.as_str()?;
    if path.contains(':') || !path.starts_with('/') {
        return None;
    }
    Some(Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/')))
}

/// The cgroup v2 directory a `/proc/PID/cgroup` file names (its `0::` line). With the
/// systemd driver the spec's `slice:prefix:name` is no path, so the shim asks the kernel
/// where runc put the init process.
pub fn cgroup_of_process(proc_cgroup: &str) -> Option<PathBuf> {
    let path = proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))?
        .trim();
    if !path.starts_with('/') {
        return None;
    }
    Some(Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/')))
}

impl TaskService {
    /// Stats: cgroup v2 metrics of the container.
    pub async fn stats_of(&self, id: &str) -> Result<Any> {
        let (runc, log) = {
            let containers = self.containers.lock().await;
            let c = containers.get(id).ok_or_else(|| Self::not_found(id))?;
            (c.runc.clone(), c.runc_log())
        };
        let out = runc
            .run(
                id,
                &["events".into(), "--stats".into(), id.to_owned()],
                Default::default(),
                Some(&log),
            )
            .await?;
        let value: serde_json::Value =
            serde_json::from_str(out.stdout.trim()).map_err(|e| ShimError::Runc {
                id: id.to_owned(),
                command: "events".into(),
                output: format!("unreadable stats {:?}: {e}", out.stdout),
            })?;
        containerd_shim::util::convert_to_any(Box::new(metrics_from_runc(&value))).map_err(|e| {
            ShimError::State {
                id: id.to_owned(),
                message: format!("encode metrics: {e}"),
            }
        })
    }

    /// Update: new resource limits through `runc update --resources`.
    pub async fn update_resources(&self, req: &UpdateTaskRequest) -> Result<()> {
        let id = req.id.as_str();
        let (runc, bundle, log) = {
            let containers = self.containers.lock().await;
            let c = containers.get(id).ok_or_else(|| Self::not_found(id))?;
            (c.runc.clone(), c.bundle.clone(), c.runc_log())
        };
        let resources = req.resources.as_ref().ok_or_else(|| ShimError::Invalid {
            id: id.to_owned(),
            message: "update carries no resources".into(),
        })?;
        serde_json::from_slice::<serde_json::Value>(&resources.value).map_err(|e| {
            ShimError::Invalid {
                id: id.to_owned(),
                message: format!("resources ({}) are not JSON: {e}", resources.type_url),
            }
        })?;
        let file = bundle.join("update-resources.json");
        std::fs::write(&file, &resources.value)
            .map_err(|e| ShimError::io(id, format!("write {}", file.display()), e))?;
        let ran = runc
            .run(
                id,
                &[
                    "update".into(),
                    "--resources".into(),
                    file.display().to_string(),
                    id.to_owned(),
                ],
                Default::default(),
                Some(&log),
            )
            .await;
        let _ = std::fs::remove_file(&file);
        ran.map(|_| ())
    }

    /// Publishes TaskOOM whenever the container's cgroup records an OOM kill, until its init
    /// process exits.
    pub fn watch_oom(&self, id: &str, cgroup: PathBuf) {
        let service = self.clone();
        let id = id.to_owned();
        let events = cgroup.join("memory.events");
        tokio::spawn(async move {
            let mut seen = oom_kills(&std::fs::read_to_string(&events).unwrap_or_default());
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let alive = {
                    let containers = service.containers.lock().await;
                    containers.get(&id).is_some_and(|c| c.init.exit().is_none())
                };
                let now = oom_kills(&std::fs::read_to_string(&events).unwrap_or_default());
                if now > seen {
                    seen = now;
                    let event = TaskOOM {
                        container_id: id.clone(),
                        ..Default::default()
                    };
                    service
                        .publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(event))
                        .await;
                }
                if !alive {
                    break;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn runc_stats_become_cgroup_v2_metrics() {
        let stats = json!({"type": "stats", "data": {
            "cpu": {"usage": {"total": 5_000_000u64, "user": 3_000_000u64, "kernel": 2_000_000u64}},
            "memory": {"usage": {"usage": 4096, "limit": 8192}},
            "pids": {"current": 3, "limit": 100}}});
        let m = metrics_from_runc(&stats);
        assert_eq!(m.pids.current, 3);
        assert_eq!(m.cpu.usage_usec, 5000);
        assert_eq!(m.cpu.system_usec, 2000);
        assert_eq!(m.memory.usage, 4096);
        assert_eq!(m.memory.usage_limit, 8192);
    }

    #[test]
    fn oom_kill_counter_and_cgroup_path() {
        assert_eq!(oom_kills("low 0\nhigh 0\nmax 2\noom 1\noom_kill 4\n"), 4);
        assert_eq!(oom_kills(""), 0);
        let spec = json!({"linux": {"cgroupsPath": "/default/c1"}});
        assert_eq!(
            cgroup_dir(&spec).unwrap(),
            PathBuf::from("/sys/fs/cgroup/default/c1")
        );
        let systemd = json!({"linux": {"cgroupsPath": "kubepods.slice:cri:abc"}});
        assert!(cgroup_dir(&systemd).is_none());
        assert_eq!(
            cgroup_of_process("0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope\n")
                .unwrap(),
            PathBuf::from(
                "/sys/fs/cgroup/kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope"
            )
        );
        assert!(cgroup_of_process("12:memory:/x\n").is_none());
    }
}
