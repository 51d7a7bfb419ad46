//! `kybernatectl`: runs a command against the agent.

use kybernate_proto::agent::v1 as pb;

use crate::args::{Cli, Command, OutputFormat};
use crate::output::{
    answer, info_json, phases_json, phases_text, print_checkpoint, print_info, print_list,
    print_restore, status_error,
};
use kybernate_client as client;
use kybernate_sample_workload::{self as workload, WorkloadSpec};
use serde_json::json;

/// Runs the CLI; the error is printed by `main` as one line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Workload {
        mib,
        threads,
        status,
        journal,
    } = &cli.command
    {
        return Ok(workload::run(&WorkloadSpec {
            mib: *mib,
            threads: *threads,
            status: status.clone(),
            journal: journal.clone(),
        })?);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(cli))
}

async fn run_async(cli: Cli) -> anyhow::Result<()> {
    if let Command::Demo { mib } = cli.command {
        return crate::demo::run(&cli.socket, mib, cli.output).await;
    }
    let mut agent = client::connect_agent(&cli.socket).await?;
    let json = cli.output == OutputFormat::Json;
    match cli.command {
        Command::Checkpoint {
            pid,
            container,
            namespace,
            name,
            leave_running,
            timeout_ms,
            tier,
        } => {
            let reply = answer(agent.checkpoint(pb::CheckpointRequest {
                name: name.unwrap_or_default(),
                pid: pid.unwrap_or_default(),
                containerd_namespace: if container.is_some() {
                    namespace
                } else {
                    String::new()
                },
                container_id: container.unwrap_or_default(),
                leave_running,
                timeout_ms: timeout_ms.unwrap_or(0),
                tier: tier.unwrap_or_default(),
                ..Default::default()
            }))
            .await?;
            print_checkpoint(&reply, json);
        }
        Command::Restore { name, from } => {
            let reply = answer(agent.restore(pb::RestoreRequest {
                checkpoint_ref: name,
                from_tier: from.unwrap_or_default(),
                ..Default::default()
            }))
            .await?;
            print_restore(&reply, json);
        }
        Command::List => {
            let reply = answer(agent.list(pb::ListRequest {})).await?;
            print_list(&reply.checkpoints, json);
        }
        Command::Inspect { name } => {
            let info = answer(agent.inspect(pb::InspectRequest {
                checkpoint_ref: name,
            }))
            .await?;
            if json {
                println!("{}", info_json(&info));
            } else {
                print_info(&info);
            }
        }
        Command::Prefetch { name, to } => {
            let reply = answer(agent.prefetch(pb::PrefetchRequest {
                checkpoint_ref: name.clone(),
                to_tier: to.clone(),
            }))
            .await?;
            if json {
                println!(
                    "{}",
                    json!({"name": name, "to": to, "from": reply.from_tier, "phases": phases_json(&reply.phases)})
                );
            } else if reply.from_tier.is_empty() {
                println!("{name} is already in the {to} tier");
            } else {
                println!(
                    "copied {name} from {} to {to}: {}",
                    reply.from_tier,
                    phases_text(&reply.phases)
                );
            }
        }
        Command::Reencrypt { name } => {
            let reply = answer(agent.reencrypt(pb::ReencryptRequest {
                checkpoint_ref: name.clone(),
            }))
            .await?;
            let from = if reply.from_key.is_empty() {
                "unencrypted".to_owned()
            } else {
                format!("key {}", reply.from_key)
            };
            if json {
                println!(
                    "{}",
                    json!({"name": name, "from_key": reply.from_key, "to_key": reply.to_key, "unchanged": reply.unchanged})
                );
            } else if reply.unchanged {
                println!("{name} is already sealed with key {}", reply.to_key);
            } else {
                println!("re-encrypted {name} from {from} to key {}", reply.to_key);
            }
        }
        Command::Delete { name } => {
            let reply = answer(agent.delete(pb::DeleteRequest {
                checkpoint_ref: name.clone(),
            }))
            .await?;
            if json {
                println!(
                    "{}",
                    json!({"name": name, "removed_from": reply.removed_from})
                );
            } else {
                println!("deleted {name} from {}", reply.removed_from.join(", "));
            }
        }
        Command::Watch { name } => {
            let mut stream = answer(agent.watch_events(pb::WatchEventsRequest {
                checkpoint_ref: name.unwrap_or_default(),
            }))
            .await?;
            while let Some(event) = stream.message().await.map_err(status_error)? {
                if json {
                    println!(
                        "{}",
                        json!({"name": event.checkpoint_ref, "operation": event.operation,
                               "phase": event.phase, "status": event.status,
                               "millis": event.millis, "message": event.message})
                    );
                } else {
                    println!(
                        "{} {} {} {} {} ms {}",
                        event.checkpoint_ref,
                        event.operation,
                        event.phase,
                        event.status,
                        event.millis,
                        event.message
                    );
                }
            }
        }
        command @ (Command::Pin { .. }
        | Command::Unpin { .. }
        | Command::Config { .. }
        | Command::Tiers) => crate::policy::run(&mut agent, command, json).await?,
        Command::Demo { .. } | Command::Workload { .. } => unreachable!("handled above"),
    }
    Ok(())
}
