//! What the agent does when a shim's lease ([`super::shim_lease`]) runs out before its End.
//! It settles the operation the way the End, or recovery after a crash, would have, and
//! never deletes what may be the workload's only copy:
//! - a dump the shim's `runc` (and its CRIU) still writes is waited for, up to the dump
//!   timeout, as recovery waits for a CRIU a dead agent left;
//! - a complete dump (CRIU's `inventory.img` written) whose workload has ended, or that left
//!   it running, is finished as the End would have: GPUs given back, images committed,
//!   digested and stored, the checkpoint recorded with a note saying why;
//! - an incomplete dump whose workload still runs is dropped, its GPUs resumed and its
//!   processes sent SIGCONT in case a cut-off dump left them stopped;
//! - an incomplete dump whose workload has ended is kept and listed as `incomplete` (its
//!   journal entry stays open, so the next agent start lists it too);
//! - a staged restore's images are dropped.
//!
//! Each outcome is journaled and logged, and `kybernatectl watch` gets a `lease` phase event
//! with status `expired` saying why; then the name is free again.

use actix::prelude::*;
use kybernate_dataplane::TierKind;

use super::container_checkpoint::{finish, ShimCheckpoint};
use super::shim_lease::{expiry_reason, CheckpointLeaseExpired, RestoreLeaseExpired};
use super::NodeAgent;
use crate::blocking_work::blocking;
use crate::catalog::CheckpointRecord;
use crate::checkpoint_machine::Step;
use crate::config::TimeoutsConfig;
use crate::error::AgentError;
use crate::events::PhaseClock;
use crate::journal::Transition;
use crate::node_parts::NodeParts;
use crate::process;
use crate::recovery::{self, Leftover, LeftoverKind};

/// How an expired checkpoint was settled.
#[derive(Debug)]
enum Settled {
    /// The dump was complete: it is a checkpoint now, stored up to `until`.
    Recorded {
        record: Box<CheckpointRecord>,
        until: TierKind,
    },
    /// No checkpoint: GPUs given back, partial images dropped.
    RolledBack,
    /// An incomplete dump of a workload that has ended, kept and listed.
    Incomplete(Leftover),
}

impl Handler<CheckpointLeaseExpired> for NodeAgent {
    type Result = ();

    fn handle(&mut self, msg: CheckpointLeaseExpired, ctx: &mut Self::Context) {
        let current = self
            .shim_checkpoints
            .get(&msg.name)
            .is_some_and(|s| s.lease == msg.lease);
        if !current {
            return;
        }
        let Some(session) = self.shim_checkpoints.remove(&msg.name) else {
            return;
        };
        let reason = expiry_reason("checkpoint", "End", &msg.lease);
        tracing::warn!(checkpoint = %msg.name, container = %session.request.container_id,
            %reason, "container checkpoint lease expired; the agent settles it");
        let name = msg.name;
        ctx.spawn(
            settle_checkpoint(self.parts.clone(), session, reason)
                .into_actor(self)
                .map(move |settled, agent, ctx| {
                    agent.busy.remove(&name);
                    agent.refresh_tier_usage(ctx);
                    match settled {
                        Ok(Settled::Recorded { record, until }) => {
                            if let Err(e) = agent.keep_record(ctx, &name, &record) {
                                tracing::error!(checkpoint = %name, error = %e, "the adopted dump could not be recorded; recovery adopts it at the next start");
                                return;
                            }
                            agent.last_used.insert(name.clone(), record.created_unix);
                            agent.drain_later(ctx, &name, record.files.clone(), until);
                            agent.enforce_budgets(ctx);
                        }
                        Ok(Settled::Incomplete(leftover)) => agent.leftovers.push(leftover),
                        Ok(Settled::RolledBack) => {}
                        Err(AgentError::HeldPartially { record, source, .. }) => {
                            tracing::error!(checkpoint = %name, error = %source, "the adopted dump is held only partially");
                            if let Err(e) = agent.keep_record(ctx, &name, &record) {
                                tracing::error!(checkpoint = %name, error = %e, "the adopted dump could not be recorded; recovery adopts it at the next start");
                            }
                        }
                        Err(e) => {
                            tracing::error!(checkpoint = %name, error = %e, "settling the expired checkpoint failed; its journal entry stays for recovery");
                        }
                    }
                }),
        );
    }
}

/// Settles one checkpoint whose lease ran out (see the module docs); the checkpoint's
/// machine moves the workload's state.
async fn settle_checkpoint(
    parts: NodeParts,
    mut session: ShimCheckpoint,
    reason: String,
) -> Result<Settled, AgentError> {
    let name = session.machine.name().clone();
    session
        .machine
        .clock
        .announce("lease", "expired", reason.clone());
    session.machine.clock.failed("lease", "lease_expired");
    let partial = session.machine.images_dir().to_owned();
    let dump_timeout = TimeoutsConfig::of(parts.config.timeouts.dump_ms);
    let dir = partial.clone();
    let complete = blocking(move || {
        recovery::wait_for_criu(&dir, dump_timeout);
        recovery::inventory_complete(&dir)
    })
    .await?;
    let runs = session.workload_runs();
    let leave_running = session.request.leave_running;
    if complete && (!runs || leave_running) {
        let machine = &mut session.machine;
        if machine.step() == Step::Locked {
            machine.dumped(None).await?;
            // Processes that are gone cannot be resumed: their hold just ends.
            let keep = !(runs && leave_running);
            if let Err((_, e)) = machine.release_gpus_keeping(keep).await {
                tracing::error!(checkpoint = %name, error = %e, "giving the GPUs back after the lease failed");
            }
        }
        let until = machine.until();
        let note = format!("adopted: {reason}, after its dump had completed");
        let (record, _) = finish(session, None, note).await?;
        tracing::warn!(checkpoint = %name, "the completed dump of an expired lease is kept as a checkpoint");
        return Ok(Settled::Recorded {
            record: Box::new(record),
            until,
        });
    }
    let machine = &mut session.machine;
    if let Err(e) = machine.end_gpu_hold(!runs).await {
        tracing::error!(checkpoint = %name, error = %e, "giving the GPUs back after the lease failed");
    }
    let dir = partial.clone();
    let bytes = blocking(move || recovery::dir_bytes(&dir)).await?;
    if !runs && bytes > 0 {
        machine.workload_failed();
        let pid = session.processes.first().map_or(0, |p| p.0);
        tracing::error!(checkpoint = %name, pid, "incomplete dump of an ended workload kept and listed as incomplete");
        return Ok(Settled::Incomplete(Leftover {
            name,
            kind: LeftoverKind::Incomplete,
            path: partial,
            bytes,
            pid,
            note: format!(
                "{reason}; CRIU did not finish this dump and the workload has ended, so it \
                 cannot be restored and is kept for inspection (delete it to reclaim the space)"
            ),
        }));
    }
    if runs {
        let pids: Vec<i32> = session.processes.iter().map(|p| p.0).collect();
        process::continue_tree(&pids);
    }
    machine.abandon(reason).await?;
    if !runs {
        machine.workload_failed();
    }
    Ok(Settled::RolledBack)
}

impl Handler<RestoreLeaseExpired> for NodeAgent {
    type Result = ();

    fn handle(&mut self, msg: RestoreLeaseExpired, ctx: &mut Self::Context) {
        let current = self
            .shim_restores
            .get(&msg.name)
            .is_some_and(|s| s.lease == msg.lease);
        if !current {
            return;
        }
        let Some(session) = self.shim_restores.remove(&msg.name) else {
            return;
        };
        let reason = expiry_reason("restore", "End", &msg.lease);
        tracing::warn!(checkpoint = %msg.name, %reason, "container restore lease expired; its staged images are dropped");
        let clock = PhaseClock::new(
            msg.name.as_str(),
            "restore",
            self.parts.events.clone(),
            self.parts.metrics.clone(),
        );
        clock.announce("lease", "expired", reason);
        clock.failed("lease", "lease_expired");
        self.parts
            .journal
            .note(msg.name.as_str(), Transition::RestoreEnded { ok: false });
        self.workloads
            .put_back_state_of(&session.record, session.before);
        self.expired_restores.insert(msg.name.clone());
        let name = msg.name;
        ctx.spawn(
            async move {
                // Dropping the staged copy removes its scratch directory: file work.
                if let Err(e) = blocking(move || drop(session)).await {
                    tracing::error!(error = %e, "dropping staged images failed");
                }
            }
            .into_actor(self)
            .map(move |(), agent, ctx| {
                agent.busy.remove(&name);
                agent.refresh_tier_usage(ctx);
            }),
        );
    }
}
