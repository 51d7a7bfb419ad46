//! Streamed checkpoints through the agent (`[dataplane] stream = true`), with CRIU 4.2 (root):
//! a checkpoint for NVMe never lands in the RAM tier, and a restore from NVMe reads the
//! chunks straight into CRIU, refusing a damaged one before the process runs.

mod support;

use support::{TestAgent, Workload};

const STREAMING: &str = "[dataplane]\nstream = true\n";

fn phase_names(reply: &serde_json::Value) -> Vec<String> {
    reply["phases"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

#[test]
fn a_streamed_checkpoint_skips_ram_and_restores_from_nvme() {
    let agent = TestAgent::start_with_config(STREAMING);
    let mut workload = Workload::start(agent.dir.path(), 256, &[]);
    let cp = agent.ctl_json(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "streamed",
    ]);
    assert_eq!(cp["tiers"], serde_json::json!(["nvme"]), "{cp}");
    assert!(cp["raw_bytes"].as_u64().unwrap() > 256 << 20, "{cp}");
    let phases = phase_names(&cp);
    assert!(phases.contains(&"criu_dump".to_string()), "{cp}");
    assert!(!phases.contains(&"store_ram".to_string()), "{cp}");
    assert!(
        !agent.ram_dir("streamed").exists(),
        "nothing in the RAM tier"
    );
    assert!(agent.nvme_manifest("streamed").is_file());
    workload.reap_dumped();

    let restored = agent.ctl_json(&["restore", "streamed"]);
    assert_eq!(restored["source_tier"], "nvme", "{restored}");
    assert!(
        !phase_names(&restored).contains(&"load_nvme".to_string()),
        "no staging copy: {restored}"
    );
    workload.restored_as(support::pid_of(&restored));
    assert!(
        workload.verify_memory().memory_ok,
        "256 MiB pattern must be intact after a streamed round trip"
    );
}

#[test]
fn a_damaged_chunk_is_refused_before_the_restored_process_runs() {
    let agent = TestAgent::start_with_config(STREAMING);
    let mut workload = Workload::start(agent.dir.path(), 64, &[]);
    agent.ctl_json(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        "damaged",
    ]);
    workload.reap_dumped();
    let chunk = agent.largest_nvme_chunk();
    let mut bytes = std::fs::read(&chunk).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&chunk, bytes).unwrap();

    let err = agent.ctl_err(&["restore", "damaged"]);
    let hash = chunk.file_name().unwrap().to_str().unwrap();
    assert!(
        err.contains("damaged") && err.contains(hash),
        "the error names the checkpoint and the chunk: {err}"
    );
    assert!(
        !workload.is_alive(),
        "the restored process must never run on damaged state"
    );
}
