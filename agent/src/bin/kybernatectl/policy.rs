//! `kybernatectl pin`, `unpin`, `config show` and `tiers`: the tier policy seen from the CLI.

use kybernate_proto::agent::v1 as pb;
use kybernate_proto::agent::v1::agent_client::AgentClient;
use serde_json::json;
use tonic::transport::Channel;

use crate::args::{Command, ConfigCommand};
use crate::output::{answer, human_bytes, phases_json};

/// Runs one of the policy commands against `agent`.
pub async fn run(
    agent: &mut AgentClient<Channel>,
    command: Command,
    json: bool,
) -> anyhow::Result<()> {
    match command {
        Command::Pin { name, tier } => {
            let reply = answer(agent.pin(pb::PinRequest {
                checkpoint_ref: name.clone(),
                tier: tier.clone(),
            }))
            .await?;
            if json {
                println!(
                    "{}",
                    json!({"name": name, "tier": tier, "from": reply.from_tier,
                           "phases": phases_json(&reply.phases)})
                );
            } else if reply.from_tier.is_empty() {
                println!("pinned {name} in the {tier} tier");
            } else {
                println!(
                    "pinned {name} in the {tier} tier (copied from {})",
                    reply.from_tier
                );
            }
        }
        Command::Unpin { name } => {
            let reply = answer(agent.unpin(pb::UnpinRequest {
                checkpoint_ref: name.clone(),
            }))
            .await?;
            if json {
                println!("{}", json!({"name": name, "was_pinned_to": reply.tier}));
            } else if reply.tier.is_empty() {
                println!("{name} was not pinned");
            } else {
                println!("unpinned {name} from the {} tier", reply.tier);
            }
        }
        Command::Config {
            command: ConfigCommand::Show,
        } => {
            let reply = answer(agent.config_show(pb::ConfigShowRequest {})).await?;
            print_config(&reply, json);
        }
        Command::Tiers => {
            let reply = answer(agent.tier_status(pb::TierStatusRequest {})).await?;
            print_tiers(&reply.tiers, json);
        }
        other => anyhow::bail!("not a policy command: {other:?}"),
    }
    Ok(())
}

fn print_config(reply: &pb::ConfigShowReply, json: bool) {
    if json {
        let values: serde_json::Map<String, serde_json::Value> = reply
            .values
            .iter()
            .map(|v| {
                (
                    v.key.clone(),
                    json!({"value": v.value, "source": v.source, "pending": v.pending}),
                )
            })
            .collect();
        println!(
            "{}",
            json!({"path": reply.path, "values": values,
                   "reloads_applied": reply.reloads_applied,
                   "reloads_rejected": reply.reloads_rejected,
                   "last_error": reply.last_error})
        );
        return;
    }
    let path = if reply.path.is_empty() {
        "(none: built-in defaults)"
    } else {
        reply.path.as_str()
    };
    println!("# config file: {path}");
    println!(
        "# reloads: {} applied, {} rejected",
        reply.reloads_applied, reply.reloads_rejected
    );
    if !reply.last_error.is_empty() {
        println!("# last change rejected: {}", reply.last_error);
    }
    for v in &reply.values {
        let pending = if v.pending.is_empty() {
            String::new()
        } else {
            format!(" (file says {}: needs a restart)", v.pending)
        };
        println!("{} = {}  # {}{pending}", v.key, v.value, v.source);
    }
}

fn limit(bytes: u64) -> String {
    if bytes == 0 {
        "-".into()
    } else {
        human_bytes(bytes)
    }
}

fn print_tiers(tiers: &[pb::TierStatus], json: bool) {
    if json {
        let all: Vec<_> = tiers
            .iter()
            .map(|t| {
                json!({"tier": t.tier, "used_bytes": t.used_bytes, "budget_bytes": t.budget_bytes,
                       "high_watermark_bytes": t.high_watermark_bytes,
                       "low_watermark_bytes": t.low_watermark_bytes,
                       "max_age_secs": t.max_age_secs, "pinned_bytes": t.pinned_bytes,
                       "checkpoints": t.checkpoints, "pinned": t.pinned})
            })
            .collect();
        println!("{}", serde_json::Value::Array(all));
        return;
    }
    println!(
        "{:<6} {:>10} {:>10} {:>6} {:>10} {:>10} {:>8} {:>10} {:>6}",
        "TIER", "USED", "BUDGET", "USE%", "HIGH", "LOW", "MAX AGE", "PINNED", "COUNT"
    );
    for t in tiers {
        let share = if t.budget_bytes == 0 {
            "-".into()
        } else {
            format!(
                "{:.0}%",
                t.used_bytes as f64 * 100.0 / t.budget_bytes as f64
            )
        };
        let age = if t.max_age_secs == 0 {
            "-".into()
        } else {
            format!("{}s", t.max_age_secs)
        };
        println!(
            "{:<6} {:>10} {:>10} {:>6} {:>10} {:>10} {:>8} {:>10} {:>6}",
            t.tier,
            human_bytes(t.used_bytes),
            limit(t.budget_bytes),
            share,
            limit(t.high_watermark_bytes),
            limit(t.low_watermark_bytes),
            age,
            human_bytes(t.pinned_bytes),
            t.checkpoints
        );
    }
}
