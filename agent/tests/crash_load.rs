//! Many operations at once on real CRIU (root): 20 small workloads checkpointed concurrently
//! through kybernatectl, half leave-running and half stop mode, then all 20 restored
//! concurrently, then the agent SIGKILLed and started again.

mod support;

use std::collections::BTreeSet;

use support::faults::assert_running;
use support::{TestAgent, Workload};

const WORKLOADS: usize = 20;

#[test]
fn twenty_concurrent_checkpoints_and_restores_all_restore_intact() {
    let mut agent = TestAgent::start();
    let mut workloads: Vec<Workload> = (0..WORKLOADS)
        .map(|_| Workload::start(agent.dir.path(), 8, &[]))
        .collect();
    let leave_running = |i: usize| i.is_multiple_of(2);

    let checkpoints: Vec<_> = workloads
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let (pid, name) = (w.pid.to_string(), format!("c{i:02}"));
            let mut args: Vec<&str> = vec!["checkpoint", "--pid", &pid, "--name", &name];
            if leave_running(i) {
                args.push("--leave-running");
            }
            agent.ctl_spawn(&args)
        })
        .collect();
    let mut at_dump = Vec::new();
    for (i, child) in checkpoints.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "checkpoint c{i:02} failed: {}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            agent.log()
        );
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(reply["name"], format!("c{i:02}"), "{reply}");
        if leave_running(i) {
            assert_running(&workloads[i]);
        }
    }
    let listed: Vec<String> = agent
        .ctl_json(&["list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    let unique: BTreeSet<&String> = listed.iter().collect();
    assert_eq!(listed.len(), WORKLOADS, "{listed:?}");
    assert_eq!(unique.len(), WORKLOADS, "no name twice: {listed:?}");

    // Every PID must be free for its restore: stopped ones are reaped, running ones killed.
    for (i, w) in workloads.iter_mut().enumerate() {
        at_dump.push(w.read().unwrap());
        if leave_running(i) {
            w.kill();
        } else {
            w.reap_dumped();
        }
    }
    let restores: Vec<_> = (0..WORKLOADS)
        .map(|i| agent.ctl_spawn(&["restore", &format!("c{i:02}")]))
        .collect();
    for (i, child) in restores.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "restore c{i:02} failed: {}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            agent.log()
        );
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        workloads[i].restored_as(support::pid_of(&reply));
    }
    for (w, dumped) in workloads.iter().zip(&at_dump) {
        let after = w.wait_for(|s| s.counter > dumped.counter);
        assert_eq!(after.epoch, dumped.epoch, "a restore, not a restart");
        assert!(w.verify_memory().memory_ok, "memory intact after restore");
    }

    // After a crash the journal has nothing open, and everything is still there and running.
    agent.kill_hard();
    agent.relaunch_with_env(&[]);
    let journal = std::fs::read(agent.state_dir().join("journal")).unwrap();
    assert!(
        journal.is_empty(),
        "open journal entries after a clean run: {}",
        String::from_utf8_lossy(&journal)
    );
    let after: Vec<serde_json::Value> = agent.ctl_json(&["list"]).as_array().unwrap().clone();
    assert_eq!(after.len(), WORKLOADS);
    for entry in &after {
        let note = entry["note"].as_str().unwrap_or_default();
        assert!(!note.contains("recovered"), "{entry}");
        assert!(
            !matches!(entry["state"].as_str(), Some("incomplete" | "quarantined")),
            "{entry}"
        );
    }
    for w in &workloads {
        assert_running(w);
    }
}
