//! Stats, Update and OOM events: the container's cgroup as runc and the kernel report it.

use std::path::{Path, PathBuf};

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

/// Whether the host runs cgroup v2 alone (else v1 or hybrid, where the memory controller
/// has its own v1 hierarchy).
pub fn unified_cgroups() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// Moves process `pid` into `cgroup` (a path below the cgroup root, runtime option
/// `ShimCgroup`): on cgroup v2 its one directory, on v1 the directory in every hierarchy
/// that has it. A cgroup found nowhere is an error naming it.
pub fn join_cgroup(cgroup: &str, pid: u32, unified: bool) -> std::io::Result<()> {
    let relative = cgroup.trim_start_matches('/');
    let dirs: Vec<PathBuf> = if unified {
        vec![Path::new("/sys/fs/cgroup").join(relative)]
    } else {
        std::fs::read_dir("/sys/fs/cgroup")?
            .filter_map(|e| Some(e.ok()?.path().join(relative)))
            .collect()
    };
    let mut joined = 0;
    for dir in dirs.iter().filter(|d| d.join("cgroup.procs").is_file()) {
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        joined += 1;
    }
    if joined == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no cgroup {cgroup} under /sys/fs/cgroup"),
        ));
    }
    Ok(())
}

/// The file counting the container's OOM kills. Its cgroup comes from the spec (cgroupfs
/// driver, an absolute path) or else from `proc_cgroup`, the init's `/proc/PID/cgroup` (with
/// the systemd driver the spec's `slice:prefix:name` is no path, so the shim asks the kernel
/// where runc put the process).
pub fn oom_counter_file(
    spec: Option<&oci_spec::runtime::Spec>,
    proc_cgroup: &str,
    unified: bool,
) -> Option<PathBuf> {
    let from_spec = spec
        .and_then(|s| s.linux().as_ref()?.cgroups_path().as_ref()?.to_str())
        .filter(|p| p.starts_with('/') && !p.contains(':'));
    let from_kernel = || {
        proc_cgroup.lines().find_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            let ours = if unified {
                controllers.is_empty()
            } else {
                controllers.split(',').any(|c| c == "memory")
            };
            (ours && path.starts_with('/')).then_some(path.trim())
        })
    };
    let path = from_spec.or_else(from_kernel)?.trim_start_matches('/');
    Some(if unified {
        Path::new("/sys/fs/cgroup").join(path).join("memory.events")
    } else {
        Path::new("/sys/fs/cgroup/memory")
            .join(path)
            .join("memory.oom_control")
    })
}

impl TaskService {
    /// Stats: cgroup v2 metrics of the container.
    pub async fn stats_of(&self, id: &str) -> Result<Any> {
        let (runc, log) = self
            .containers
            .with(id, |c| Ok((c.runc.clone(), c.runc_log())))?;
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
        let (runc, bundle, log) = self
            .containers
            .with(id, |c| Ok((c.runc.clone(), c.bundle.clone(), c.runc_log())))?;
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
    /// process exits, woken by the kernel (see [`crate::oom`]). The cgroup is the container's
    /// own and new, so every kill it counts is one of this container's; the exit watcher
    /// also looks just before it reports the init's exit, so that an OOM kill reaches
    /// containerd before the exit it caused, as with runc's shim.
    pub fn watch_oom(&self, id: &str, counter: PathBuf, unified: bool) {
        let Ok(mut exited) = self.containers.with(id, |c| Ok(c.init.exited.subscribe())) else {
            return;
        };
        let mut notifier = match crate::oom::OomNotifier::open(&counter, unified) {
            Ok(notifier) => notifier,
            Err(e) => {
                log::warn!("container {id}: no OOM events: {e}");
                return;
            }
        };
        self.ooms.watch(id, counter);
        let service = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = exited.wait_for(Option::is_some) => break,
                    changed = notifier.changed() => match changed {
                        Ok(()) => service.publish_ooms(&id),
                        Err(e) => {
                            log::warn!("container {id}: OOM notifications ended: {e}");
                            break;
                        }
                    },
                }
            }
            service.ooms.forget(&id);
        });
    }

    /// Publishes TaskOOM when container `id`'s cgroup counts OOM kills not reported yet.
    pub fn publish_ooms(&self, id: &str) {
        if self.ooms.new_kills(id) {
            let event = TaskOOM {
                container_id: id.to_owned(),
                ..Default::default()
            };
            self.publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(event));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oom::oom_kills;
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
    fn oom_kill_counter_and_its_file_on_cgroup_v1_and_v2() {
        assert_eq!(oom_kills("low 0\nhigh 0\nmax 2\noom 1\noom_kill 4\n"), 4);
        assert_eq!(
            oom_kills("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n"),
            1
        );
        assert_eq!(oom_kills(""), 0);
        let typed = |v: serde_json::Value| -> oci_spec::runtime::Spec {
            serde_json::from_value(v).unwrap()
        };
        let spec = typed(json!({"linux": {"cgroupsPath": "/default/c1"}}));
        assert_eq!(
            oom_counter_file(Some(&spec), "", true).unwrap(),
            PathBuf::from("/sys/fs/cgroup/default/c1/memory.events")
        );
        assert_eq!(
            oom_counter_file(Some(&spec), "", false).unwrap(),
            PathBuf::from("/sys/fs/cgroup/memory/default/c1/memory.oom_control")
        );
        let systemd = typed(json!({"linux": {"cgroupsPath": "kubepods.slice:cri:abc"}}));
        let v2 = "0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope\n";
        assert_eq!(
            oom_counter_file(Some(&systemd), v2, true).unwrap(),
            PathBuf::from(
                "/sys/fs/cgroup/kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope/memory.events"
            )
        );
        let v1 = "12:pids:/p\n4:cpu,cpuacct:/c\n7:memory:/kubepods.slice/abc.scope\n0::/u\n";
        assert_eq!(
            oom_counter_file(Some(&systemd), v1, false).unwrap(),
            PathBuf::from("/sys/fs/cgroup/memory/kubepods.slice/abc.scope/memory.oom_control")
        );
        assert!(oom_counter_file(Some(&systemd), "12:pids:/x\n", false).is_none());
        assert!(oom_counter_file(None, "12:memory:/x\n", true).is_none());
    }
}
