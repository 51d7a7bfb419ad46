//! The agent's record of every checkpoint, one JSON file per checkpoint in the state
//! directory, so a restarted agent finds its checkpoints again.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use kybernate_cuda::GpuFingerprint;
use std::sync::Arc;

use kybernate_dataplane::{
    open_record, seal_record, CheckpointName, KeyRing, TierKind, MAX_RECORD_BYTES,
};
use serde::{Deserialize, Serialize};

use crate::images::ImageFile;

/// Duration of one phase.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phase {
    /// Phase name, e.g. `criu_dump`.
    pub name: String,
    /// Milliseconds it took.
    pub millis: u64,
}

/// What the agent knows about one checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// The checkpoint's name.
    pub name: String,
    /// Root PID of the dumped tree (CRIU restores it under the same PID).
    pub pid: i32,
    /// Container, when the workload is one.
    #[serde(default)]
    pub container_id: String,
    /// Pod of the container.
    #[serde(default)]
    pub pod_uid: String,
    /// GPU group the device plugin assigned.
    #[serde(default)]
    pub gpu_group: String,
    /// GPU seat the device plugin assigned.
    #[serde(default)]
    pub gpu_seat: String,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    /// Whether the workload kept running after the dump.
    pub leave_running: bool,
    /// Whether CRIU needed `--shell-job` (restore needs it too).
    pub shell_job: bool,
    /// Checkpoint phases and their durations.
    pub phases: Vec<Phase>,
    /// Bytes CRIU wrote.
    pub raw_bytes: u64,
    /// Bytes the tiers added for it.
    pub stored_bytes: u64,
    /// Every image file with its size and digest, to verify before restoring.
    pub files: Vec<ImageFile>,
    /// The node's GPUs when the workload used CUDA; restore checks the target against it.
    #[serde(default)]
    pub gpu: Option<GpuFingerprint>,
    /// What people should know about how the checkpoint came to be, e.g. that recovery
    /// adopted it after an agent crash.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
    /// Where the checkpoint came from: who may restore it (see `tenancy`). Records written
    /// before origins existed are node-local.
    #[serde(default)]
    pub origin: crate::tenancy::Origin,
}

/// A record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// File system error on a record.
    #[error("checkpoint record {}: {source}", path.display())]
    Io {
        /// The record file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A record file is not valid.
    #[error("checkpoint record {} is corrupt: {detail}", path.display())]
    Corrupt {
        /// The record file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The record a shared tier keeps for a checkpoint is not valid.
    #[error("the record of checkpoint {name} in the {tier} tier is corrupt: {detail}")]
    SharedCorrupt {
        /// Tier that keeps it.
        tier: TierKind,
        /// Checkpoint it should describe.
        name: String,
        /// What is wrong.
        detail: String,
    },
}

/// All records, kept in memory and mirrored to `<state_dir>/checkpoints/`.
#[derive(Debug)]
pub struct Catalog {
    dir: PathBuf,
    records: BTreeMap<CheckpointName, CheckpointRecord>,
    /// With encryption at rest: records are written with a MAC under the newest key and
    /// read back only if one verifies.
    sealing: Option<RecordSealing>,
}

impl Catalog {
    /// Loads every record in `dir`; unreadable ones are reported and skipped.
    pub fn open(
        dir: &Path,
        sealing: Option<RecordSealing>,
    ) -> Result<(Self, Vec<CatalogError>), CatalogError> {
        let io = |source| CatalogError::Io {
            path: dir.to_owned(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        let mut records = BTreeMap::new();
        let mut problems = Vec::new();
        for entry in fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match read_record(&path, sealing.as_ref()) {
                Ok((name, record)) => {
                    records.insert(name, record);
                }
                Err(e) => problems.push(e),
            }
        }
        let catalog = Self {
            dir: dir.to_owned(),
            records,
            sealing,
        };
        Ok((catalog, problems))
    }

    /// The record of `name`.
    pub fn get(&self, name: &CheckpointName) -> Option<&CheckpointRecord> {
        self.records.get(name)
    }

    /// Every record, by name.
    pub fn all(&self) -> impl Iterator<Item = &CheckpointRecord> {
        self.records.values()
    }

    /// Writes a record durably (temp file, fsync, rename) and keeps it.
    pub fn insert(
        &mut self,
        name: CheckpointName,
        record: CheckpointRecord,
    ) -> Result<(), CatalogError> {
        let path = self.path_of(&name);
        let tmp = path.with_extension("json.tmp");
        let io = |source| CatalogError::Io {
            path: path.clone(),
            source,
        };
        let mut bytes = serde_json::to_vec_pretty(&record).map_err(|e| CatalogError::Corrupt {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        if let Some(sealing) = &self.sealing {
            bytes = seal_record(sealing.ring.newest(), &name, &bytes);
        }
        let mut file = fs::File::create(&tmp).map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        fs::rename(&tmp, &path).map_err(io)?;
        self.records.insert(name, record);
        Ok(())
    }

    /// Forgets `name`; returns whether it was known.
    pub fn remove(&mut self, name: &CheckpointName) -> Result<bool, CatalogError> {
        let path = self.path_of(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(CatalogError::Io { path, source }),
        }
        Ok(self.records.remove(name).is_some())
    }

    fn path_of(&self, name: &CheckpointName) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }
}

/// How the records of a node with encryption at rest are authenticated.
#[derive(Debug, Clone)]
pub struct RecordSealing {
    /// The node's keys: the newest seals, every one opens.
    pub ring: Arc<KeyRing>,
    /// Whether a record without a MAC (written before encryption was turned on) is read.
    pub accept_plain: bool,
}

fn read_record(
    path: &Path,
    sealing: Option<&RecordSealing>,
) -> Result<(CheckpointName, CheckpointRecord), CatalogError> {
    let corrupt = |detail: String| CatalogError::Corrupt {
        path: path.to_owned(),
        detail,
    };
    let meta = fs::metadata(path).map_err(|source| CatalogError::Io {
        path: path.to_owned(),
        source,
    })?;
    if meta.len() > MAX_RECORD_BYTES {
        return Err(corrupt(format!(
            "{} bytes is more than a record can hold",
            meta.len()
        )));
    }
    let bytes = fs::read(path).map_err(|source| CatalogError::Io {
        path: path.to_owned(),
        source,
    })?;
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    let file_name = CheckpointName::new(stem).map_err(|e| corrupt(e.to_string()))?;
    // A sealed record is opened under the name of its file: the MAC binds the two, so a
    // record moved to another name fails. Without keys a sealed record is refused by name.
    let bytes = open_record(
        &file_name,
        &bytes,
        sealing.map(|s| &*s.ring),
        sealing.is_none_or(|s| s.accept_plain),
    )
    .map_err(|e| corrupt(e.to_string()))?;
    let (name, record) = decode(&bytes).map_err(corrupt)?;
    if stem != name.as_str() {
        return Err(corrupt(format!("it names checkpoint {name}")));
    }
    Ok((name, record))
}

/// Reads a record that came from outside the state directory: the JSON must parse, name a
/// valid checkpoint and only name image files that are one path component.
pub fn decode(bytes: &[u8]) -> Result<(CheckpointName, CheckpointRecord), String> {
    let record: CheckpointRecord = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let name = CheckpointName::new(&record.name).map_err(|e| e.to_string())?;
    if record.pid < 0 {
        return Err(format!("pid {} is not a process id", record.pid));
    }
    record.origin.validate().map_err(|e| e.to_string())?;
    if let Some(bad) = record.files.iter().find(|f| {
        f.name.is_empty() || f.name == "." || f.name == ".." || f.name.contains(['/', '\0'])
    }) {
        return Err(format!(
            "image file name {:?} is not one path component",
            bad.name
        ));
    }
    Ok((name, record))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> CheckpointRecord {
        CheckpointRecord {
            name: name.into(),
            pid: 77,
            container_id: String::new(),
            pod_uid: String::new(),
            gpu_group: String::new(),
            gpu_seat: String::new(),
            created_unix: 1,
            leave_running: false,
            shell_job: false,
            phases: vec![Phase {
                name: "criu_dump".into(),
                millis: 5,
            }],
            raw_bytes: 10,
            stored_bytes: 10,
            files: vec![],
            gpu: None,
            note: String::new(),
            origin: crate::tenancy::Origin::NodeLocal,
        }
    }

    #[test]
    fn records_survive_reopen_and_corrupt_ones_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (mut catalog, problems) = Catalog::open(dir.path(), None).unwrap();
        assert!(problems.is_empty());
        let name = CheckpointName::new("cp1").unwrap();
        catalog.insert(name.clone(), record("cp1")).unwrap();
        fs::write(dir.path().join("bad.json"), b"{not json").unwrap();
        fs::write(
            dir.path().join("other.json"),
            serde_json::to_vec(&record("cp9")).unwrap(),
        )
        .unwrap();

        let (reopened, problems) = Catalog::open(dir.path(), None).unwrap();
        assert_eq!(reopened.get(&name), Some(&record("cp1")));
        assert_eq!(reopened.all().count(), 1);
        let messages: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(messages
            .iter()
            .any(|m| m.contains("bad.json") && m.contains("corrupt")));
        assert!(messages.iter().any(|m| m.contains("names checkpoint cp9")));

        let (mut catalog, _) = Catalog::open(dir.path(), None).unwrap();
        assert!(catalog.remove(&name).unwrap());
        assert!(!catalog.remove(&name).unwrap());
    }

    #[test]
    fn records_from_outside_must_name_a_checkpoint_and_plain_image_files() {
        let mut good = record("cp1");
        good.files = vec![ImageFile {
            name: "pages-1.img".into(),
            size: 1,
            chunk_size: 0,
            chunks: vec![],
        }];
        let bytes = serde_json::to_vec(&good).unwrap();
        assert_eq!(
            decode(&bytes).unwrap(),
            (CheckpointName::new("cp1").unwrap(), good.clone())
        );

        let mut escaping = good.clone();
        escaping.files[0].name = "../../etc/passwd".into();
        let err = decode(&serde_json::to_vec(&escaping).unwrap()).unwrap_err();
        assert!(err.contains("not one path component"), "{err}");

        let mut negative = good.clone();
        negative.pid = -1;
        assert!(decode(&serde_json::to_vec(&negative).unwrap()).is_err());

        let mut bad_name = good;
        bad_name.name = "a/b".into();
        assert!(decode(&serde_json::to_vec(&bad_name).unwrap()).is_err());
        assert!(decode(b"{not json").is_err());
    }

    #[test]
    fn sealed_records_are_read_only_intact_and_under_their_own_name() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Arc::new(KeyRing::from_keys(Path::new("/k"), &[("k1", [7; 32])]).unwrap());
        let sealing = |accept_plain| {
            Some(RecordSealing {
                ring: ring.clone(),
                accept_plain,
            })
        };
        let (mut catalog, _) = Catalog::open(dir.path(), sealing(false)).unwrap();
        let name = CheckpointName::new("sealed").unwrap();
        catalog.insert(name.clone(), record("sealed")).unwrap();
        let path = dir.path().join("sealed.json");
        let stored = fs::read(&path).unwrap();
        assert!(stored.starts_with(&kybernate_dataplane::RECORD_MAGIC));

        let (reopened, problems) = Catalog::open(dir.path(), sealing(false)).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(reopened.get(&name).unwrap().pid, 77);

        // Without the key it is refused by name, not read as anyone's.
        let (keyless, problems) = Catalog::open(dir.path(), None).unwrap();
        assert!(keyless.get(&name).is_none());
        assert!(problems[0].to_string().contains("k1"), "{problems:?}");

        // A flipped byte anywhere is detected and the file named.
        for at in [stored.len() / 2, stored.len() - 2] {
            let mut bad = stored.clone();
            bad[at] ^= 1;
            fs::write(&path, &bad).unwrap();
            let (opened, problems) = Catalog::open(dir.path(), sealing(true)).unwrap();
            assert!(opened.get(&name).is_none(), "byte {at}");
            assert!(
                problems[0].to_string().contains("sealed.json"),
                "{problems:?}"
            );
        }

        // Moved to another name: the MAC binds the record to its file name.
        fs::write(&path, &stored).unwrap();
        fs::rename(&path, dir.path().join("other.json")).unwrap();
        let (opened, problems) = Catalog::open(dir.path(), sealing(true)).unwrap();
        assert_eq!(opened.all().count(), 0);
        assert_eq!(problems.len(), 1, "{problems:?}");
        fs::remove_file(dir.path().join("other.json")).unwrap();

        // A plain record (from before encryption) is read only when accepted.
        fs::write(&path, serde_json::to_vec(&record("sealed")).unwrap()).unwrap();
        let (strict, problems) = Catalog::open(dir.path(), sealing(false)).unwrap();
        assert!(strict.get(&name).is_none());
        assert!(
            problems[0].to_string().contains("accept_unencrypted"),
            "{problems:?}"
        );
        let (lenient, _) = Catalog::open(dir.path(), sealing(true)).unwrap();
        assert!(lenient.get(&name).is_some());
    }
}
