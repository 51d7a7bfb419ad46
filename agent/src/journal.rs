//! The agent's durable journal of the transitions recovery needs. A stop-mode checkpoint
//! ends its workload, so from the dump on the images are the workload's only copy; the
//! journal is written (and fsynced) *before* each step is acted on, so that an agent killed
//! at any point finds out at its next start what was in flight and finishes or reports it
//! ([`crate::recovery`]).
//!
//! Format: one line per entry, `KJ1 <checksum> <json>\n`. `KJ1` is the magic and version;
//! the checksum is the first 16 hex digits of the BLAKE3 of the JSON text. A line that fails
//! its checksum is skipped and reported; a torn last line (a crash mid-append) is expected
//! and dropped quietly. Lines are small (a few hundred bytes) and the file is rewritten with
//! only the still-open entries at every start, so it stays small.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Magic and format version at the start of every line.
const MAGIC: &str = "KJ1";

/// Bytes a journal may have before it is refused as not a journal (it is compacted at every
/// start, so a real one stays far below).
const MAX_JOURNAL_BYTES: u64 = 64 << 20;

/// A dump the agent is about to start: everything needed to adopt its images later.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpIntent {
    /// Root PID of the workload.
    pub pid: i32,
    /// The workload's start time (clock ticks since boot, `/proc/PID/stat` field 22), to
    /// tell it from a later process that reuses the PID.
    pub start_ticks: u64,
    /// Whether the workload keeps running after the dump.
    pub leave_running: bool,
    /// Whether CRIU runs with `--shell-job`.
    pub shell_job: bool,
    /// Container, pod and GPU identity, recorded as given.
    #[serde(default)]
    pub container_id: String,
    /// Pod of the workload.
    #[serde(default)]
    pub pod_uid: String,
    /// GPU group.
    #[serde(default)]
    pub gpu_group: String,
    /// GPU seat.
    #[serde(default)]
    pub gpu_seat: String,
    /// Directory CRIU dumps into.
    pub images_dir: PathBuf,
}

/// One transition of a checkpoint or restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Transition {
    /// A dump is about to start.
    DumpIntent(DumpIntent),
    /// CRIU finished the dump successfully.
    Dumped,
    /// The images are committed in a tier (`ram`, `nvme`, `s3`).
    Committed {
        /// The tier.
        tier: String,
    },
    /// The checkpoint record is written: the checkpoint is complete.
    Recorded,
    /// The dump failed and was rolled back (or its leftovers were dealt with).
    Abandoned {
        /// Why.
        reason: String,
    },
    /// A restore is about to run CRIU.
    RestoreStarted {
        /// PID the tree is restored under.
        pid: i32,
        /// Clock ticks since boot when it started: a process on `pid` that started later
        /// is the restore's.
        since_ticks: u64,
    },
    /// A restore the shim runs is staged: its `runc restore` may now bring the container
    /// back from `images_dir`. The agent learns the restored processes only at the End.
    RestoreStaged {
        /// The container being restored.
        container_id: String,
        /// The images the shim restores from.
        images_dir: PathBuf,
    },
    /// The shim's `runc restore` brought back `pids`; they stay CUDA-locked until the agent
    /// restores and unlocks their GPU state, which recovery does when the agent died first.
    RestoreRan {
        /// The restored processes.
        pids: Vec<i32>,
    },
    /// The restore finished (successfully or not).
    RestoreEnded {
        /// Whether the workload runs again.
        ok: bool,
    },
}

/// One journal line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The checkpoint the transition belongs to.
    pub name: String,
    /// Seconds since the Unix epoch when it was written.
    pub unix: u64,
    /// What happened.
    #[serde(flatten)]
    pub transition: Transition,
}

/// The journal could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// File system error.
    #[error("journal {}: {op}: {source}", path.display())]
    Io {
        /// The journal file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file is too big to be a journal.
    #[error("journal {} has {bytes} bytes, more than a journal can hold; move it away to start", path.display())]
    TooBig {
        /// The journal file.
        path: PathBuf,
        /// Its size.
        bytes: u64,
    },
}

/// The append-only journal file, shared by every operation of the agent.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: Mutex<File>,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn checksum(json: &str) -> String {
    blake3::hash(json.as_bytes()).to_hex()[..16].to_owned()
}

/// Encodes one entry as a journal line.
pub fn encode(entry: &Entry) -> String {
    let json = serde_json::to_string(entry).unwrap_or_else(|_| {
        unreachable!("journal entries are plain strings and numbers and always serialise")
    });
    format!("{MAGIC} {} {json}\n", checksum(&json))
}

/// Decodes one journal line (without its newline).
pub fn decode(line: &str) -> Result<Entry, String> {
    let mut fields = line.splitn(3, ' ');
    let (Some(magic), Some(sum), Some(json)) = (fields.next(), fields.next(), fields.next()) else {
        return Err("not a journal line".into());
    };
    if magic != MAGIC {
        return Err(format!(
            "unknown format {magic:?} (this agent reads {MAGIC})"
        ));
    }
    if checksum(json) != sum {
        return Err("checksum mismatch".into());
    }
    serde_json::from_str(json).map_err(|e| e.to_string())
}

/// What reading a journal found: its entries in order, and the lines it had to skip.
#[derive(Debug, Default)]
pub struct Replay {
    /// Every intact entry, oldest first.
    pub entries: Vec<Entry>,
    /// Damaged lines (1-based line number and why), except a torn last line.
    pub damaged: Vec<(usize, String)>,
}

/// Reads every entry of the journal at `path` (none when it does not exist).
pub fn read(path: &Path) -> Result<Replay, JournalError> {
    let io_err = |op, source| JournalError::Io {
        path: path.to_owned(),
        op,
        source,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Replay::default()),
        Err(e) => return Err(io_err("open", e)),
    };
    let bytes = file.metadata().map_err(|e| io_err("stat", e))?.len();
    if bytes > MAX_JOURNAL_BYTES {
        return Err(JournalError::TooBig {
            path: path.to_owned(),
            bytes,
        });
    }
    let mut raw = Vec::new();
    file.take(MAX_JOURNAL_BYTES)
        .read_to_end(&mut raw)
        .map_err(|e| io_err("read", e))?;
    Ok(replay(&raw))
}

/// Parses journal text; a last line without its newline is a torn append and is dropped.
pub fn replay(raw: &[u8]) -> Replay {
    let text = String::from_utf8_lossy(raw);
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    let mut out = Replay::default();
    for (i, line) in complete.split('\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        match decode(line) {
            Ok(entry) => out.entries.push(entry),
            Err(why) => out.damaged.push((i + 1, why)),
        }
    }
    out
}

impl Journal {
    /// Opens the journal at `path` for appending, creating it (0600) when needed.
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|source| JournalError::Io {
                path: path.to_owned(),
                op: "create its directory",
                source,
            })?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| JournalError::Io {
                path: path.to_owned(),
                op: "open",
                source,
            })?;
        Ok(Self {
            path: path.to_owned(),
            file: Mutex::new(file),
        })
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a transition of `name` and makes it durable before returning.
    pub fn append(&self, name: &str, transition: Transition) -> Result<(), JournalError> {
        let line = encode(&Entry {
            name: name.to_owned(),
            unix: now_unix(),
            transition,
        });
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let io_err = |op, source| JournalError::Io {
            path: self.path.clone(),
            op,
            source,
        };
        (&*file)
            .write_all(line.as_bytes())
            .map_err(|e| io_err("append", e))?;
        file.sync_data().map_err(|e| io_err("sync", e))
    }

    /// Appends like [`Self::append`], logging a failure instead of returning it: for
    /// transitions whose loss recovery can make up for from the tiers (it finds the images
    /// where they are), where failing the operation would do more harm than going on.
    pub fn note(&self, name: &str, transition: Transition) {
        if let Err(e) = self.append(name, transition) {
            tracing::error!(checkpoint = name, error = %e, "journal entry not written; recovery falls back to what the tiers hold");
        }
    }

    /// [`Self::note`] on the blocking pool, awaited: the entry's fsync stays off the actix
    /// thread that polls the caller, and the caller goes on only once the entry is written.
    pub async fn note_off_thread(self: &Arc<Self>, name: &str, transition: Transition) {
        let journal = Arc::clone(self);
        let entry = name.to_owned();
        if let Err(e) = tokio::task::spawn_blocking(move || journal.note(&entry, transition)).await
        {
            tracing::error!(checkpoint = name, error = %e, "journal entry not written; recovery falls back to what the tiers hold");
        }
    }

    /// Replaces the journal's content with `keep` (written to a temporary file, fsynced and
    /// renamed over it), so it holds only what is still open.
    pub fn rewrite(&self, keep: &[Entry]) -> Result<(), JournalError> {
        let tmp = self.path.with_extension("tmp");
        let io_err = |op, source| JournalError::Io {
            path: tmp.clone(),
            op,
            source,
        };
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io_err("create", e))?;
        for entry in keep {
            out.write_all(encode(entry).as_bytes())
                .map_err(|e| io_err("write", e))?;
        }
        out.sync_all().map_err(|e| io_err("sync", e))?;
        fs::rename(&tmp, &self.path).map_err(|e| io_err("rename", e))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_err("sync directory", e))?;
        }
        *file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| io_err("reopen", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intent() -> Transition {
        Transition::DumpIntent(DumpIntent {
            pid: 42,
            start_ticks: 1234,
            leave_running: false,
            shell_job: true,
            container_id: String::new(),
            pod_uid: String::new(),
            gpu_group: String::new(),
            gpu_seat: String::new(),
            images_dir: "/ram/.partial-cp".into(),
        })
    }

    #[test]
    fn entries_survive_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let journal = Journal::open(&path).unwrap();
        journal.append("cp", intent()).unwrap();
        journal.append("cp", Transition::Dumped).unwrap();
        journal
            .append("cp", Transition::Committed { tier: "ram".into() })
            .unwrap();
        drop(journal);
        let journal = Journal::open(&path).unwrap();
        journal.append("cp", Transition::Recorded).unwrap();

        let replay = read(&path).unwrap();
        assert!(replay.damaged.is_empty(), "{:?}", replay.damaged);
        let kinds: Vec<&Transition> = replay.entries.iter().map(|e| &e.transition).collect();
        assert_eq!(kinds[0], &intent());
        assert_eq!(kinds[1], &Transition::Dumped);
        assert_eq!(kinds[3], &Transition::Recorded);
        assert!(replay.entries.iter().all(|e| e.name == "cp"));
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn damaged_and_torn_lines_are_skipped_and_reported() {
        let good = encode(&Entry {
            name: "a".into(),
            unix: 1,
            transition: Transition::Dumped,
        });
        let flipped = good.replace("dumped", "dumpet");
        let other_version = good.replacen("KJ1", "KJ9", 1);
        let torn = &good[..good.len() / 2];
        let text = format!("{good}{flipped}{other_version}garbage\n{good}{torn}");
        let replay = replay(text.as_bytes());
        assert_eq!(replay.entries.len(), 2);
        let reasons: Vec<&str> = replay.damaged.iter().map(|(_, w)| w.as_str()).collect();
        assert_eq!(
            replay.damaged.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            [2, 3, 4]
        );
        assert_eq!(reasons[0], "checksum mismatch");
        assert!(reasons[1].contains("unknown format \"KJ9\""), "{reasons:?}");
        assert_eq!(reasons[2], "not a journal line");
    }

    #[test]
    fn rewrite_keeps_only_what_is_given_and_appends_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let journal = Journal::open(&path).unwrap();
        for name in ["a", "b", "c"] {
            journal.append(name, intent()).unwrap();
        }
        let keep: Vec<Entry> = read(&path)
            .unwrap()
            .entries
            .into_iter()
            .filter(|e| e.name == "b")
            .collect();
        journal.rewrite(&keep).unwrap();
        journal.append("d", Transition::Recorded).unwrap();
        let names: Vec<String> = read(&path)
            .unwrap()
            .entries
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["b", "d"]);
    }

    #[test]
    fn a_huge_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let file = File::create(&path).unwrap();
        file.set_len(MAX_JOURNAL_BYTES + 1).unwrap();
        let err = read(&path).unwrap_err();
        assert!(
            err.to_string().contains("more than a journal can hold"),
            "{err}"
        );
    }
}
