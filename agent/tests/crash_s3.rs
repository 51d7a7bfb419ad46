//! Crash safety around the S3 tier on real CRIU (root) and a real S3 server on loopback: the
//! server stopped and started again during a store and during a restore, and a demotion into
//! S3 cut off by the agent's death. Every case checks that no workload is lost, that nothing
//! corrupt is restored, that no unfinished multipart upload is left and that the error is
//! clear.

mod support;

use support::faults::{assert_running, restore_and_verify, tiers_of, FAILPOINTS};
use support::{proc_state, S3Server, TestAgent, Workload};

/// The agent's environment: the S3 credentials and `extra`.
fn env_with<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env: Vec<(&'a str, &'a str)> = S3Server::credentials().to_vec();
    env.extend_from_slice(extra);
    env
}

#[test]
fn s3_stopped_during_a_store_fails_cleanly_and_a_retry_after_its_return_works() {
    let mut s3 = S3Server::start();
    // Slow uploads (foreground included) keep the multipart upload open long enough to cut.
    let config = format!(
        "{}[bandwidth]\ns3_upload_bytes_per_sec = 4194304\nforeground_exceeds_limits = false\n",
        s3.agent_config_failing_fast()
    );
    let agent = TestAgent::start_with(&config, &env_with(&[]));
    let mut workload = Workload::start(agent.dir.path(), 24, &[]);
    let pid = workload.pid.to_string();
    let ctl = agent.ctl_spawn(&[
        "checkpoint",
        "--pid",
        &pid,
        "--name",
        "up",
        "--tier",
        "s3",
        "--leave-running",
    ]);
    support::eventually("the multipart upload starts", || {
        !s3.unfinished_uploads().is_empty()
    });
    s3.stop();
    let out = ctl.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "stored into a stopped S3 server");
    assert!(
        err.contains("is kept in") && err.contains("store_s3"),
        "{err}"
    );
    assert_running(&workload);

    s3.restart();
    let entry = agent.listed("up").expect("the nearer copies are kept");
    assert_eq!(tiers_of(&entry), ["nvme", "ram"], "{entry}");
    // The retry: the same workload, now in stop mode, into S3.
    let done = agent.ctl_json(&["checkpoint", "--pid", &pid, "--name", "up2", "--tier", "s3"]);
    assert!(tiers_of(&done).contains(&"s3".to_owned()), "{done}");
    workload.reap_dumped();
    assert!(
        s3.unfinished_uploads().is_empty(),
        "the cut-off upload was aborted: {:?}",
        s3.unfinished_uploads()
    );
    restore_and_verify(&agent, &mut workload, "up2", &["--from", "s3"]);
}

#[test]
fn s3_stopped_during_a_restore_fails_cleanly_and_the_checkpoint_stays_restorable() {
    let mut s3 = S3Server::start();
    let config = format!(
        "{}[bandwidth]\ns3_download_bytes_per_sec = 4194304\nforeground_exceeds_limits = false\n",
        s3.agent_config_failing_fast()
    );
    let agent = TestAgent::start_with(&config, &env_with(&[]));
    let mut workload = Workload::start(agent.dir.path(), 24, &[]);
    let pid = workload.pid.to_string();
    agent.ctl_json(&["checkpoint", "--pid", &pid, "--name", "rs", "--tier", "s3"]);
    workload.reap_dumped();

    let ctl = agent.ctl_spawn(&["restore", "rs", "--from", "s3"]);
    support::eventually("the restore stages from S3", || {
        !agent.staging_dirs().is_empty()
    });
    s3.stop();
    let out = ctl.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "restored from a stopped S3 server");
    assert!(err.contains("s3 copy") && err.contains("load_s3"), "{err}");
    assert!(
        agent.staging_dirs().is_empty(),
        "the scratch copy is removed"
    );
    assert!(proc_state(workload.pid).is_none(), "nothing half-restored");

    // Another tier still has it...
    restore_and_verify(&agent, &mut workload, "rs", &[]);
    workload.kill();
    // ...and once S3 is back, so does S3.
    s3.restart();
    restore_and_verify(&agent, &mut workload, "rs", &["--from", "s3"]);
    assert!(s3.unfinished_uploads().is_empty());
}

/// The agent SIGKILLs itself at `point` while demoting a checkpoint from NVMe into S3 (its
/// background drain into S3 failed, so the demotion copies it). `extra` is more config. The
/// restarted agent finishes the demotion (S3 only) and the checkpoint restores intact.
fn demotion_into_s3_killed_at(point: &str, extra: &str, staged: bool) {
    let s3 = S3Server::start();
    let config = format!(
        "{}[tiers]\nram_budget_bytes = 1048576\nnvme_budget_bytes = 1048576\n[policy]\nnvme_keep_recent = 0\n{extra}",
        s3.agent_config_failing_fast()
    );
    let failpoints = format!("drain.before=error,{point}=kill");
    let mut agent = TestAgent::start_with(&config, &env_with(&[(FAILPOINTS, &failpoints)]));
    let mut workload = Workload::start(agent.dir.path(), 32, &[]);
    let pid = workload.pid.to_string();
    let out = agent.ctl(&["checkpoint", "--pid", &pid, "--name", "dz"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || err.contains("closed the connection"),
        "{point}: {err}"
    );
    assert!(!agent.wait_exit().success());
    workload.reap_dumped();
    let scratch = usize::from(staged);
    assert_eq!(
        agent.staging_dirs().len(),
        scratch,
        "{point}: scratch copies"
    );
    assert!(
        agent.nvme_manifest("dz").exists(),
        "{point}: NVMe keeps its copy"
    );

    agent.relaunch_with_env(&env_with(&[]));
    assert!(agent.staging_dirs().is_empty(), "the scratch copy is swept");
    support::eventually("the demotion into S3 finishes", || {
        agent.listed("dz").is_some_and(|e| tiers_of(&e) == ["s3"])
    });
    assert!(!agent.nvme_manifest("dz").exists());
    restore_and_verify(&agent, &mut workload, "dz", &[]);
    assert!(s3.unfinished_uploads().is_empty());
}

/// With an upload limit the demotion stages the NVMe copy through RAM; the agent dies with
/// the staged copy.
#[test]
fn demotion_into_s3_killed_after_staging_finishes_after_a_restart() {
    demotion_into_s3_killed_at(
        "stage.nvme.after_load",
        "[bandwidth]\ns3_upload_bytes_per_sec = 1073741824\n",
        true,
    );
}

/// Without one the NVMe chunks go to S3 as they are; the agent dies once S3 holds the
/// checkpoint, before the NVMe copy is dropped.
#[test]
fn demotion_into_s3_killed_before_dropping_the_nvme_copy_finishes_after_a_restart() {
    demotion_into_s3_killed_at("demote.nvme.before_remove", "", false);
}
