//! `kybernatectl demo`: the local checkpoint → kill → restore walk-through on real CRIU.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kybernate_proto::agent::v1 as pb;
use serde_json::json;

use crate::args::OutputFormat;
use crate::output::{answer, human_bytes, phases_json};
use kybernate_client as client;
use kybernate_sample_workload::Status;

/// How long the demo waits for any single thing before it gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// A child process that is killed and reaped when dropped.
struct Reaped(Option<Child>);

impl Reaped {
    fn pid(&self) -> i32 {
        self.0
            .as_ref()
            .and_then(|c| i32::try_from(c.id()).ok())
            .unwrap_or(0)
    }

    /// Reaps a child that has already been stopped by a dump.
    fn wait(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.wait();
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        // A graceful stop first, so an agent removes its socket.
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: kill(2) with a valid signal to our own child.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A restored process (not our child) that is killed when the demo ends.
struct Restored(i32);

impl Drop for Restored {
    fn drop(&mut self) {
        // SAFETY: kill(2) with a valid signal; the PID is the one the agent restored.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
        }
    }
}

/// Runs the demo against the agent at `socket`, starting one when none answers.
pub async fn run(socket: &Path, mib: usize, output: OutputFormat) -> anyhow::Result<()> {
    let text = output == OutputFormat::Text;
    let say = |line: String| {
        if text {
            println!("{line}");
        }
    };
    say(
        "Kybernate demo: checkpoint a stateful process, kill it, restore it from the NVMe tier"
            .into(),
    );
    let (mut agent, _own_agent) = match client::connect_agent(socket).await {
        Ok(agent) => {
            say(format!(
                "  agent      using the running agent at {}",
                socket.display()
            ));
            (agent, None)
        }
        Err(_) => {
            let started = start_agent(socket)?;
            say(format!(
                "  agent      started a local agent (PID {}) on {}",
                started.pid(),
                socket.display()
            ));
            (wait_for_agent(socket).await?, Some(started))
        }
    };

    let work_dir = std::env::temp_dir().join(format!("kybernate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&work_dir)?;
    let status_path = work_dir.join("status");
    let mut workload = start_workload(mib, &status_path)?;
    let pid = workload.pid();
    let before = wait_for_status(&status_path, |s| s.counter >= 10).await?;
    say(format!(
        "  workload   PID {pid} holds {mib} MiB of patterned memory and counts (status file {})",
        status_path.display()
    ));

    let name = format!("demo-{}-{pid}", std::process::id());
    let reply = answer(agent.checkpoint(pb::CheckpointRequest {
        name: name.clone(),
        pid,
        ..Default::default()
    }))
    .await
    .context("checkpoint failed")?;
    workload.wait();
    let at_dump = Status::read(&status_path).context("no status after the dump")?;
    let freeze = phase(&reply.phases, "criu_dump");
    say(format!(
        "  checkpoint {name}: froze the workload for {freeze} ms (CRIU dump), {} of images, stored in {}",
        human_bytes(reply.raw_bytes),
        reply.tiers.join(" + ")
    ));
    say(format!(
        "             phases: {}",
        phase_list(&reply.phases)
    ));
    say(format!(
        "  killed     the workload stopped at counter {} and is gone",
        at_dump.counter
    ));

    let restored = answer(agent.restore(pb::RestoreRequest {
        checkpoint_ref: name.clone(),
        from_tier: "nvme".into(),
        ..Default::default()
    }))
    .await
    .context("restore failed")?;
    let _restored_guard = Restored(restored.pid);
    say(format!(
        "  restore    from the {} tier as PID {}: {}",
        restored.source_tier,
        restored.pid,
        phase_list(&restored.phases)
    ));

    let moving = wait_for_status(&status_path, |s| s.counter > at_dump.counter + 10).await?;
    // SAFETY: kill(2) with a valid signal to the restored workload.
    unsafe {
        libc::kill(restored.pid, libc::SIGUSR1);
    }
    let checked = wait_for_status(&status_path, |s| s.verified > moving.verified).await?;
    let continued =
        checked.epoch == before.epoch && checked.counter > at_dump.counter && checked.memory_ok;
    say(format!(
        "  state      epoch {:016x} {}, counter {} → {}, memory {}",
        checked.epoch,
        if checked.epoch == before.epoch {
            "unchanged (same process state)"
        } else {
            "CHANGED (fresh process)"
        },
        at_dump.counter,
        checked.counter,
        if checked.memory_ok {
            format!("verified: all {mib} MiB intact")
        } else {
            "CORRUPT".into()
        }
    ));

    let _ = agent
        .delete(pb::DeleteRequest {
            checkpoint_ref: name.clone(),
        })
        .await;
    let _ = std::fs::remove_dir_all(&work_dir);
    if output == OutputFormat::Json {
        println!(
            "{}",
            json!({"name": name, "pid": restored.pid, "continued": continued,
                   "counter_at_dump": at_dump.counter, "counter_after_restore": checked.counter,
                   "raw_bytes": reply.raw_bytes, "checkpoint_phases": phases_json(&reply.phases),
                   "restore_phases": phases_json(&restored.phases), "source_tier": restored.source_tier})
        );
    }
    if !continued {
        bail!("the restored workload did not continue from its checkpoint");
    }
    say("  result     OK: the workload continued from its checkpoint".into());
    Ok(())
}

fn phase(phases: &[pb::PhaseDuration], name: &str) -> u64 {
    phases
        .iter()
        .find(|p| p.phase == name)
        .map_or(0, |p| p.millis)
}

fn phase_list(phases: &[pb::PhaseDuration]) -> String {
    phases
        .iter()
        .map(|p| format!("{} {} ms", p.phase, p.millis))
        .collect::<Vec<_>>()
        .join(", ")
}

fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find kybernatectl's own path")?;
    Ok(me.with_file_name(name))
}

fn start_agent(socket: &Path) -> anyhow::Result<Reaped> {
    let binary = sibling_binary("kybernate-agent")?;
    let log = std::env::temp_dir().join("kybernate-demo-agent.log");
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let child = Command::new(&binary)
        .arg("--socket")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    Ok(Reaped(Some(child)))
}

async fn wait_for_agent(
    socket: &Path,
) -> anyhow::Result<kybernate_proto::agent::v1::agent_client::AgentClient<tonic::transport::Channel>>
{
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        match client::connect_agent(socket).await {
            Ok(agent) => return Ok(agent),
            Err(e) if Instant::now() >= deadline => {
                bail!(
                    "{e} (agent log: {})",
                    std::env::temp_dir()
                        .join("kybernate-demo-agent.log")
                        .display()
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn start_workload(mib: usize, status: &Path) -> anyhow::Result<Reaped> {
    let me = std::env::current_exe()?;
    let mut command = Command::new(me);
    command
        .args(["workload", "--mib", &mib.to_string(), "--status"])
        .arg(status)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid() is async-signal-safe; the workload leads its own session so CRIU can
    // dump it without --shell-job.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(Reaped(Some(
        command.spawn().context("cannot start the demo workload")?,
    )))
}

async fn wait_for_status(path: &Path, ready: impl Fn(&Status) -> bool) -> anyhow::Result<Status> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        if let Some(status) = Status::read(path) {
            if ready(&status) {
                return Ok(status);
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "the workload's status file {} did not show the expected progress",
                path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
