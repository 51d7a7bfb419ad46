//! `kybernatectl`: the command-line client of the agent.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use kybernate_proto::agent::v1 as pb;
use serde_json::json;

use crate::config::DEFAULT_SOCKET;
use crate::workload::{self, WorkloadSpec};
use kybernate_client as client;

/// Command-line client of the Kybernate node agent.
#[derive(Debug, Parser)]
#[command(name = "kybernatectl", version)]
pub struct Cli {
    /// The agent's socket.
    #[arg(long, env = "KYBERNATE_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// For people.
    Text,
    /// One JSON document, for scripts.
    Json,
}

/// The sub-commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Checkpoint a process tree (`--pid`) or a container (`--container`, through containerd
    /// and the kybernate shim).
    Checkpoint {
        /// Root PID of the tree.
        #[arg(
            long,
            required_unless_present = "container",
            conflicts_with = "container"
        )]
        pid: Option<i32>,
        /// containerd id of a container running under the kybernate runtime.
        #[arg(long)]
        container: Option<String>,
        /// containerd namespace of `--container` (`k8s.io` for Kubernetes pods).
        #[arg(long, requires = "container", default_value = "default")]
        namespace: String,
        /// Name of the checkpoint (generated when omitted).
        #[arg(long)]
        name: Option<String>,
        /// Keep the process running after the dump.
        #[arg(long)]
        leave_running: bool,
        /// Deadline of the dump in milliseconds (the configured one when omitted).
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Slowest tier (ram, nvme, s3) to store into before reporting done; slower tiers
        /// follow in the background. Default: nvme.
        #[arg(long)]
        tier: Option<String>,
    },
    /// Restore a checkpoint and print the restored PID.
    Restore {
        /// The checkpoint.
        name: String,
        /// Restore from this tier (ram, nvme, s3) instead of the nearest.
        #[arg(long)]
        from: Option<String>,
    },
    /// List checkpoints.
    List,
    /// Show one checkpoint.
    Inspect {
        /// The checkpoint.
        name: String,
    },
    /// Copy a checkpoint into a nearer tier ahead of a restore.
    Prefetch {
        /// The checkpoint.
        name: String,
        /// Target tier: ram or nvme.
        #[arg(long)]
        to: String,
    },
    /// Delete a checkpoint from every tier.
    Delete {
        /// The checkpoint.
        name: String,
    },
    /// Print progress events as they happen.
    Watch {
        /// Only this checkpoint's events.
        name: Option<String>,
    },
    /// Keep a checkpoint in a tier (copied there first): never demoted, counted in the budget.
    Pin {
        /// The checkpoint.
        name: String,
        /// ram or nvme.
        #[arg(long, default_value = "ram")]
        tier: String,
    },
    /// Remove a checkpoint's pin.
    Unpin {
        /// The checkpoint.
        name: String,
    },
    /// The agent's configuration.
    Config {
        /// What to do with it.
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Occupancy of every tier against its budget and watermarks.
    Tiers,
    /// Run the local demo: checkpoint a stateful process, kill it, restore it from NVMe.
    Demo {
        /// MiB of memory the demo workload holds.
        #[arg(long, default_value_t = 256)]
        mib: usize,
    },
    /// Run the sample workload (used by the demo, tests and benchmarks).
    #[command(hide = true)]
    Workload {
        /// MiB of patterned memory.
        #[arg(long, default_value_t = 64)]
        mib: usize,
        /// Extra counting threads.
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Status file.
        #[arg(long)]
        status: PathBuf,
        /// Journal file to append to.
        #[arg(long)]
        journal: Option<PathBuf>,
    },
}

/// `kybernatectl config` sub-commands.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// The effective config and where each value came from (default, file, flag).
    Show,
}

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
        return crate::cli_demo::run(&cli.socket, mib, cli.output).await;
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
            let reply = agent
                .checkpoint(pb::CheckpointRequest {
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
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_checkpoint(&reply, json);
        }
        Command::Restore { name, from } => {
            let reply = agent
                .restore(pb::RestoreRequest {
                    checkpoint_ref: name,
                    from_tier: from.unwrap_or_default(),
                    ..Default::default()
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_restore(&reply, json);
        }
        Command::List => {
            let reply = agent
                .list(pb::ListRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            print_list(&reply.checkpoints, json);
        }
        Command::Inspect { name } => {
            let info = agent
                .inspect(pb::InspectRequest {
                    checkpoint_ref: name,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                println!("{}", info_json(&info));
            } else {
                print_info(&info);
            }
        }
        Command::Prefetch { name, to } => {
            let reply = agent
                .prefetch(pb::PrefetchRequest {
                    checkpoint_ref: name.clone(),
                    to_tier: to.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
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
        Command::Delete { name } => {
            let reply = agent
                .delete(pb::DeleteRequest {
                    checkpoint_ref: name.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
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
            let mut stream = agent
                .watch_events(pb::WatchEventsRequest {
                    checkpoint_ref: name.unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
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
        | Command::Tiers) => crate::cli_policy::run(&mut agent, command, json).await?,
        Command::Demo { .. } | Command::Workload { .. } => unreachable!("handled above"),
    }
    Ok(())
}

/// The agent's message, without gRPC framing; or, when the connection broke before the
/// agent answered, what that means and what to run next.
pub fn status_error(status: tonic::Status) -> anyhow::Error {
    if connection_lost(&status) {
        return anyhow::anyhow!(
            "the agent closed the connection before answering ({}): it stopped or crashed \
             mid-request. The operation may have completed, or the agent recovers it when it \
             starts again: run `kybernatectl list` (or `kybernatectl inspect NAME`) once the \
             agent is back to see the checkpoint's state",
            status.message()
        );
    }
    anyhow::anyhow!("{}", status.message())
}

/// Whether `status` was made by the client because the connection failed, not sent by the
/// agent (the agent's own statuses carry no transport error as their source).
pub fn connection_lost(status: &tonic::Status) -> bool {
    use std::error::Error;
    let transport_code = matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::Cancelled
    );
    let message = status.message();
    let transport_text = [
        "transport error",
        "h2 protocol error",
        "connection closed",
        "error reading a body",
        "broken pipe",
    ]
    .iter()
    .any(|t| message.contains(t));
    transport_code && (status.source().is_some() || transport_text)
}

/// Phase durations as a JSON object of milliseconds.
pub fn phases_json(phases: &[pb::PhaseDuration]) -> serde_json::Value {
    let map: BTreeMap<&str, u64> = phases
        .iter()
        .map(|p| (p.phase.as_str(), p.millis))
        .collect();
    json!(map)
}

fn phases_text(phases: &[pb::PhaseDuration]) -> String {
    phases
        .iter()
        .map(|p| format!("{} {} ms", p.phase, p.millis))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_checkpoint(reply: &pb::CheckpointReply, json: bool) {
    if json {
        println!(
            "{}",
            json!({"name": reply.checkpoint_ref, "phases": phases_json(&reply.phases),
                   "raw_bytes": reply.raw_bytes, "stored_bytes": reply.stored_bytes,
                   "tiers": reply.tiers})
        );
    } else {
        println!("checkpoint {}", reply.checkpoint_ref);
        println!("  phases: {}", phases_text(&reply.phases));
        println!(
            "  size: {} raw, {} stored, tiers: {}",
            human_bytes(reply.raw_bytes),
            human_bytes(reply.stored_bytes),
            reply.tiers.join(", ")
        );
    }
}

fn print_restore(reply: &pb::RestoreReply, json: bool) {
    if json {
        println!(
            "{}",
            json!({"pid": reply.pid, "name": reply.checkpoint_ref,
                   "source_tier": reply.source_tier, "phases": phases_json(&reply.phases)})
        );
    } else {
        println!(
            "restored {} as PID {} from the {} tier",
            reply.checkpoint_ref, reply.pid, reply.source_tier
        );
        println!("  phases: {}", phases_text(&reply.phases));
    }
}

fn info_json(info: &pb::CheckpointInfo) -> serde_json::Value {
    json!({"name": info.checkpoint_ref, "pid": info.pid, "created_unix": info.created_unix,
           "leave_running": info.leave_running, "phases": phases_json(&info.phases),
           "raw_bytes": info.raw_bytes, "stored_bytes": info.stored_bytes,
           "tiers": info.tiers, "state": info.state, "note": info.note})
}

fn print_list(infos: &[pb::CheckpointInfo], json: bool) {
    if json {
        let all: Vec<_> = infos.iter().map(info_json).collect();
        println!("{}", serde_json::Value::Array(all));
        return;
    }
    println!(
        "{:<32} {:>8} {:>10} {:>10} {:<12} STATE",
        "NAME", "PID", "RAW", "STORED", "TIERS"
    );
    for info in infos {
        println!(
            "{:<32} {:>8} {:>10} {:>10} {:<12} {}",
            info.checkpoint_ref,
            info.pid,
            human_bytes(info.raw_bytes),
            human_bytes(info.stored_bytes),
            info.tiers.join(","),
            info.state
        );
        if !info.note.is_empty() {
            println!("  note: {}", info.note);
        }
    }
}

fn print_info(info: &pb::CheckpointInfo) {
    println!("name:          {}", info.checkpoint_ref);
    println!("pid:           {}", info.pid);
    println!("created:       {} (unix)", info.created_unix);
    println!("leave running: {}", info.leave_running);
    println!("raw size:      {}", human_bytes(info.raw_bytes));
    println!("stored:        {}", human_bytes(info.stored_bytes));
    println!("tiers:         {}", info.tiers.join(", "));
    println!("workload:      {}", info.state);
    if !info.note.is_empty() {
        println!("note:          {}", info.note);
    }
    println!("phases:        {}", phases_text(&info.phases));
}

/// Bytes in binary units, for people.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
