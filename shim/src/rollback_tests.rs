//! The orderings of a GPU checkpoint and restore, and their rollbacks, against recording
//! fakes of runc and the agent (see [`crate::fakes`]): no root, runc, CRIU or GPU needed.
//! Also: while one container's checkpoint is stuck in its dump, the other containers of the
//! shim stay fully usable.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use containerd_shim::api::CheckpointTaskRequest;
use containerd_shim::ExitSignal;

use crate::config::ShimConfig;
use crate::error::Result;
use crate::events::EventQueue;
use crate::fakes::{
    write_spec, Hold, Journal, Outcome, RecordedEvents, ScriptedAgent, ScriptedConnector,
    ScriptedRunc,
};
use crate::process::{Container, Process, ProcessStatus, RestoreSource};
use crate::runc_cli::RuncCli;
use crate::service::TaskService;
use crate::stdio::StdioPaths;

/// A pid no process on the test machine has (above any `pid_max`).
const PID: i32 = 999_999_999;

struct Rig {
    service: TaskService,
    journal: Journal,
    dir: tempfile::TempDir,
}

#[derive(Default)]
struct Script {
    runc: Vec<(&'static str, Outcome)>,
    failing: Vec<&'static str>,
    gpus: Option<Vec<u32>>,
    hold: Option<Hold>,
}

fn ps() -> (&'static str, Outcome) {
    (
        "ps",
        Outcome {
            stdout: format!("[{PID}]"),
            ..Outcome::default()
        },
    )
}

fn fails() -> Outcome {
    Outcome {
        code: 1,
        ..Outcome::default()
    }
}

fn rig(script: Script) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::default();
    let mut runc_script = vec![ps()];
    runc_script.extend(script.runc);
    let runc = RuncCli {
        root: dir.path().join("runc-root"),
        spawner: Arc::new(ScriptedRunc {
            journal: journal.clone(),
            script: runc_script,
            pid: PID,
            hold: script.hold,
        }),
        ..RuncCli::default()
    };
    let agent = Arc::new(ScriptedAgent {
        journal: journal.clone(),
        failing: script.failing.into_iter().collect::<HashSet<_>>(),
        gpus: script.gpus.unwrap_or_else(|| vec![0]),
        image_dir: dir.path().join("agent-images"),
    });
    let service = TaskService::assemble(
        "test",
        ShimConfig::default(),
        runc,
        Arc::new(ScriptedConnector(agent)),
        EventQueue::start(RecordedEvents(journal.clone())),
        Arc::new(ExitSignal::default()),
    );
    Rig {
        service,
        journal,
        dir,
    }
}

impl Rig {
    fn bundle(&self, id: &str) -> PathBuf {
        self.dir.path().join(id)
    }

    /// Adds container `id` (its spec asks for GPU 0) in `status`, staged for a restore of
    /// `ref-1` when `staged`.
    fn add(&self, id: &str, pid: i32, status: ProcessStatus, staged: bool) {
        let bundle = self.bundle(id);
        write_spec(&bundle, &["PATH=/bin", "NVIDIA_VISIBLE_DEVICES=0"]);
        let mut init = Process::new("", StdioPaths::default());
        init.pid = pid;
        init.status = status;
        let mut container = Container::new(id, bundle, init, self.service.runc.clone());
        if staged {
            container.restore = Some(RestoreSource::Kybernate {
                reference: "ref-1".into(),
                images: self.dir.path().join("staged"),
            });
        }
        drop(
            self.service
                .containers
                .insert_busy(container, "create")
                .unwrap(),
        );
    }

    async fn checkpoint(&self, id: &str) -> Result<()> {
        self.service
            .checkpoint_task(CheckpointTaskRequest {
                id: id.into(),
                ..Default::default()
            })
            .await
    }

    /// The calls so far, runc ones shortened to their sub-command, events left out
    /// (they are delivered by their own task).
    fn steps(&self) -> Vec<String> {
        self.journal
            .entries()
            .into_iter()
            .filter(|e| !e.starts_with("event "))
            .map(|e| match e.strip_prefix("runc ") {
                Some(rest) => format!("runc {}", rest.split(' ').next().unwrap_or_default()),
                None => e,
            })
            .collect()
    }

    fn status(&self, id: &str) -> ProcessStatus {
        self.service
            .containers
            .with(id, |c| Ok(c.init.status))
            .unwrap()
    }

    /// Whether no operation holds container `id` any more.
    fn idle(&self, id: &str) -> bool {
        self.service.containers.begin(id, "probe").is_ok()
    }
}

#[tokio::test]
async fn a_checkpoint_locks_the_gpus_dumps_then_commits() {
    let rig = rig(Script::default());
    rig.add("c1", PID, ProcessStatus::Running, false);
    rig.checkpoint("c1").await.unwrap();
    let begin = format!("agent checkpoint_begin pids=[{PID}]");
    assert_eq!(
        rig.steps(),
        [
            "agent connect",
            "agent node_devices",
            "runc ps",
            begin.as_str(),
            "runc checkpoint",
            "agent checkpoint_end dumped=true",
        ]
    );
    rig.service.events.flush(Duration::from_secs(60)).await;
    assert!(rig
        .journal
        .entries()
        .contains(&"event /tasks/checkpointed".to_owned()));
    assert!(rig.idle("c1"));
}

#[tokio::test]
async fn a_failed_dump_gives_the_gpus_back_and_the_task_keeps_running() {
    let rig = rig(Script {
        runc: vec![("checkpoint", fails())],
        ..Script::default()
    });
    rig.add("c1", PID, ProcessStatus::Running, false);
    let e = rig.checkpoint("c1").await.unwrap_err().to_string();
    assert!(e.contains("phase criu_dump"), "{e}");
    assert_eq!(
        rig.steps()[3..],
        [
            format!("agent checkpoint_begin pids=[{PID}]"),
            "runc checkpoint".into(),
            "agent checkpoint_end dumped=false".into(),
        ]
    );
    assert!(!rig.steps().contains(&"runc kill".to_owned()));
    assert_eq!(rig.status("c1"), ProcessStatus::Running);
    assert!(rig.idle("c1"), "a failed checkpoint frees the container");
}

#[tokio::test]
async fn a_dump_past_its_deadline_is_thawed_before_the_gpus_come_back() {
    let rig = rig(Script {
        runc: vec![
            (
                "checkpoint",
                Outcome {
                    timed_out: true,
                    ..Outcome::default()
                },
            ),
            (
                "state",
                Outcome {
                    stdout: r#"{"id":"c1","status":"paused"}"#.into(),
                    ..Outcome::default()
                },
            ),
        ],
        ..Script::default()
    });
    rig.add("c1", PID, ProcessStatus::Running, false);
    let e = rig.checkpoint("c1").await.unwrap_err().to_string();
    assert!(
        e.contains("phase criu_dump") && e.contains("was resumed"),
        "{e}"
    );
    assert_eq!(
        rig.steps()[4..],
        [
            "runc checkpoint",
            "runc state",
            "runc resume",
            "agent checkpoint_end dumped=false"
        ]
    );
}

#[tokio::test]
async fn a_refused_gpu_lock_dumps_nothing() {
    let rig = rig(Script {
        failing: vec!["checkpoint_begin"],
        ..Script::default()
    });
    rig.add("c1", PID, ProcessStatus::Running, false);
    let e = rig.checkpoint("c1").await.unwrap_err().to_string();
    assert!(e.contains("phase agent_cuda"), "{e}");
    let steps = rig.steps();
    assert_eq!(
        steps.last().unwrap(),
        &format!("agent checkpoint_begin pids=[{PID}]")
    );
    assert!(!steps.contains(&"runc checkpoint".to_owned()), "{steps:?}");
}

#[tokio::test]
async fn a_gpu_the_node_lacks_stops_the_checkpoint_before_anything_is_frozen() {
    let rig = rig(Script {
        gpus: Some(vec![1]),
        ..Script::default()
    });
    rig.add("c1", PID, ProcessStatus::Running, false);
    let e = rig.checkpoint("c1").await.unwrap_err().to_string();
    assert!(
        e.contains("phase gpu_validate") && e.contains("GPU 0"),
        "{e}"
    );
    assert_eq!(rig.steps(), ["agent connect", "agent node_devices"]);
}

#[tokio::test]
async fn a_restore_runs_runc_then_gives_the_gpu_state_back() {
    let rig = rig(Script::default());
    rig.add("c1", 0, ProcessStatus::Created, true);
    let pid = rig.service.start_task("c1", "").await.unwrap();
    assert_eq!(pid, u32::try_from(PID).unwrap());
    assert_eq!(
        rig.steps(),
        [
            "agent connect",
            "runc restore",
            "runc ps",
            "agent restore_end restored=true"
        ]
    );
    assert_eq!(rig.status("c1"), ProcessStatus::Running);
}

#[tokio::test]
async fn a_failed_runc_restore_releases_the_staged_checkpoint() {
    let rig = rig(Script {
        runc: vec![("restore", fails())],
        ..Script::default()
    });
    rig.add("c1", 0, ProcessStatus::Created, true);
    let e = rig
        .service
        .start_task("c1", "")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("phase criu_restore"), "{e}");
    assert_eq!(
        rig.steps(),
        [
            "agent connect",
            "runc restore",
            "agent restore_end restored=false"
        ]
    );
    assert_eq!(rig.status("c1"), ProcessStatus::Created);
    assert!(rig.idle("c1"));
}

#[tokio::test]
async fn a_task_whose_gpu_state_did_not_come_back_is_killed() {
    let rig = rig(Script {
        failing: vec!["restore_end"],
        ..Script::default()
    });
    rig.add("c1", 0, ProcessStatus::Created, true);
    let e = rig
        .service
        .start_task("c1", "")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("phase agent_cuda_restore"), "{e}");
    assert_eq!(
        rig.steps(),
        [
            "agent connect",
            "runc restore",
            "runc ps",
            "agent restore_end restored=true",
            "runc kill"
        ]
    );
    assert!(rig
        .journal
        .entries()
        .contains(&"runc kill --all c1 9".to_owned()));
    // containerd then deletes the task: runc's state of the killed task goes, and the agent
    // drops what it staged.
    rig.service.delete_task("c1", "").await.unwrap();
    assert_eq!(
        rig.steps()[5..],
        [
            "runc delete",
            "agent connect",
            "agent restore_end restored=false"
        ]
    );
}

#[tokio::test]
async fn an_unreachable_agent_restores_nothing() {
    let rig = rig(Script {
        failing: vec!["connect"],
        ..Script::default()
    });
    rig.add("c1", 0, ProcessStatus::Created, true);
    let e = rig
        .service
        .start_task("c1", "")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("phase agent_connect"), "{e}");
    assert_eq!(rig.steps(), ["agent connect"]);
}

#[tokio::test]
async fn other_containers_stay_usable_while_one_is_stuck_in_its_dump() {
    let hold = Hold {
        sub: "checkpoint",
        entered: Arc::new(tokio::sync::Notify::new()),
        release: Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let rig = Arc::new(rig(Script {
        hold: Some(hold.clone()),
        ..Script::default()
    }));
    rig.add("c1", PID, ProcessStatus::Running, false);
    rig.add("c2", PID - 1, ProcessStatus::Running, false);
    let checkpointing = {
        let rig = rig.clone();
        tokio::spawn(async move { rig.checkpoint("c1").await })
    };
    // A deadlock would hang here; the bound turns it into a failure, it measures nothing.
    let others = async {
        hold.entered.notified().await;
        rig.service.kill_task("c2", "", 15, false).await.unwrap();
        let pids = TaskService::container_pids(
            &rig.service.runc,
            "c2",
            &rig.bundle("c2").join("log.json"),
        )
        .await
        .unwrap();
        assert_eq!(pids, [PID]);
        rig.service.on_exit(PID - 1, 143);
        let exit = rig
            .service
            .containers
            .with("c2", |c| Ok(c.init.exit()))
            .unwrap()
            .expect("c2's exit was recorded");
        assert_eq!(exit.status, 143);
        let e = rig
            .service
            .delete_task("c1", "")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("a checkpoint is in progress"), "{e}");
        let (pid, _) = rig.service.delete_task("c2", "").await.unwrap();
        assert_eq!(pid, u32::try_from(PID - 1).unwrap());
    };
    tokio::time::timeout(Duration::from_secs(60), others)
        .await
        .expect("operations on c2 waited for c1's checkpoint");
    hold.release.add_permits(1);
    checkpointing.await.unwrap().unwrap();
    rig.service.events.flush(Duration::from_secs(60)).await;
    let events = rig.journal.entries();
    let exit_at = events.iter().position(|e| e == "event /tasks/exit");
    let checkpointed_at = events.iter().position(|e| e == "event /tasks/checkpointed");
    assert!(
        exit_at.is_some() && exit_at < checkpointed_at,
        "c2's exit went out while c1 checkpointed: {events:?}"
    );
}
