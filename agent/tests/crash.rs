//! Crash safety on real CRIU (root): the agent, CRIU or a restore killed or failing at the
//! points that used to lose workloads. Every case checks what the README's reliability table
//! promises: no workload lost, none left stopped, nothing corrupt restored, space reclaimed
//! or quarantined and listed, and a clear error.

mod support;

use std::time::Duration;

use support::faults::{
    assert_running, restore_and_verify, signal_all, wait_for_process_with_arg, SmallMount,
    FAILPOINTS,
};
use support::{proc_state, TestAgent, Workload};

#[test]
fn agent_killed_after_the_ram_commit_recovers_the_checkpoint() {
    let mut agent = TestAgent::start_with("", &[(FAILPOINTS, "checkpoint.after_ram_commit=kill")]);
    let mut workload = Workload::start(agent.dir.path(), 64, &[]);
    let pid = workload.pid.to_string();
    let err = agent.ctl_err(&["checkpoint", "--pid", &pid, "--name", "cut"]);
    assert!(
        err.contains("closed the connection") && err.contains("kybernatectl list"),
        "{err}"
    );
    assert!(!agent.wait_exit().success());
    workload.reap_dumped();

    agent.relaunch_with_env(&[]);
    let entry = agent.listed("cut").expect("the dump is recovered");
    assert!(
        entry["note"]
            .as_str()
            .unwrap()
            .contains("recovered at agent start"),
        "{entry}"
    );
    // The name is taken; a refused request freezes nothing.
    let other = Workload::start(agent.dir.path(), 8, &[]);
    let err = agent.ctl_err(&[
        "checkpoint",
        "--pid",
        &other.pid.to_string(),
        "--name",
        "cut",
    ]);
    assert!(err.contains("cut already exists"), "{err}");
    assert_running(&other);

    restore_and_verify(&agent, &mut workload, "cut", &[]);
    support::eventually("the recovered checkpoint drains to NVMe", || {
        agent.nvme_manifest("cut").exists()
    });
}

#[test]
fn agent_sigkilled_during_a_1gib_dump_adopts_the_dump_criu_finished() {
    let mut agent = TestAgent::start();
    let mut workload = Workload::start(agent.dir.path(), 1024, &[]);
    let partial = agent.ram_root().join(".partial-big");
    let ctl = agent.ctl_spawn(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "big",
    ]);
    wait_for_process_with_arg(partial.to_str().unwrap(), Duration::from_secs(60));
    agent.kill_hard();
    let out = ctl.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("closed the connection"), "{err}");

    // The new agent waits for the CRIU the old one left, then adopts its dump.
    agent.relaunch_with_env(&[]);
    workload.reap_dumped();
    let entry = agent.listed("big").expect("the finished dump is adopted");
    assert!(
        entry["note"].as_str().unwrap().contains("recovered"),
        "{entry}"
    );
    assert!(entry["raw_bytes"].as_u64().unwrap() > 1 << 30, "{entry}");
    assert!(!partial.exists());
    restore_and_verify(&agent, &mut workload, "big", &[]);
}

#[test]
fn criu_killed_mid_dump_leaves_the_workload_running_and_the_name_free() {
    let agent = TestAgent::start();
    let workload = Workload::start(agent.dir.path(), 512, &[]);
    let pid = workload.pid.to_string();
    let partial = agent.ram_root().join(".partial-k");
    let ctl = agent.ctl_spawn(&["checkpoint", "--pid", &pid, "--name", "k"]);
    let criu = wait_for_process_with_arg(partial.to_str().unwrap(), Duration::from_secs(60));
    signal_all(&criu, libc::SIGKILL);
    let out = ctl.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the dump survived its CRIU being killed"
    );
    assert!(
        err.contains("criu dump failed") && err.contains("keeps running"),
        "{err}"
    );
    assert!(
        !err.contains("rlimit"),
        "a known warning is no cause: {err}"
    );
    assert_running(&workload);
    assert!(agent.listed("k").is_none());
    assert!(!partial.exists(), "the partial dump is cleaned up");
    agent.ctl_json(&[
        "checkpoint",
        "--pid",
        &pid,
        "--name",
        "k",
        "--leave-running",
    ]);
    assert_running(&workload);
}

#[test]
fn criu_stopped_mid_dump_times_out_and_the_workload_resumes() {
    let agent = TestAgent::start_with_config("[timeouts]\ndump_ms = 3000\n");
    let workload = Workload::start(agent.dir.path(), 512, &[]);
    let partial = agent.ram_root().join(".partial-s");
    let ctl = agent.ctl_spawn(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "s",
    ]);
    let criu = wait_for_process_with_arg(partial.to_str().unwrap(), Duration::from_secs(60));
    signal_all(&criu, libc::SIGSTOP);
    let out = ctl.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("timed out after 3000 ms"), "{err}");
    assert_running(&workload);
    assert!(agent.listed("s").is_none());
}

#[test]
fn killed_criu_restore_frees_the_pid_and_a_retry_restores() {
    let agent = TestAgent::start();
    let mut workload = Workload::start(agent.dir.path(), 1024, &[]);
    agent.ctl_json(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "r",
    ]);
    workload.reap_dumped();
    let ctl = agent.ctl_spawn(&["restore", "r"]);
    let criu = wait_for_process_with_arg("r-restore.log", Duration::from_secs(120));
    signal_all(&criu, libc::SIGKILL);
    let out = ctl.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the restore survived its CRIU being killed"
    );
    assert!(err.contains("criu restore failed"), "{err}");
    assert!(
        !err.contains("rlimit"),
        "a known warning is no cause: {err}"
    );
    support::eventually("the PID is free", || proc_state(workload.pid).is_none());
    restore_and_verify(&agent, &mut workload, "r", &[]);
}

#[test]
fn an_incomplete_dump_of_an_ended_workload_is_kept_listed_and_deletable() {
    let mut agent = TestAgent::start();
    let mut workload = Workload::start(agent.dir.path(), 1024, &[]);
    let partial = agent.ram_root().join(".partial-inc");
    let ctl = agent.ctl_spawn(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "inc",
    ]);
    let criu = wait_for_process_with_arg(partial.to_str().unwrap(), Duration::from_secs(60));
    agent.kill_hard();
    signal_all(&criu, libc::SIGKILL);
    let _ = ctl.wait_with_output();
    // Something else ends the workload before the agent is back.
    workload.kill();

    agent.relaunch_with_env(&[]);
    let entry = agent.listed("inc").expect("the incomplete dump is listed");
    assert_eq!(entry["state"], "incomplete", "{entry}");
    assert!(partial.exists(), "never silently deleted");
    let err = agent.ctl_err(&["restore", "inc"]);
    assert!(err.contains("no checkpoint named inc"), "{err}");
    let other = Workload::start(agent.dir.path(), 8, &[]);
    let err = agent.ctl_err(&[
        "checkpoint",
        "--pid",
        &other.pid.to_string(),
        "--name",
        "inc",
    ]);
    assert!(err.contains("name inc is taken"), "{err}");
    assert_running(&other);

    let deleted = agent.ctl_json(&["delete", "inc"]);
    assert_eq!(deleted["removed_from"], serde_json::json!(["ram"]));
    assert!(!partial.exists(), "delete reclaims the space");
    assert!(agent.listed("inc").is_none());
    agent.restart();
    assert!(agent.listed("inc").is_none(), "deleted for good");
}

#[test]
fn unrecorded_ram_images_are_quarantined_listed_and_hold_their_name() {
    let mut agent = TestAgent::start();
    let orphan = agent.ram_root().join("orphan");
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("pages-1.img"), vec![5u8; 4096]).unwrap();
    agent.restart();
    let entry = agent
        .listed("orphan")
        .expect("quarantined images are listed");
    assert_eq!(entry["state"], "quarantined", "{entry}");
    assert_eq!(entry["raw_bytes"], 4096);
    assert!(!orphan.exists());
    let workload = Workload::start(agent.dir.path(), 8, &[]);
    let err = agent.ctl_err(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "orphan",
    ]);
    assert!(err.contains("name orphan is taken"), "{err}");
    assert_running(&workload);
    agent.ctl_json(&["delete", "orphan"]);
    assert!(agent.listed("orphan").is_none());
    let quarantine = agent.ram_root().join(".quarantine");
    assert_eq!(std::fs::read_dir(quarantine).unwrap().count(), 0);
}

#[test]
fn a_full_ram_tier_fails_the_dump_and_the_workload_keeps_running() {
    let base = tempfile::tempdir_in("/dev/shm").unwrap();
    let ram = SmallMount::new(&base.path().join("ram"), "8m");
    let agent =
        TestAgent::start_with_config(&format!("[tiers]\nram_path = \"{}\"\n", ram.path.display()));
    let workload = Workload::start(agent.dir.path(), 64, &[]);
    let err = agent.ctl_err(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "full",
    ]);
    assert!(
        err.contains("criu dump failed") && err.contains("keeps running"),
        "{err}"
    );
    assert_running(&workload);
    assert!(agent.listed("full").is_none());
    assert!(!ram.path.join(".partial-full").exists(), "space reclaimed");
}

#[test]
fn a_damaged_nvme_chunk_is_not_reused_by_the_next_checkpoint() {
    let agent = TestAgent::start();
    let mut workload = Workload::start(agent.dir.path(), 64, &[]);
    let pid = workload.pid.to_string();
    agent.ctl_json(&[
        "checkpoint",
        "--pid",
        &pid,
        "--name",
        "a",
        "--leave-running",
    ]);
    let chunk = agent.largest_nvme_chunk();
    let mut bytes = std::fs::read(&chunk).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&chunk, &bytes).unwrap();

    agent.ctl_json(&["checkpoint", "--pid", &pid, "--name", "b"]);
    workload.reap_dumped();
    // From NVMe only: the RAM copy would hide a bad chunk.
    restore_and_verify(&agent, &mut workload, "b", &["--from", "nvme"]);
}

#[test]
fn a_thread_id_is_refused_naming_its_process() {
    let agent = TestAgent::start();
    let workload = Workload::start(agent.dir.path(), 8, &["--threads", "2"]);
    let thread = std::fs::read_dir(format!("/proc/{}/task", workload.pid))
        .unwrap()
        .flatten()
        .filter_map(|t| t.file_name().to_str()?.parse::<i32>().ok())
        .find(|t| *t != workload.pid)
        .expect("the workload has threads");
    let err = agent.ctl_err(&["checkpoint", "--pid", &thread.to_string()]);
    let pid = workload.pid;
    assert!(
        err.contains(&format!(
            "PID {thread} is a thread of process {pid}; pass {pid}"
        )),
        "{err}"
    );
    assert_running(&workload);
}

#[test]
fn start_up_failures_are_clean_errors() {
    let agent = TestAgent::start();
    let run = |config: &str, metrics: &str| {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        std::fs::write(dir.path().join("agent.toml"), config).unwrap();
        let out = std::process::Command::new(support::AGENT)
            .arg("--config")
            .arg(dir.path().join("agent.toml"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--socket")
            .arg(dir.path().join("agent.sock"))
            .arg("--metrics-addr")
            .arg(metrics)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let in_use = format!("127.0.0.1:{}", agent.metrics_port);
    let err = run("", &in_use);
    assert!(err.contains(&format!("metrics endpoint {in_use}")), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let err = run("[tiers]\nnvme_path = \"relative/nvme\"\n", "127.0.0.1:0");
    assert!(
        err.contains("tiers.nvme_path") && err.contains("not an absolute path"),
        "{err}"
    );
    let err = run(
        "[tiers]\nram_path = \"/nonexistent/kybernate-ram\"\n",
        "127.0.0.1:0",
    );
    assert!(
        err.contains("tiers.ram_path") && err.contains("does not exist"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// The agent SIGKILLed at a checkpoint phase boundary, then restarted: a dump that had not
/// started leaves the workload running and the name free; any later point leaves a
/// checkpoint the new agent lists as recovered and restores intact.
fn agent_killed_at(point: &str, dumped: bool) {
    let mut agent = TestAgent::start_with("", &[(FAILPOINTS, &format!("{point}=kill"))]);
    let mut workload = Workload::start(agent.dir.path(), 32, &[]);
    let pid = workload.pid.to_string();
    let err = agent.ctl_err(&["checkpoint", "--pid", &pid, "--name", "fp"]);
    assert!(err.contains("closed the connection"), "{point}: {err}");
    assert!(!agent.wait_exit().success());
    agent.relaunch_with_env(&[]);
    if dumped {
        workload.reap_dumped();
        let entry = agent.listed("fp").expect("recovered");
        assert!(
            entry["note"].as_str().unwrap().contains("recovered"),
            "{point}: {entry}"
        );
        restore_and_verify(&agent, &mut workload, "fp", &[]);
    } else {
        assert_running(&workload);
        assert!(agent.listed("fp").is_none(), "{point}");
        assert!(!agent.ram_root().join(".partial-fp").exists(), "{point}");
        agent.ctl_json(&[
            "checkpoint",
            "--pid",
            &pid,
            "--name",
            "fp",
            "--leave-running",
        ]);
        assert_running(&workload);
    }
}

#[test]
fn agent_killed_before_criu_leaves_the_workload_running() {
    agent_killed_at("checkpoint.before_criu", false);
}

#[test]
fn agent_killed_after_criu_before_the_ram_commit_recovers_the_checkpoint() {
    agent_killed_at("checkpoint.after_criu", true);
}

#[test]
fn agent_killed_before_the_record_recovers_the_checkpoint() {
    agent_killed_at("checkpoint.before_record", true);
}

#[test]
fn a_failing_step_before_criu_rolls_back() {
    let agent = TestAgent::start_with("", &[(FAILPOINTS, "checkpoint.before_criu=error")]);
    let workload = Workload::start(agent.dir.path(), 16, &[]);
    let err = agent.ctl_err(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "e",
    ]);
    assert!(err.contains("failpoint checkpoint.before_criu"), "{err}");
    assert_running(&workload);
    assert!(agent.listed("e").is_none());
    assert!(!agent.ram_root().join(".partial-e").exists());
}

/// The agent SIGKILLed around a restore's CRIU run: before it, the PID stays free and a
/// retry restores; after it, the restored workload keeps running through the restart.
#[test]
fn agent_killed_around_criu_restore() {
    let mut agent = TestAgent::start();
    let mut workload = Workload::start(agent.dir.path(), 32, &[]);
    agent.ctl_json(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "rr",
    ]);
    workload.reap_dumped();

    agent.relaunch_with_env(&[(FAILPOINTS, "restore.before_criu=kill")]);
    let err = agent.ctl_err(&["restore", "rr"]);
    assert!(err.contains("closed the connection"), "{err}");
    assert!(!agent.wait_exit().success());
    assert!(proc_state(workload.pid).is_none(), "CRIU never ran");

    agent.relaunch_with_env(&[(FAILPOINTS, "restore.after_criu=kill")]);
    let at_dump = workload.read().unwrap();
    let err = agent.ctl_err(&["restore", "rr"]);
    assert!(err.contains("closed the connection"), "{err}");
    assert!(!agent.wait_exit().success());
    agent.relaunch_with_env(&[]);
    let after = workload.wait_for(|s| s.counter > at_dump.counter + 3);
    assert_eq!(
        after.epoch, at_dump.epoch,
        "the restored workload survived the restart"
    );
    assert!(workload.verify_memory().memory_ok);
}
