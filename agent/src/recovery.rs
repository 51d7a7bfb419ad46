//! Recovery at start-up, before the agent serves: the journal ([`crate::journal`]) says
//! which dumps and restores were in flight when the last agent stopped, the RAM tier says
//! what they left. The rules (a stop-mode dump is the only copy of its workload, so nothing
//! here deletes anything that may be one):
//! - a dump whose CRIU still runs is waited for (CRIU is not killed with the agent: a dump
//!   that finishes is adopted, and a CRIU that dies half-way leaves its workload running);
//! - a complete dump (CRIU's `inventory.img`, which CRIU writes last) whose workload has
//!   ended is committed, digested and recorded, with a note that it was recovered;
//! - an incomplete dump whose workload still runs is discarded, and the workload is sent
//!   SIGCONT in case it was left stopped;
//! - an incomplete dump whose workload has ended is kept and listed as `incomplete`;
//! - a RAM-tier set nothing accounts for is moved to the quarantine and listed;
//! - a restore that was cut off leaves no half-restored process on the workload's PID;
//! - a restore whose CRIU (or the shim's `runc restore`) finished but whose processes were
//!   not yet given their GPUs back has them restored and unlocked.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kybernate_cuda::CudaSession;
use kybernate_dataplane::{CheckpointName, ChunkConfig, LocalDirTier, Tier, TierError};

use crate::catalog::{Catalog, CatalogError, CheckpointRecord};
use crate::images;
use crate::journal::{self, DumpIntent, Entry, Journal, JournalError, Transition};
use crate::process;

/// CRIU's magic number of `inventory.img` (little-endian at offset 0).
const INVENTORY_MAGIC: u32 = 0x5831_3116;

/// What recovery could not account for as a checkpoint, kept on disk and listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leftover {
    /// The checkpoint name it belongs to.
    pub name: CheckpointName,
    /// Why it is not a checkpoint.
    pub kind: LeftoverKind,
    /// Where it is.
    pub path: PathBuf,
    /// Bytes it holds.
    pub bytes: u64,
    /// The workload's PID, when known.
    pub pid: i32,
    /// What happened, for people.
    pub note: String,
}

/// Kinds of [`Leftover`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeftoverKind {
    /// A dump CRIU did not finish whose workload has ended: not restorable, kept for
    /// inspection.
    Incomplete,
    /// Images in the RAM tier that no record or journal entry accounts for.
    Quarantined,
}

impl LeftoverKind {
    /// The state `list` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            LeftoverKind::Incomplete => "incomplete",
            LeftoverKind::Quarantined => "quarantined",
        }
    }
}

/// What recovery did.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Dumps adopted as checkpoints (they still have to drain into the slower tiers).
    pub adopted: Vec<CheckpointName>,
    /// Dumps discarded because their workload still runs.
    pub discarded: Vec<CheckpointName>,
    /// What is kept but is no checkpoint.
    pub leftovers: Vec<Leftover>,
    /// Half-restored processes killed.
    pub killed_restores: Vec<CheckpointName>,
    /// Restores whose restored processes recovery restored and unlocked on their GPUs.
    pub unlocked_restores: Vec<CheckpointName>,
    /// Shim restores staged with no End yet: the End may still come from the shim, and then
    /// unlocks the processes `runc restore` brought back.
    pub interrupted_restores: Vec<CheckpointName>,
    /// Journal lines that were damaged.
    pub damaged_lines: usize,
}

/// Recovery failed; the agent must not serve on a state it does not understand.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// The journal could not be read or rewritten.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The RAM tier could not be read or changed.
    #[error("recovery: {0}")]
    Tier(#[from] TierError),
    /// A recovered record could not be written.
    #[error("recovery: {0}")]
    Catalog(#[from] CatalogError),
}

/// What recovery works on.
#[derive(Debug)]
pub struct RecoveryInputs<'a> {
    /// The RAM tier, where dumps land.
    pub ram: &'a LocalDirTier,
    /// The checkpoint records.
    pub catalog: &'a mut Catalog,
    /// The journal, open for appending.
    pub journal: &'a Journal,
    /// Chunking of the digests recorded with a checkpoint.
    pub chunks: &'a ChunkConfig,
    /// How long a CRIU still dumping is waited for before it is stopped.
    pub dump_timeout: Duration,
    /// Where the restore pidfiles are (the logs directory).
    pub logs_dir: &'a Path,
    /// The CUDA driver, to give a workload that still runs its GPUs back.
    pub cuda: &'a CudaSession,
}

/// A dump the journal shows as not finished.
#[derive(Debug)]
struct OpenDump {
    intent: DumpIntent,
    unix: u64,
    dumped: bool,
    entries: Vec<Entry>,
}

/// A restore the journal shows as not finished.
#[derive(Debug)]
enum OpenRestore {
    /// The agent ran CRIU itself.
    Process { pid: i32, since_ticks: u64 },
    /// The shim runs `runc restore`; `pids` are known once its End came.
    Shim {
        container_id: String,
        images_dir: PathBuf,
        pids: Vec<i32>,
    },
}

/// Runs recovery (see the module docs). Blocking: call it before serving.
pub fn recover(mut inputs: RecoveryInputs<'_>) -> Result<Recovery, RecoveryError> {
    let replay = journal::read(inputs.journal.path())?;
    for (line, why) in &replay.damaged {
        tracing::error!(journal = %inputs.journal.path().display(), line, why, "skipping a damaged journal line");
    }
    let mut recovery = Recovery {
        damaged_lines: replay.damaged.len(),
        ..Recovery::default()
    };
    let (dumps, restores) = open_operations(replay.entries);
    let mut still_open = Vec::new();
    for (name, open) in dumps {
        let Ok(name) = CheckpointName::new(&name) else {
            tracing::error!(
                name,
                "journal names an invalid checkpoint; ignoring its entries"
            );
            continue;
        };
        if let Some(keep) = recover_dump(&mut inputs, &name, open, &mut recovery)? {
            still_open.extend(keep);
        }
    }
    for (name, open) in restores {
        recover_restore(&inputs, &name, &open, &mut recovery);
    }
    quarantine_unaccounted(&inputs, &mut recovery)?;
    inputs.journal.rewrite(&still_open)?;
    Ok(recovery)
}

/// Folds the journal into the dumps and restores that were started and never finished.
fn open_operations(
    entries: Vec<Entry>,
) -> (BTreeMap<String, OpenDump>, BTreeMap<String, OpenRestore>) {
    let mut dumps: BTreeMap<String, OpenDump> = BTreeMap::new();
    let mut restores = BTreeMap::new();
    for entry in entries {
        match &entry.transition {
            Transition::DumpIntent(intent) => {
                dumps.insert(
                    entry.name.clone(),
                    OpenDump {
                        intent: intent.clone(),
                        unix: entry.unix,
                        dumped: false,
                        entries: vec![entry],
                    },
                );
            }
            Transition::Dumped | Transition::Committed { .. } => {
                if let Some(open) = dumps.get_mut(&entry.name) {
                    open.dumped = true;
                    open.entries.push(entry);
                }
            }
            Transition::Recorded | Transition::Abandoned { .. } => {
                dumps.remove(&entry.name);
            }
            Transition::RestoreStarted { pid, since_ticks } => {
                restores.insert(
                    entry.name.clone(),
                    OpenRestore::Process {
                        pid: *pid,
                        since_ticks: *since_ticks,
                    },
                );
            }
            Transition::RestoreStaged {
                container_id,
                images_dir,
            } => {
                restores.insert(
                    entry.name.clone(),
                    OpenRestore::Shim {
                        container_id: container_id.clone(),
                        images_dir: images_dir.clone(),
                        pids: Vec::new(),
                    },
                );
            }
            Transition::RestoreRan { pids: ran } => {
                if let Some(OpenRestore::Shim { pids, .. }) = restores.get_mut(&entry.name) {
                    pids.clone_from(ran);
                }
            }
            Transition::RestoreEnded { .. } => {
                restores.remove(&entry.name);
            }
        }
    }
    (dumps, restores)
}

/// Settles one unfinished dump; returns the journal entries to keep when it stays open
/// (an incomplete dump kept for inspection).
fn recover_dump(
    inputs: &mut RecoveryInputs<'_>,
    name: &CheckpointName,
    open: OpenDump,
    recovery: &mut Recovery,
) -> Result<Option<Vec<Entry>>, RecoveryError> {
    let intent = &open.intent;
    wait_for_criu(&intent.images_dir, inputs.dump_timeout);
    if inputs.catalog.get(name).is_some() {
        // The record was written; only its journal line was lost.
        inputs.journal.note(name.as_str(), Transition::Recorded);
        return Ok(None);
    }
    let runs = process::still_runs(intent.pid, intent.start_ticks);
    let committed = inputs.ram.dir_of(name);
    let partial = inputs.ram.partial_dir_of(name);
    if committed.is_dir() {
        // The RAM commit happens only after CRIU succeeded.
        adopt(
            inputs,
            name,
            &open,
            "the agent stopped after the dump was committed",
        )?;
        recovery.adopted.push(name.clone());
        return Ok(None);
    }
    if !partial.is_dir() {
        abandon(inputs, name, intent, runs, "no images were written");
        return Ok(None);
    }
    let complete = inventory_complete(&partial);
    if complete && (!runs || intent.leave_running) {
        if runs {
            give_back_gpus(inputs, name, intent.pid);
        }
        inputs.ram.commit(name)?;
        let why = if open.dumped {
            "the agent stopped after CRIU finished the dump"
        } else {
            "the agent stopped while CRIU was dumping; CRIU finished the dump"
        };
        adopt(inputs, name, &open, why)?;
        recovery.adopted.push(name.clone());
        return Ok(None);
    }
    if runs {
        // The workload is alive, so the images are not its only copy.
        std::fs::remove_dir_all(&partial).map_err(|source| TierError::Io {
            tier: inputs.ram.kind(),
            op: "remove",
            path: partial.clone(),
            source,
        })?;
        abandon(
            inputs,
            name,
            intent,
            runs,
            "the dump did not finish and the workload still runs",
        );
        recovery.discarded.push(name.clone());
        return Ok(None);
    }
    let bytes = dir_bytes(&partial);
    recovery.leftovers.push(Leftover {
        name: name.clone(),
        kind: LeftoverKind::Incomplete,
        path: partial,
        bytes,
        pid: intent.pid,
        note: "CRIU did not finish this dump and the workload has ended; it cannot be \
               restored and is kept for inspection (delete it to reclaim the space)"
            .into(),
    });
    tracing::error!(checkpoint = %name, pid = intent.pid, "incomplete dump of an ended workload kept and listed as incomplete");
    Ok(Some(open.entries))
}

fn abandon(
    inputs: &RecoveryInputs<'_>,
    name: &CheckpointName,
    intent: &DumpIntent,
    runs: bool,
    reason: &str,
) {
    if runs {
        // A dump cut off half-way must never leave the workload stopped.
        process::continue_tree(&process::tree(intent.pid));
        give_back_gpus(inputs, name, intent.pid);
    }
    tracing::warn!(checkpoint = %name, pid = intent.pid, reason, "dropping an unfinished dump");
    inputs.journal.note(
        name.as_str(),
        Transition::Abandoned {
            reason: reason.into(),
        },
    );
}

/// Gives a workload that still runs its GPUs back. The dump's CUDA phase locks and
/// checkpoints its CUDA processes before CRIU runs, and only the agent that did so would have
/// restored and unlocked them; a workload left like that runs on but can never use its GPUs
/// again. Processes that are not CUDA processes, or already running on their GPUs, are left
/// alone.
fn give_back_gpus(inputs: &RecoveryInputs<'_>, name: &CheckpointName, pid: i32) {
    let tree: Vec<u32> = process::tree(pid)
        .into_iter()
        .filter_map(|p| u32::try_from(p).ok())
        .collect();
    match inputs.cuda.restore(&tree, None) {
        Ok(report) if !report.processes.is_empty() => {
            tracing::warn!(checkpoint = %name, pid, processes = report.processes.len(), "restored and unlocked the GPUs of a workload the last agent left locked");
        }
        Ok(_) => {}
        Err(e) => {
            tracing::error!(checkpoint = %name, pid, error = %e, "cannot give the workload its GPUs back");
        }
    }
}

/// Records the committed RAM set of `name` as a checkpoint.
fn adopt(
    inputs: &mut RecoveryInputs<'_>,
    name: &CheckpointName,
    open: &OpenDump,
    why: &str,
) -> Result<(), RecoveryError> {
    let dir = inputs.ram.dir_of(name);
    let files = match images::digest_dir(&dir, inputs.chunks) {
        Ok(files) => files,
        Err(e) => {
            // Unreadable images are no checkpoint, but may still be someone's only copy.
            let moved = inputs.ram.quarantine(name, &dir)?;
            tracing::error!(checkpoint = %name, error = %e, to = %moved.display(), "a recovered dump cannot be read; quarantined");
            inputs.journal.note(
                name.as_str(),
                Transition::Abandoned {
                    reason: format!("unreadable images quarantined: {e}"),
                },
            );
            return Ok(());
        }
    };
    let raw_bytes = files.iter().map(|f| f.size).sum();
    let intent = &open.intent;
    let record = CheckpointRecord {
        name: name.to_string(),
        pid: intent.pid,
        container_id: intent.container_id.clone(),
        pod_uid: intent.pod_uid.clone(),
        gpu_group: intent.gpu_group.clone(),
        gpu_seat: intent.gpu_seat.clone(),
        created_unix: open.unix,
        leave_running: intent.leave_running,
        shell_job: intent.shell_job,
        phases: Vec::new(),
        raw_bytes,
        stored_bytes: 0,
        files,
        gpu: None,
        note: format!("recovered at agent start: {why}"),
        // The journal covers checkpoints by PID only.
        origin: crate::tenancy::Origin::NodeLocal,
    };
    inputs.catalog.insert(name.clone(), record)?;
    inputs.journal.note(name.as_str(), Transition::Recorded);
    tracing::warn!(checkpoint = %name, why, "adopted a dump as a checkpoint");
    Ok(())
}

/// Whether CRIU finished writing the image set in `dir`: `inventory.img` is written at the
/// end of a dump, after every other image.
pub fn inventory_complete(dir: &Path) -> bool {
    let Ok(bytes) = std::fs::read(dir.join("inventory.img")) else {
        return false;
    };
    if bytes.len() < 8 {
        return false;
    }
    let magic = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    magic == INVENTORY_MAGIC && usize::try_from(len).is_ok_and(|len| bytes.len() >= 8 + len)
}

/// Waits for a CRIU still dumping into `images_dir` (started by an agent that died, or by a
/// shim's `runc` whose lease ran out) to end; past `timeout` it is killed, as the agent would
/// have on its deadline.
pub fn wait_for_criu(images_dir: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let arg: &OsStr = images_dir.as_os_str();
    let mut logged = false;
    loop {
        let running = process::with_argument(arg);
        if running.is_empty() {
            return;
        }
        if !logged {
            tracing::warn!(images = %images_dir.display(), pids = ?running, "a CRIU started by the previous agent still dumps; waiting for it");
            logged = true;
        }
        if Instant::now() >= deadline {
            tracing::error!(images = %images_dir.display(), "the CRIU left by the previous agent ran past the dump deadline; stopping it");
            process::kill_tree(&running);
            std::thread::sleep(Duration::from_millis(100));
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A restore cut off by the agent's end (see [`OpenRestore`]).
fn recover_restore(
    inputs: &RecoveryInputs<'_>,
    name: &str,
    open: &OpenRestore,
    recovery: &mut Recovery,
) {
    match open {
        OpenRestore::Process { pid, since_ticks } => {
            recover_process_restore(inputs, name, *pid, *since_ticks, recovery)
        }
        OpenRestore::Shim {
            container_id,
            images_dir,
            pids,
        } => recover_shim_restore(inputs, name, container_id, images_dir, pids, recovery),
    }
}

/// A restore the agent ran: when CRIU got as far as writing the restored PID the workload
/// runs, and its GPU state is restored and unlocked (the agent that died would have done
/// that next); otherwise whatever CRIU left on the PID is killed, so a retry finds it free.
fn recover_process_restore(
    inputs: &RecoveryInputs<'_>,
    name: &str,
    pid: i32,
    since_ticks: u64,
    recovery: &mut Recovery,
) {
    let pidfile = inputs.logs_dir.join(format!("{name}-restore.pid"));
    let finished = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
        == Some(pid);
    // CRIU's command line names its log file; a restore it still runs is left to finish.
    let log_name = std::ffi::OsString::from(format!("{name}-restore.log"));
    if !process::with_argument(&log_name).is_empty() {
        inputs
            .journal
            .note(name, Transition::RestoreEnded { ok: finished });
        return;
    }
    if finished {
        let unlocked = unlock_restored(inputs, name, &process::tree(pid), recovery);
        inputs
            .journal
            .note(name, Transition::RestoreEnded { ok: unlocked });
        return;
    }
    let leftover = process::stat(pid).is_some_and(|s| s.start_ticks >= since_ticks);
    if leftover {
        process::kill_tree(&process::tree(pid));
        tracing::warn!(
            checkpoint = name,
            pid,
            "killed what a cut-off restore left on the workload's PID"
        );
        if let Ok(name) = CheckpointName::new(name) {
            recovery.killed_restores.push(name);
        }
    }
    inputs
        .journal
        .note(name, Transition::RestoreEnded { ok: false });
}

/// A restore the shim ran. With its End received (`pids` known) the restored processes are
/// restored and unlocked on their GPUs. Without it the agent cannot tell which processes
/// `runc restore` made, so the shim's End, when it still comes, unlocks them
/// ([`Recovery::interrupted_restores`]). The staged scratch copy went with the RAM tier's
/// start-up sweep; a RAM-tier copy staged in place is the checkpoint and stays.
fn recover_shim_restore(
    inputs: &RecoveryInputs<'_>,
    name: &str,
    container_id: &str,
    images_dir: &Path,
    pids: &[i32],
    recovery: &mut Recovery,
) {
    if pids.is_empty() {
        tracing::warn!(checkpoint = name, container = container_id, images = %images_dir.display(),
            "a container restore was staged when the last agent stopped; a late End still unlocks its processes");
        if let Ok(name) = CheckpointName::new(name) {
            recovery.interrupted_restores.push(name);
        }
        inputs
            .journal
            .note(name, Transition::RestoreEnded { ok: false });
        return;
    }
    let running: Vec<i32> = pids
        .iter()
        .copied()
        .filter(|pid| process::stat(*pid).is_some())
        .collect();
    let unlocked = unlock_restored(inputs, name, &running, recovery);
    inputs.journal.note(
        name,
        Transition::RestoreEnded {
            ok: unlocked && !running.is_empty(),
        },
    );
}

/// Restores and unlocks the GPU state of restored processes `pids` (with the checkpoint's
/// recorded GPUs, remapped as a restore would); whether that worked.
fn unlock_restored(
    inputs: &RecoveryInputs<'_>,
    name: &str,
    pids: &[i32],
    recovery: &mut Recovery,
) -> bool {
    let Ok(checkpoint) = CheckpointName::new(name) else {
        return false;
    };
    let recorded = inputs.catalog.get(&checkpoint).and_then(|r| r.gpu.clone());
    let pids: Vec<u32> = pids.iter().filter_map(|p| u32::try_from(*p).ok()).collect();
    match inputs.cuda.restore(&pids, recorded.as_ref()) {
        Ok(report) => {
            if !report.processes.is_empty() {
                tracing::warn!(
                    checkpoint = name,
                    processes = report.processes.len(),
                    "restored and unlocked the GPUs of a restore the last agent left locked"
                );
                recovery.unlocked_restores.push(checkpoint);
            }
            true
        }
        Err(e) => {
            tracing::error!(checkpoint = name, error = %e, "cannot restore the GPUs of a restored workload");
            false
        }
    }
}

/// Moves every RAM-tier set that neither a record nor an open journal entry accounts for
/// into the quarantine, and lists the quarantine.
fn quarantine_unaccounted(
    inputs: &RecoveryInputs<'_>,
    recovery: &mut Recovery,
) -> Result<(), RecoveryError> {
    let kept: Vec<CheckpointName> = recovery.leftovers.iter().map(|l| l.name.clone()).collect();
    for name in inputs.ram.list()? {
        if inputs.catalog.get(&name).is_none() {
            let moved = inputs.ram.quarantine(&name, &inputs.ram.dir_of(&name))?;
            tracing::error!(checkpoint = %name, to = %moved.display(), "RAM-tier images without a record quarantined");
        }
    }
    for name in inputs.ram.partials()? {
        if !kept.contains(&name) {
            let moved = inputs
                .ram
                .quarantine(&name, &inputs.ram.partial_dir_of(&name))?;
            tracing::error!(checkpoint = %name, to = %moved.display(), "unfinished images without a journal entry quarantined");
        }
    }
    for (name, path, bytes) in inputs.ram.quarantined()? {
        recovery.leftovers.push(Leftover {
            name,
            kind: LeftoverKind::Quarantined,
            path,
            bytes,
            pid: 0,
            note: "found in the RAM tier with no record after a crash; kept (delete it to \
                   reclaim the space)"
                .into(),
        });
    }
    Ok(())
}

/// Total size of the files in `dir` (0 when it cannot be read: the number is for people).
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, transition: Transition) -> Entry {
        Entry {
            name: name.into(),
            unix: 1,
            transition,
        }
    }

    #[test]
    fn shim_restores_stay_open_until_they_end_and_keep_their_restored_pids() {
        let staged = |container: &str| Transition::RestoreStaged {
            container_id: container.into(),
            images_dir: "/ram/.staging-x".into(),
        };
        let (dumps, restores) = open_operations(vec![
            entry("ran", staged("c1")),
            entry("ran", Transition::RestoreRan { pids: vec![7, 8] }),
            entry("staged", staged("c2")),
            entry("ended", staged("c3")),
            entry("ended", Transition::RestoreRan { pids: vec![9] }),
            entry("ended", Transition::RestoreEnded { ok: true }),
            entry(
                "process",
                Transition::RestoreStarted {
                    pid: 5,
                    since_ticks: 10,
                },
            ),
        ]);
        assert!(dumps.is_empty());
        assert_eq!(
            restores.keys().map(String::as_str).collect::<Vec<_>>(),
            ["process", "ran", "staged"]
        );
        assert!(
            matches!(&restores["ran"], OpenRestore::Shim { pids, container_id, .. }
                if pids == &[7, 8] && container_id == "c1")
        );
        assert!(matches!(&restores["staged"], OpenRestore::Shim { pids, .. } if pids.is_empty()));
        assert!(matches!(
            restores["process"],
            OpenRestore::Process {
                pid: 5,
                since_ticks: 10
            }
        ));
    }
}
