//! The tier policy through the real agent: live reload of the config file (also by a
//! kubelet-style symlink swap), invalid edits, pins, demotion when a budget is lowered, and
//! bandwidth limits on a real S3 server.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{eventually, pid_of, S3Server, TestAgent, Workload};

const MIB: u64 = 1 << 20;

fn config_path(agent: &TestAgent) -> std::path::PathBuf {
    agent.dir.path().join("agent.toml")
}

fn tiers_of(agent: &TestAgent, name: &str) -> serde_json::Value {
    agent.ctl_json(&["inspect", name])["tiers"].clone()
}

/// The `tiers` entry of `tier`.
fn tier_status(agent: &TestAgent, tier: &str) -> serde_json::Value {
    agent
        .ctl_json(&["tiers"])
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tier"] == tier)
        .cloned()
        .unwrap_or_else(|| panic!("no {tier} tier in `kybernatectl tiers`"))
}

/// The `config show` entry of `key`.
fn config_value(agent: &TestAgent, key: &str) -> serde_json::Value {
    agent.ctl_json(&["config", "show"])["values"][key].clone()
}

fn metric_has(agent: &TestAgent, line: &str) -> bool {
    agent.metrics().lines().any(|l| l == line)
}

fn checkpoint(agent: &TestAgent, workload: &Workload, name: &str, tier: &str) {
    agent.ctl_json(&[
        "checkpoint",
        "--pid",
        &workload.pid.to_string(),
        "--name",
        name,
        "--tier",
        tier,
    ]);
}

#[test]
fn config_change_under_a_running_checkpoint_applies_new_budgets() {
    let agent = TestAgent::start_with_config("[tiers]\nram_budget_bytes = 1073741824\n");
    assert_eq!(tier_status(&agent, "ram")["budget_bytes"], 1024 * MIB);
    assert_eq!(
        config_value(&agent, "tiers.ram_budget_bytes"),
        json!({"value": "1073741824", "source": "file", "pending": ""})
    );
    assert_eq!(
        config_value(&agent, "tiers.ram.high_watermark_percent")["source"],
        "default"
    );
    assert_eq!(config_value(&agent, "state_dir")["source"], "flag");

    let mut workload = Workload::start(agent.dir.path(), 128, &[]);
    std::thread::scope(|scope| {
        let running = scope.spawn(|| checkpoint(&agent, &workload, "busy", "nvme"));
        eventually("the checkpoint is under way", || {
            agent.ram_dir("busy").exists()
        });
        std::fs::write(
            config_path(&agent),
            "[tiers]\nram_budget_bytes = 536870912\n[tiers.ram]\nhigh_watermark_percent = 80\nlow_watermark_percent = 50\n",
        )
        .unwrap();
        running.join().expect("the checkpoint completes");
    });
    eventually("the new RAM budget applies", || {
        tier_status(&agent, "ram")["budget_bytes"] == 512 * MIB
    });
    let ram = tier_status(&agent, "ram");
    assert_eq!(ram["high_watermark_bytes"], 512 * MIB * 80 / 100, "{ram}");
    assert_eq!(ram["low_watermark_bytes"], 256 * MIB, "{ram}");
    assert!(
        metric_has(
            &agent,
            "kybernate_tier_budget_bytes{tier=\"ram\"} 536870912"
        ),
        "{}",
        agent.metrics()
    );
    assert!(metric_has(
        &agent,
        "kybernate_config_reloads_total{result=\"applied\"} 1"
    ));
    assert_eq!(
        config_value(&agent, "tiers.ram.low_watermark_percent")["source"],
        "file"
    );

    workload.reap_dumped();
    let at_dump = workload.read().unwrap();
    let restored = agent.ctl_json(&["restore", "busy"]);
    workload.restored_as(pid_of(&restored));
    assert_eq!(workload.wait_for(|_| true).epoch, at_dump.epoch);
    assert!(workload.verify_memory().memory_ok);
}

#[test]
fn invalid_edits_are_rejected_and_the_agent_keeps_serving() {
    let agent = TestAgent::start_with_config("[tiers]\nram_budget_bytes = 104857600\n");
    let edits = [
        (
            "[tiers]\nram_budget_bytes = -1\n",
            "`ram_budget_bytes = -1`",
        ),
        ("[tiers.tape]\nmax_age_secs = 60\n", "unknown field `tape`"),
        (
            "[tiers]\nram_budget_bytes = 104857600\n[tiers.ram]\nhigh_watermark_percent = 150\n",
            "tiers.ram.high_watermark_percent: 150% is above the budget",
        ),
        ("[tiers\nram_budget_bytes = 1\n", "line 1 (`[tiers`)"),
    ];
    for (i, (text, names)) in edits.iter().enumerate() {
        std::fs::write(config_path(&agent), text).unwrap();
        let count = format!(
            "kybernate_config_reloads_total{{result=\"rejected\"}} {}",
            i + 1
        );
        eventually(&format!("the edit {text:?} is rejected"), || {
            metric_has(&agent, &count)
        });
        let log = agent.log();
        let line = log
            .lines()
            .rfind(|l| l.contains("config change rejected"))
            .unwrap_or_else(|| panic!("no rejection logged:\n{log}"));
        assert!(line.contains(names), "{line}");
        let shown = agent.ctl_json(&["config", "show"]);
        assert!(
            shown["last_error"].as_str().unwrap().contains(names),
            "{shown}"
        );
        assert_eq!(
            shown["values"]["tiers.ram_budget_bytes"]["value"], "104857600",
            "the old config stays"
        );
        assert_eq!(tier_status(&agent, "ram")["budget_bytes"], 100 * MIB);
        agent.assert_serving();
    }

    std::fs::write(
        config_path(&agent),
        "[tiers]\nram_budget_bytes = 209715200\n",
    )
    .unwrap();
    eventually("a valid edit applies after the rejected ones", || {
        tier_status(&agent, "ram")["budget_bytes"] == 200 * MIB
    });
    assert_eq!(
        agent.ctl_json(&["config", "show"])["last_error"],
        "",
        "the file is in effect again"
    );
}

#[test]
fn lowering_the_ram_budget_demotes_lru_keeps_pins_and_loses_nothing() {
    let agent = TestAgent::start();
    let mut taken = Vec::new();
    for name in ["pinned", "older", "newer"] {
        let mut workload = Workload::start(agent.dir.path(), 16, &[]);
        checkpoint(&agent, &workload, name, "ram");
        workload.reap_dumped();
        taken.push((name, workload.read().unwrap().epoch, workload));
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    for (name, _, _) in &taken {
        eventually("the background drain reaches NVMe", || {
            tiers_of(&agent, name) == json!(["ram", "nvme"])
        });
    }
    let pinned = agent.ctl_json(&["pin", "pinned", "--tier", "ram"]);
    assert_eq!(pinned["from"], "", "RAM already held it");
    let err = agent.ctl_err(&["pin", "older", "--tier", "s3"]);
    assert!(err.contains("a pin keeps a copy in ram or nvme"), "{err}");
    let ram = tier_status(&agent, "ram");
    assert_eq!(ram["pinned"], json!(["pinned"]), "{ram}");
    assert_eq!(ram["checkpoints"], 3, "{ram}");

    // Each 16 MiB workload dumps to ~17 MiB: 40 MiB with the default watermarks (100% / 90%)
    // holds two of the three, and the pinned one is not a candidate.
    std::fs::write(
        config_path(&agent),
        "[tiers]\nram_budget_bytes = 41943040\n",
    )
    .unwrap();
    eventually(
        "the least recently used unpinned checkpoint leaves RAM",
        || tiers_of(&agent, "older") == json!(["nvme"]),
    );
    assert_eq!(tiers_of(&agent, "pinned"), json!(["ram", "nvme"]));
    assert_eq!(tiers_of(&agent, "newer"), json!(["ram", "nvme"]));
    let ram = tier_status(&agent, "ram");
    assert!(
        ram["used_bytes"].as_u64().unwrap() <= 40 * MIB,
        "within the budget: {ram}"
    );
    assert!(ram["pinned_bytes"].as_u64().unwrap() > 16 * MIB, "{ram}");

    // Unpinned, the pinned one is now the least recently used... but the tier already fits.
    assert_eq!(agent.ctl_json(&["unpin", "pinned"])["was_pinned_to"], "ram");
    for (name, epoch, workload) in &mut taken {
        let restored = agent.ctl_json(&["restore", name]);
        workload.restored_as(pid_of(&restored));
        assert_eq!(
            workload.wait_for(|_| true).epoch,
            *epoch,
            "{name} restored intact"
        );
        assert!(workload.verify_memory().memory_ok, "{name}");
    }
}

/// Replaces `link` atomically with a symlink to `target`, as kubelet swaps `..data`.
fn swap_symlink(dir: &Path, link: &str, target: &str) {
    let tmp = dir.join(format!("{link}_tmp"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join(link)).unwrap();
}

#[test]
fn kubelet_symlink_swap_is_picked_up() {
    let agent = TestAgent::start();
    let dir = agent.dir.path();
    // The layout of a mounted ConfigMap: agent.toml -> ..data/agent.toml, ..data -> ..<ts>.
    std::fs::create_dir(dir.join("..2026_11_22_a")).unwrap();
    std::fs::write(
        dir.join("..2026_11_22_a/agent.toml"),
        "[tiers]\nram_budget_bytes = 314572800\n",
    )
    .unwrap();
    swap_symlink(dir, "..data", "..2026_11_22_a");
    swap_symlink(dir, "agent.toml", "..data/agent.toml");
    eventually("the first ConfigMap version applies", || {
        tier_status(&agent, "ram")["budget_bytes"] == 300 * MIB
    });

    std::fs::create_dir(dir.join("..2026_11_22_b")).unwrap();
    std::fs::write(
        dir.join("..2026_11_22_b/agent.toml"),
        "[tiers]\nram_budget_bytes = 419430400\n[policy]\nrestore_prefetch_tier = \"nvme\"\n",
    )
    .unwrap();
    swap_symlink(dir, "..data", "..2026_11_22_b");
    std::fs::remove_dir_all(dir.join("..2026_11_22_a")).unwrap();
    eventually("the swapped ConfigMap version applies", || {
        tier_status(&agent, "ram")["budget_bytes"] == 400 * MIB
    });
    assert_eq!(
        config_value(&agent, "policy.restore_prefetch_tier"),
        json!({"value": "\"nvme\"", "source": "file", "pending": ""})
    );
    assert!(metric_has(
        &agent,
        "kybernate_config_reloads_total{result=\"applied\"} 2"
    ));
    let text = agent.ctl(&["tiers"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("400.0 MiB"), "{text}");
}

/// The value of the metric series `series` (name and labels), 0 when the agent has none.
fn metric_value(agent: &TestAgent, series: &str) -> f64 {
    agent
        .metrics()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Bytes of the pack objects the S3 server holds.
fn pack_bytes(s3: &S3Server) -> u64 {
    let dir = s3.dir.path().join(support::S3_BUCKET).join("node-a/packs");
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.metadata().unwrap().len()).sum())
        .unwrap_or(0)
}

#[test]
fn an_s3_upload_limit_holds_within_15_percent_over_a_10_s_background_drain() {
    const LIMIT: u64 = 4_000_000;
    const THROTTLED: &str = "kybernate_throttled_seconds_total{limit=\"s3_upload\"}";
    let s3 = S3Server::start();
    let config = format!(
        "{}\n[bandwidth]\ns3_upload_bytes_per_sec = {LIMIT}\n",
        s3.agent_config()
    );
    let agent = TestAgent::start_with(&config, &S3Server::credentials());
    assert_eq!(
        config_value(&agent, "bandwidth.s3_upload_bytes_per_sec"),
        json!({"value": LIMIT.to_string(), "source": "file", "pending": ""})
    );
    assert!(metric_has(
        &agent,
        &format!("kybernate_bandwidth_limit_bytes_per_second{{limit=\"s3_upload\"}} {LIMIT}")
    ));

    // A checkpoint that asked for S3 waits for its upload: foreground work is not limited.
    let urgent = Workload::start(agent.dir.path(), 8, &[]);
    checkpoint(&agent, &urgent, "urgent", "s3");
    assert_eq!(metric_value(&agent, THROTTLED), 0.0);

    // 40 MiB of incompressible memory, done at NVMe, then drained to S3 in the background.
    let workload = Workload::start(agent.dir.path(), 40, &[]);
    let before = pack_bytes(&s3);
    checkpoint(&agent, &workload, "background", "nvme");
    let started = Instant::now();
    let manifest = s3
        .dir
        .path()
        .join(support::S3_BUCKET)
        .join("node-a/manifests/background");
    while !manifest.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the background drain never reached S3: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = started.elapsed().as_secs_f64();
    let uploaded = pack_bytes(&s3) - before;
    let rate = uploaded as f64 / took;
    let limit = LIMIT as f64;
    println!("{uploaded} bytes in {took:.2} s = {rate:.0} B/s against a limit of {LIMIT} B/s");
    assert!(
        took >= 8.0,
        "{uploaded} bytes took {took:.2} s: the drain must last about 10 s to judge the limit"
    );
    assert!(
        (rate - limit).abs() <= 0.15 * limit,
        "{uploaded} bytes in {took:.2} s = {rate:.0} B/s, limit {LIMIT} B/s (±15%)"
    );
    assert!(metric_value(&agent, THROTTLED) > 0.0);

    // A live edit lifts the limit for new work.
    std::fs::write(config_path(&agent), s3.agent_config()).unwrap();
    eventually("the agent applies the edit", || {
        metric_has(
            &agent,
            "kybernate_bandwidth_limit_bytes_per_second{limit=\"s3_upload\"} 0",
        )
    });
}
