//! Target `config`: the agent's config file (TOML parse, then validation).

use std::path::Path;

use kybernate_agent::config::AgentConfig;

use crate::Verdict;

/// An accepted config must validate again and give every derived value without a panic:
/// the tier paths, the shim lease, the chunking (the very chunk size the file asked for) and
/// the watermarks of any budget.
pub fn config(data: &[u8]) -> Verdict {
    supply_s3_secret();
    let Ok(text) = std::str::from_utf8(data) else {
        return Verdict::Rejected("not UTF-8".to_owned());
    };
    let config = match AgentConfig::from_text(Path::new("/etc/kybernate/agent.toml"), text) {
        Ok(config) => config,
        Err(e) => return Verdict::Rejected(e.to_string()),
    };
    config
        .validate()
        .expect("an accepted config validates again");
    assert!(config.ram_tier_path().is_absolute());
    assert!(config.nvme_tier_path().is_absolute());
    assert!(config.records_dir().starts_with(&config.state_dir));
    let _ = config.timeouts.shim_lease();
    let chunks = config.dataplane.chunk_config();
    chunks
        .validate()
        .expect("an accepted config chunks validly");
    assert_eq!(
        Some(chunks.chunk_size),
        config.dataplane.chunk_size_mib.checked_mul(1 << 20),
        "dataplane.chunk_size_mib = {} was taken as {} bytes",
        config.dataplane.chunk_size_mib,
        chunks.chunk_size
    );
    for budget in [
        0,
        1,
        u64::MAX,
        config.tiers.nvme_budget_bytes.unwrap_or(1 << 40),
    ] {
        for policy in [&config.tiers.ram, &config.tiers.nvme] {
            let (high, low) = policy.watermarks(budget);
            assert!(
                low <= high && high <= budget,
                "watermarks {high}/{low} of {budget}"
            );
        }
    }
    Verdict::Accepted
}

/// In a cluster the S3 secret comes from the environment (a Secret), never from the file. The
/// target supplies a dummy one so that the S3 checks behind the secret are reached too.
fn supply_s3_secret() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var("AWS_SECRET_ACCESS_KEY", "fuzz-dummy-secret"));
}
