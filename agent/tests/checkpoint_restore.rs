//! Real checkpoints and restores of real processes through the agent, with CRIU 4.2 (root).

mod support;

use support::{TestAgent, Workload};

fn phase_names(reply: &serde_json::Value) -> Vec<String> {
    reply["phases"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

#[test]
fn memory_survives_checkpoint_kill_restore() {
    let agent = TestAgent::start();
    let mut workload = Workload::start(agent.dir.path(), 256, &[]);
    let before = workload.read().unwrap();

    let cp = agent.ctl_json(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "big",
    ]);
    assert_eq!(cp["name"], "big");
    assert!(cp["raw_bytes"].as_u64().unwrap() > 256 << 20, "{cp}");
    assert_eq!(cp["tiers"], serde_json::json!(["ram", "nvme"]));
    for phase in ["criu_dump", "store_nvme", "digest"] {
        assert!(phase_names(&cp).contains(&phase.to_string()), "{cp}");
    }
    workload.reap_dumped();
    let at_dump = workload.read().unwrap();

    let restored = agent.ctl_json(&["restore", "big"]);
    let pid = support::pid_of(&restored);
    assert_eq!(pid, workload.pid, "CRIU restores the tree under its PID");
    assert_eq!(restored["source_tier"], "ram");
    workload.restored_as(pid);

    let after = workload.wait_for(|s| s.counter > at_dump.counter + 5);
    assert_eq!(
        after.epoch, before.epoch,
        "a restarted process would have a new epoch"
    );
    let verified = workload.verify_memory();
    assert!(
        verified.memory_ok,
        "256 MiB pattern must be intact after restore"
    );
    assert!(agent.metrics().contains(
        "kybernate_phase_duration_seconds_count{operation=\"restore\",phase=\"criu_restore\"} 1"
    ));
}

#[test]
fn multithreaded_process_restores_all_threads() {
    let agent = TestAgent::start();
    let mut workload = Workload::start(agent.dir.path(), 16, &["--threads", "4"]);
    workload.wait_for(|s| s.threads.iter().all(|t| *t > 3));
    agent.ctl_json(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "threads",
    ]);
    workload.reap_dumped();
    let at_dump = workload.read().unwrap();
    assert_eq!(at_dump.threads.len(), 4);

    let restored = agent.ctl_json(&["restore", "threads", "--from", "nvme"]);
    assert_eq!(restored["source_tier"], "nvme");
    workload.restored_as(support::pid_of(&restored));
    let after = workload.wait_for(|s| {
        s.threads
            .iter()
            .zip(&at_dump.threads)
            .all(|(now, then)| now > &(then + 3))
    });
    assert_eq!(after.epoch, at_dump.epoch);
    let tasks = std::fs::read_dir(format!("/proc/{}/task", workload.pid))
        .unwrap()
        .count();
    assert!(tasks >= 5, "main thread + 4 workers, found {tasks}");
}

#[test]
fn open_file_keeps_its_position() {
    let agent = TestAgent::start();
    let journal = agent.dir.path().join("journal");
    let mut workload = Workload::start(
        agent.dir.path(),
        8,
        &["--journal", journal.to_str().unwrap()],
    );
    workload.wait_for(|s| s.journal > 10);
    agent.ctl_json(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "journal",
    ]);
    workload.reap_dumped();
    let at_dump = workload.read().unwrap();

    let restored = agent.ctl_json(&["restore", "journal"]);
    workload.restored_as(support::pid_of(&restored));
    workload.wait_for(|s| s.journal > at_dump.journal + 10);
    workload.kill();

    let text = std::fs::read_to_string(&journal).unwrap();
    let lines: Vec<u64> = text.lines().map(|l| l.parse().unwrap()).collect();
    let expected: Vec<u64> = (1..=u64::try_from(lines.len()).unwrap()).collect();
    assert_eq!(
        lines, expected,
        "the journal continued without gaps or repeats"
    );
    assert!(u64::try_from(lines.len()).unwrap() > at_dump.journal + 10);
}

#[test]
fn leave_running_and_two_checkpoints_of_one_process() {
    let agent = TestAgent::start();
    let mut workload = Workload::start(agent.dir.path(), 32, &[]);
    let pid = workload.pid.to_string();

    let first = agent.ctl_json(&[
        "checkpoint",
        "--pid",
        &pid,
        "--name",
        "first",
        "--leave-running",
    ]);
    assert_eq!(first["name"], "first");
    let still = workload.read().unwrap().counter;
    workload.wait_for(|s| s.counter > still + 10);
    assert!(workload.is_alive(), "--leave-running keeps the process");
    assert_ne!(support::proc_state(workload.pid), Some('T'));

    agent.ctl_json(&["checkpoint", "--pid", &pid, "--name", "second"]);
    workload.reap_dumped();
    let at_second = workload.read().unwrap();

    let list = agent.ctl_json(&["list"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["first", "second"]);

    let restored = agent.ctl_json(&["restore", "second"]);
    workload.restored_as(support::pid_of(&restored));
    let after = workload.wait_for(|s| s.counter > at_second.counter);
    assert_eq!(after.epoch, at_second.epoch);

    // The first checkpoint restores the older state once the PID is free again.
    workload.kill();
    let restored = agent.ctl_json(&["restore", "first"]);
    workload.restored_as(support::pid_of(&restored));
    let older = workload.wait_for(|_| true);
    assert_eq!(older.epoch, at_second.epoch);
    let info = agent.ctl_json(&["inspect", "first"]);
    assert_eq!(info["leave_running"], true);
}

#[test]
fn checkpoints_survive_an_agent_restart() {
    let mut agent = TestAgent::start();
    let mut workload = Workload::start(agent.dir.path(), 16, &[]);
    agent.ctl_json(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "durable",
    ]);
    workload.reap_dumped();
    let at_dump = workload.read().unwrap();

    agent.restart();
    let list = agent.ctl_json(&["list"]);
    assert_eq!(list[0]["name"], "durable");
    assert_eq!(list[0]["tiers"], serde_json::json!(["ram", "nvme"]));

    let restored = agent.ctl_json(&["restore", "durable"]);
    workload.restored_as(support::pid_of(&restored));
    let after = workload.wait_for(|s| s.counter > at_dump.counter);
    assert_eq!(after.epoch, at_dump.epoch);

    let deleted = agent.ctl_json(&["delete", "durable"]);
    assert_eq!(deleted["removed_from"], serde_json::json!(["ram", "nvme"]));
    assert!(agent.ctl_json(&["list"]).as_array().unwrap().is_empty());
    assert!(!agent.nvme_manifest("durable").exists());
}

#[test]
fn watch_streams_phase_progress() {
    let agent = TestAgent::start();
    let mut watcher = std::process::Command::new(support::CTL)
        .arg("--socket")
        .arg(&agent.socket)
        .args(["--output", "json", "watch"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut workload = Workload::start(agent.dir.path(), 8, &[]);
    agent.ctl_json(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "watched",
    ]);
    workload.reap_dumped();
    // The reply can overtake the last event on its way to the watcher: read until the
    // checkpoint's last phase has arrived (or the stream ends), then stop the watcher.
    let stdout = watcher.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut events: Vec<serde_json::Value> = Vec::new();
    while let Ok(line) = rx.recv_timeout(std::time::Duration::from_secs(30)) {
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        let last = event["name"] == "watched"
            && event["status"] == "finished"
            && event["phase"] == "store_nvme";
        events.push(event);
        if last {
            break;
        }
    }
    watcher.kill().unwrap();
    let _ = watcher.wait();
    let finished: Vec<&str> = events
        .iter()
        .filter(|e| e["status"] == "finished" && e["name"] == "watched")
        .map(|e| e["phase"].as_str().unwrap())
        .collect();
    assert_eq!(
        finished,
        [
            "cuda_checkpoint",
            "criu_dump",
            "cuda_release",
            "store_ram",
            "digest",
            "store_nvme"
        ]
    );
}

/// The shim's two-step End for `ctr` and CRI checkpoints: the first (`images_follow`) gives
/// the GPUs back and keeps the name reserved, the second commits the images that arrived in
/// the meantime; or, when they never arrive, drops the checkpoint and frees the name.
#[test]
fn a_container_checkpoint_whose_images_follow_commits_them_later_or_drops_it() {
    use kybernate_client::connect_agent as connect;
    use kybernate_proto::agent::v1 as pb;

    let agent = TestAgent::start();
    let mut sleeper = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    let pid = i32::try_from(sleeper.id()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let listed = |name: &str| {
        agent
            .ctl_json(&["list"])
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == name)
    };
    runtime.block_on(async {
        let mut client = connect(&agent.socket).await.unwrap();
        let begin = |name: &str| pb::ContainerCheckpointBeginRequest {
            name: name.to_owned(),
            container_id: "c1".into(),
            pids: vec![pid],
            leave_running: true,
            ..Default::default()
        };
        let end =
            |name: &str, dumped: bool, images_follow: bool| pb::ContainerCheckpointEndRequest {
                checkpoint_ref: name.to_owned(),
                dumped,
                failure: if dumped {
                    String::new()
                } else {
                    "copy failed".into()
                },
                dump_millis: 7,
                images_follow,
            };

        let images = client
            .container_checkpoint_begin(begin("follow"))
            .await
            .unwrap()
            .into_inner()
            .image_dir;
        let first = client
            .container_checkpoint_end(end("follow", true, true))
            .await
            .unwrap()
            .into_inner();
        assert!(first.cuda_done && first.raw_bytes == 0, "{first:?}");
        assert!(!listed("follow"), "listed before its images arrived");
        let again = client.container_checkpoint_begin(begin("follow")).await;
        assert!(again.is_err(), "the name was free between the two Ends");
        std::fs::write(
            std::path::Path::new(&images).join("pages-1.img"),
            vec![7u8; 1 << 20],
        )
        .unwrap();
        let second = client
            .container_checkpoint_end(end("follow", true, false))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(second.raw_bytes, 1 << 20, "{second:?}");
        assert_eq!(second.tiers, vec!["ram".to_owned()], "{second:?}");
        assert!(listed("follow"));

        let images = client
            .container_checkpoint_begin(begin("never"))
            .await
            .unwrap()
            .into_inner()
            .image_dir;
        client
            .container_checkpoint_end(end("never", true, true))
            .await
            .unwrap();
        client
            .container_checkpoint_end(end("never", false, false))
            .await
            .unwrap();
        assert!(!listed("never"));
        assert!(!std::path::Path::new(&images).exists(), "{images} stayed");
        // The name is free again.
        client
            .container_checkpoint_begin(begin("never"))
            .await
            .unwrap();
        client
            .container_checkpoint_end(end("never", false, false))
            .await
            .unwrap();
    });
    // The drain to NVMe follows in the background.
    support::eventually("follow drained to NVMe", || {
        agent
            .ctl_json(&["list"])
            .as_array()
            .unwrap()
            .iter()
            .any(|c| {
                c["name"] == "follow" && c["tiers"].as_array().unwrap().iter().any(|t| t == "nvme")
            })
    });
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}
