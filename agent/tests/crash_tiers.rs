//! Crash safety of the slower tiers on real CRIU (root): the agent killed or a step failing at
//! the phase boundaries of storing into NVMe, of the background drain, of demotion and of a
//! restore's staging, and a full NVMe disk. Every case checks that no workload is lost, that
//! nothing corrupt is restored, that the space is reclaimed and that the error is clear.

mod support;

use support::faults::{assert_running, restore_and_verify, tiers_of, SmallMount, FAILPOINTS};
use support::{proc_state, TestAgent, Workload};

/// A stop-mode checkpoint of a fresh 32 MiB workload under `name`; the workload's old PID is
/// reaped, so only the checkpoint holds it afterwards.
fn stopped_checkpoint(agent: &TestAgent, name: &str, extra: &[&str]) -> Workload {
    let mut workload = Workload::start(agent.dir.path(), 32, &[]);
    let pid = workload.pid.to_string();
    let mut args: Vec<&str> = vec!["checkpoint", "--pid", &pid, "--name", name];
    args.extend_from_slice(extra);
    agent.ctl_json(&args);
    workload.reap_dumped();
    workload
}

/// The agent SIGKILLs itself at `point` while storing a stop-mode checkpoint into NVMe in the
/// foreground. The restarted agent adopts the committed RAM copy, drains it into NVMe, and
/// the restore from NVMe gives the workload back intact.
fn store_killed_at(point: &str) {
    let mut agent = TestAgent::start_with("", &[(FAILPOINTS, &format!("{point}=kill"))]);
    let mut workload = Workload::start(agent.dir.path(), 32, &[]);
    let pid = workload.pid.to_string();
    let err = agent.ctl_err(&["checkpoint", "--pid", &pid, "--name", "st"]);
    assert!(err.contains("closed the connection"), "{point}: {err}");
    assert!(!agent.wait_exit().success());
    workload.reap_dumped();

    agent.relaunch_with_env(&[]);
    let entry = agent.listed("st").expect("the checkpoint is recovered");
    assert!(
        entry["note"].as_str().unwrap().contains("recovered"),
        "{point}: {entry}"
    );
    support::eventually("the recovered checkpoint is in NVMe", || {
        agent.nvme_manifest("st").exists()
    });
    restore_and_verify(&agent, &mut workload, "st", &["--from", "nvme"]);
}

#[test]
fn agent_killed_before_the_nvme_store_recovers_and_drains_the_checkpoint() {
    store_killed_at("store.nvme.before");
}

#[test]
fn agent_killed_after_the_nvme_commit_before_the_record_recovers_the_checkpoint() {
    store_killed_at("store.nvme.after");
}

#[test]
fn a_failing_nvme_store_keeps_the_ram_copy_and_the_next_start_drains_it() {
    let mut agent = TestAgent::start_with("", &[(FAILPOINTS, "store.nvme.before=error")]);
    let mut workload = Workload::start(agent.dir.path(), 32, &[]);
    let pid = workload.pid.to_string();
    let err = agent.ctl_err(&["checkpoint", "--pid", &pid, "--name", "half"]);
    assert!(
        err.contains("kept in ram only") && err.contains("failpoint store.nvme.before"),
        "{err}"
    );
    workload.reap_dumped();
    let entry = agent.listed("half").expect("the checkpoint is kept");
    assert_eq!(tiers_of(&entry), ["ram"], "{entry}");
    assert!(!agent.nvme_manifest("half").exists());
    assert!(agent.nvme_chunk_files().is_empty(), "no chunk left behind");

    agent.relaunch_with_env(&[]);
    support::eventually("the next start drains it into NVMe", || {
        agent.nvme_manifest("half").exists()
    });
    restore_and_verify(&agent, &mut workload, "half", &["--from", "nvme"]);
}

#[test]
fn background_drain_killed_before_it_stores_is_resumed_at_the_next_start() {
    let mut agent = TestAgent::start_with("", &[(FAILPOINTS, "drain.before=kill")]);
    let mut workload = Workload::start(agent.dir.path(), 32, &[]);
    let pid = workload.pid.to_string();
    // The reply and the drain's start race; either way the record was written first.
    let out = agent.ctl(&["checkpoint", "--pid", &pid, "--name", "bg", "--tier", "ram"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || err.contains("closed the connection"),
        "{err}"
    );
    assert!(!agent.wait_exit().success());
    workload.reap_dumped();
    assert!(!agent.nvme_manifest("bg").exists(), "the drain never ran");

    agent.relaunch_with_env(&[]);
    let entry = agent.listed("bg").expect("the checkpoint is listed");
    assert!(tiers_of(&entry).contains(&"ram".to_owned()), "{entry}");
    support::eventually("the drain resumes", || agent.nvme_manifest("bg").exists());
    restore_and_verify(&agent, &mut workload, "bg", &["--from", "nvme"]);
}

#[test]
fn background_drain_sigkilled_mid_write_leaves_no_chunk_and_resumes() {
    // 4 MiB/s makes the background drain of 64 MiB take long enough to be cut off mid-write.
    let slow = "[bandwidth]\nnvme_write_bytes_per_sec = 4194304\n";
    let mut agent = TestAgent::start_with_config(slow);
    let mut workload = Workload::start(agent.dir.path(), 64, &[]);
    let pid = workload.pid.to_string();
    agent.ctl_json(&[
        "checkpoint",
        "--pid",
        &pid,
        "--name",
        "cut",
        "--tier",
        "ram",
    ]);
    workload.reap_dumped();
    support::eventually("the drain writes chunks", || {
        !agent.nvme_chunk_files().is_empty()
    });
    agent.kill_hard();
    assert!(
        !agent.nvme_manifest("cut").exists(),
        "cut off before its commit"
    );

    // A start whose drain fails at once shows what the crash left: the sweep at start removed
    // every chunk no manifest references.
    agent.write_config("");
    agent.relaunch_with_env(&[(FAILPOINTS, "drain.before=error")]);
    agent.wait_for_log("failpoint drain.before");
    assert!(
        agent.nvme_chunk_files().is_empty(),
        "unreferenced chunks left: {:?}",
        agent.nvme_chunk_files()
    );
    assert_eq!(tiers_of(&agent.listed("cut").unwrap()), ["ram"]);

    agent.relaunch_with_env(&[]);
    support::eventually("the drain resumes", || agent.nvme_manifest("cut").exists());
    restore_and_verify(&agent, &mut workload, "cut", &["--from", "nvme"]);
}

#[test]
fn demotion_killed_before_dropping_the_ram_copy_loses_nothing_and_finishes_later() {
    let budget = "[tiers]\nram_budget_bytes = 1048576\n";
    let mut agent = TestAgent::start_with(budget, &[(FAILPOINTS, "demote.ram.before_remove=kill")]);
    let mut workload = Workload::start(agent.dir.path(), 32, &[]);
    let pid = workload.pid.to_string();
    let out = agent.ctl(&["checkpoint", "--pid", &pid, "--name", "dm"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || err.contains("closed the connection"),
        "{err}"
    );
    assert!(!agent.wait_exit().success());
    workload.reap_dumped();
    assert!(
        agent.ram_dir("dm").exists(),
        "killed before the RAM copy went"
    );
    assert!(agent.nvme_manifest("dm").exists(), "NVMe holds it");

    agent.relaunch_with_env(&[]);
    support::eventually("the demotion finishes", || {
        agent.listed("dm").is_some_and(|e| tiers_of(&e) == ["nvme"])
    });
    assert!(!agent.ram_dir("dm").exists());
    restore_and_verify(&agent, &mut workload, "dm", &[]);
}

#[test]
fn a_failing_demotion_keeps_every_copy() {
    let budget = "[tiers]\nram_budget_bytes = 1048576\n";
    let agent = TestAgent::start_with(budget, &[(FAILPOINTS, "demote.ram.before_remove=error")]);
    let mut workload = stopped_checkpoint(&agent, "keep", &[]);
    agent.wait_for_log("failpoint demote.ram.before_remove");
    assert!(agent.log().contains("demotion stopped"), "{}", agent.log());
    let entry = agent.listed("keep").unwrap();
    assert_eq!(tiers_of(&entry), ["nvme", "ram"], "{entry}");
    restore_and_verify(&agent, &mut workload, "keep", &[]);
}

#[test]
fn restore_staging_killed_leaves_no_scratch_copy_and_a_retry_restores() {
    let mut agent = TestAgent::start();
    let mut workload = stopped_checkpoint(&agent, "sg", &[]);

    agent.relaunch_with_env(&[(FAILPOINTS, "stage.nvme.after_load=kill")]);
    let err = agent.ctl_err(&["restore", "sg", "--from", "nvme"]);
    assert!(err.contains("closed the connection"), "{err}");
    assert!(!agent.wait_exit().success());
    assert_eq!(agent.staging_dirs().len(), 1, "killed with a staged copy");
    assert!(proc_state(workload.pid).is_none(), "CRIU never ran");

    agent.relaunch_with_env(&[]);
    assert!(agent.staging_dirs().is_empty(), "the scratch copy is swept");
    restore_and_verify(&agent, &mut workload, "sg", &["--from", "nvme"]);
    assert!(agent.staging_dirs().is_empty());
}

#[test]
fn a_failing_restore_staging_removes_its_scratch_copy_and_frees_the_pid() {
    let mut agent = TestAgent::start();
    let mut workload = stopped_checkpoint(&agent, "sf", &[]);

    agent.relaunch_with_env(&[(FAILPOINTS, "stage.nvme.before_load=error")]);
    let err = agent.ctl_err(&["restore", "sf", "--from", "nvme"]);
    assert!(err.contains("failpoint stage.nvme.before_load"), "{err}");
    assert!(agent.staging_dirs().is_empty(), "scratch copy removed");
    assert!(proc_state(workload.pid).is_none());
    assert!(agent.listed("sf").is_some(), "the checkpoint stays");

    agent.relaunch_with_env(&[]);
    restore_and_verify(&agent, &mut workload, "sf", &["--from", "nvme"]);
}

#[test]
fn nvme_full_during_the_background_drain_keeps_the_ram_copy() {
    let base = tempfile::tempdir_in("/dev/shm").unwrap();
    let nvme = SmallMount::new(&base.path().join("nvme"), "8m");
    let agent = TestAgent::start_with_config(&format!(
        "[tiers]\nnvme_path = \"{}\"\n",
        nvme.path.display()
    ));
    let mut workload = Workload::start(agent.dir.path(), 64, &[]);
    let pid = workload.pid.to_string();
    let done = agent.ctl_json(&["checkpoint", "--pid", &pid, "--name", "df", "--tier", "ram"]);
    assert_eq!(done["tiers"], serde_json::json!(["ram"]), "{done}");
    workload.reap_dumped();
    agent.wait_for_log("background drain failed");
    assert!(agent.log().contains("(disk full?)"), "{}", agent.log());
    assert_eq!(tiers_of(&agent.listed("df").unwrap()), ["ram"]);
    assert!(!nvme.path.join("manifests").join("df").exists());
    assert!(
        support::faults::files_under(&nvme.path.join("chunks")).is_empty(),
        "the failed store removed its chunks"
    );
    restore_and_verify(&agent, &mut workload, "df", &[]);
}

#[test]
fn nvme_full_during_a_streamed_checkpoint_keeps_the_workload_running() {
    let base = tempfile::tempdir_in("/dev/shm").unwrap();
    let nvme = SmallMount::new(&base.path().join("nvme"), "8m");
    let agent = TestAgent::start_with_config(&format!(
        "[tiers]\nnvme_path = \"{}\"\n[dataplane]\nstream = true\n",
        nvme.path.display()
    ));
    let workload = Workload::start(agent.dir.path(), 64, &[]);
    let err = agent.ctl_err(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "sf",
    ]);
    assert!(
        err.contains("store_nvme") && err.contains("(disk full?)"),
        "{err}"
    );
    assert_running(&workload);
    assert!(agent.listed("sf").is_none(), "nothing partial listed");
    assert!(!nvme.path.join("manifests").join("sf").exists());
    assert!(!agent.ram_root().join(".partial-sf").exists());
    assert!(
        support::faults::files_under(&nvme.path.join("chunks")).is_empty(),
        "space reclaimed"
    );
}
