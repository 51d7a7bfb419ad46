//! What `kybernatectl` accepts: its command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use kybernate_client::DEFAULT_AGENT_SOCKET;

/// Command-line client of the Kybernate node agent.
#[derive(Debug, Parser)]
#[command(name = "kybernatectl", version)]
pub struct Cli {
    /// The agent's socket.
    #[arg(long, env = "KYBERNATE_SOCKET", default_value = DEFAULT_AGENT_SOCKET)]
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
    /// Seal a checkpoint on the NVMe tier with the newest encryption key (after adding a
    /// key, or to encrypt one stored before encryption was on); its old chunks go only once
    /// the new copy is committed.
    Reencrypt {
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
