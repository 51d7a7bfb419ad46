//! A tier that keeps each image set as a plain directory of files: the RAM tier (on tmpfs,
//! where CRIU reads and writes) and, until the chunked store replaces it, the NVMe tier.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::{CheckpointName, LoadReport, StoreReport, Tier, TierError, TierKind};

/// Prefix of directories that are being written and do not count as held checkpoints.
const PARTIAL_PREFIX: &str = ".partial-";

/// Prefix of scratch copies staged from a slower tier for a restore: copies of data held
/// elsewhere, so the only directories a start-up may simply delete.
pub const STAGING_PREFIX: &str = ".staging-";

/// Directory (under the root) of image sets nobody could account for after a crash: kept,
/// listed, and removed only on request.
const QUARANTINE_DIR: &str = ".quarantine";

/// Image sets as directories `<root>/<name>/`; a store goes through `<root>/.partial-<name>/`
/// and a rename, so a crash never leaves a half-written set under a real name.
#[derive(Debug)]
pub struct LocalDirTier {
    kind: TierKind,
    root: PathBuf,
}

impl LocalDirTier {
    /// Opens (creating if needed, mode 0700) a tier rooted at `root`. Only restore scratch
    /// copies (`.staging-*`) are swept: a partial set (`.partial-<name>`) may be the only copy
    /// of a workload whose dump finished while the agent was down, so the agent's recovery
    /// decides about each one ([`Self::partials`]).
    pub fn open(kind: TierKind, root: impl Into<PathBuf>) -> Result<Self, TierError> {
        let tier = Self {
            kind,
            root: root.into(),
        };
        create_private_dir(&tier.root).map_err(|e| tier.io("create directory", &tier.root, e))?;
        for entry in fs::read_dir(&tier.root).map_err(|e| tier.io("read", &tier.root, e))? {
            let entry = entry.map_err(|e| tier.io("read", &tier.root, e))?;
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(STAGING_PREFIX)
            {
                let path = entry.path();
                fs::remove_dir_all(&path).map_err(|e| tier.io("remove", &path, e))?;
            }
        }
        Ok(tier)
    }

    /// Checkpoints with a partial set (`.partial-<name>`) in the tier: dumps that had not
    /// been committed when the agent stopped.
    pub fn partials(&self) -> Result<Vec<CheckpointName>, TierError> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(|e| self.io("read", &self.root, e))? {
            let entry = entry.map_err(|e| self.io("read", &self.root, e))?;
            let file_name = entry.file_name();
            let Some(rest) = file_name
                .to_string_lossy()
                .strip_prefix(PARTIAL_PREFIX)
                .map(str::to_owned)
            else {
                continue;
            };
            if let Ok(name) = CheckpointName::new(&rest) {
                if entry.path().is_dir() {
                    names.push(name);
                }
            }
        }
        names.sort();
        Ok(names)
    }

    /// Scratch directory for staging a copy of `name` from a slower tier.
    pub fn staging_dir_of(&self, name: &CheckpointName, unique: u32) -> PathBuf {
        self.root
            .join(format!("{STAGING_PREFIX}{name}-{unique:08x}"))
    }

    /// Moves the directory `dir` (in this tier) into the quarantine as a set of `name`, and
    /// returns where it went. A name quarantined before keeps its older set beside the new.
    pub fn quarantine(&self, name: &CheckpointName, dir: &Path) -> Result<PathBuf, TierError> {
        let root = self.root.join(QUARANTINE_DIR);
        create_private_dir(&root).map_err(|e| self.io("create directory", &root, e))?;
        let mut target = root.join(name.as_str());
        let mut n = 1u32;
        while target.exists() {
            target = root.join(format!("{name}~{n}"));
            n += 1;
        }
        fs::rename(dir, &target).map_err(|e| self.io("quarantine", dir, e))?;
        sync_path(&root).map_err(|e| self.io("sync", &root, e))?;
        Ok(target)
    }

    /// Every quarantined set: the checkpoint name it was found under, its directory and size.
    pub fn quarantined(&self) -> Result<Vec<(CheckpointName, PathBuf, u64)>, TierError> {
        let root = self.root.join(QUARANTINE_DIR);
        let entries = match fs::read_dir(&root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io("read", &root, e)),
        };
        let mut sets = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| self.io("read", &root, e))?;
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let base = file_name.split('~').next().unwrap_or_default();
            let Ok(name) = CheckpointName::new(base) else {
                continue;
            };
            let path = entry.path();
            let bytes = dir_bytes(&path).map_err(|e| self.io("measure", &path, e))?;
            sets.push((name, path, bytes));
        }
        sets.sort();
        Ok(sets)
    }

    /// Root directory of the tier.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory that holds (or will hold) the image set of `name`.
    pub fn dir_of(&self, name: &CheckpointName) -> PathBuf {
        self.root.join(name.as_str())
    }

    /// Scratch directory for writing the image set of `name` before [`Self::commit`].
    pub fn partial_dir_of(&self, name: &CheckpointName) -> PathBuf {
        self.root.join(format!("{PARTIAL_PREFIX}{name}"))
    }

    /// Makes a set written into [`Self::partial_dir_of`] a held checkpoint.
    pub fn commit(&self, name: &CheckpointName) -> Result<StoreReport, TierError> {
        let partial = self.partial_dir_of(name);
        let dir = self.dir_of(name);
        sync_dir_files(&partial).map_err(|e| self.io("sync", &partial, e))?;
        fs::rename(&partial, &dir).map_err(|e| self.io("rename", &partial, e))?;
        sync_path(&self.root).map_err(|e| self.io("sync", &self.root, e))?;
        let bytes = dir_bytes(&dir).map_err(|e| self.io("measure", &dir, e))?;
        Ok(StoreReport {
            raw_bytes: bytes,
            stored_bytes: bytes,
            ..StoreReport::default()
        })
    }

    fn io(&self, op: &'static str, path: &Path, source: io::Error) -> TierError {
        TierError::Io {
            tier: self.kind,
            op,
            path: path.to_owned(),
            source,
        }
    }
}

impl Tier for LocalDirTier {
    fn kind(&self) -> TierKind {
        self.kind
    }

    fn store(&self, name: &CheckpointName, image_dir: &Path) -> Result<StoreReport, TierError> {
        let dir = self.dir_of(name);
        if dir.is_dir() {
            let bytes = dir_bytes(&dir).map_err(|e| self.io("measure", &dir, e))?;
            return Ok(StoreReport {
                raw_bytes: bytes,
                ..StoreReport::default()
            });
        }
        let partial = self.partial_dir_of(name);
        if partial.exists() {
            fs::remove_dir_all(&partial).map_err(|e| self.io("remove", &partial, e))?;
        }
        fs::create_dir(&partial).map_err(|e| self.io("create directory", &partial, e))?;
        let copied = copy_files(image_dir, &partial).map_err(|(path, e)| self.io("copy", &path, e));
        if let Err(e) = copied {
            let _ = fs::remove_dir_all(&partial);
            return Err(e);
        }
        self.commit(name).inspect_err(|_| {
            let _ = fs::remove_dir_all(&partial);
        })
    }

    fn load(&self, name: &CheckpointName, dest: &Path) -> Result<LoadReport, TierError> {
        let dir = self.dir_of(name);
        if !dir.is_dir() {
            return Err(TierError::NotFound {
                tier: self.kind,
                name: name.clone(),
            });
        }
        let bytes = copy_files(&dir, dest).map_err(|(path, e)| self.io("copy", &path, e))?;
        Ok(LoadReport { bytes })
    }

    fn contains(&self, name: &CheckpointName) -> Result<bool, TierError> {
        Ok(self.dir_of(name).is_dir())
    }

    fn remove(&self, name: &CheckpointName) -> Result<bool, TierError> {
        let dir = self.dir_of(name);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.io("remove", &dir, e)),
        }
    }

    fn list(&self) -> Result<Vec<CheckpointName>, TierError> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(|e| self.io("read", &self.root, e))? {
            let entry = entry.map_err(|e| self.io("read", &self.root, e))?;
            let Ok(name) = CheckpointName::new(&entry.file_name().to_string_lossy()) else {
                continue;
            };
            if entry.path().is_dir() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    fn used_bytes(&self) -> Result<u64, TierError> {
        let mut total = 0;
        for name in self.list()? {
            let dir = self.dir_of(&name);
            total += dir_bytes(&dir).map_err(|e| self.io("measure", &dir, e))?;
        }
        Ok(total)
    }
}

/// Copies the regular files of `src` (CRIU image sets are flat) into `dest`, syncing each.
fn copy_files(src: &Path, dest: &Path) -> Result<u64, (PathBuf, io::Error)> {
    let mut bytes = 0;
    for entry in fs::read_dir(src).map_err(|e| (src.to_owned(), e))? {
        let entry = entry.map_err(|e| (src.to_owned(), e))?;
        let file_type = entry.file_type().map_err(|e| (entry.path(), e))?;
        if !file_type.is_file() {
            continue;
        }
        let target = dest.join(entry.file_name());
        bytes += fs::copy(entry.path(), &target).map_err(|e| (entry.path(), e))?;
        sync_path(&target).map_err(|e| (target.clone(), e))?;
    }
    Ok(bytes)
}

/// Creates `dir` and its parents; the tier's own directory gets mode 0700, as checkpoints
/// are workloads' memory.
fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn sync_dir_files(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        sync_path(&entry?.path())?;
    }
    sync_path(dir)
}

fn sync_path(path: &Path) -> io::Result<()> {
    fs::File::open(path)?.sync_all()
}

/// Total size of the regular files in `dir`.
pub(crate) fn dir_bytes(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> CheckpointName {
        CheckpointName::new(s).unwrap()
    }

    #[test]
    fn store_load_remove_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("pages-1.img"), vec![7u8; 10_000]).unwrap();
        fs::write(src.join("core-1.img"), b"core").unwrap();
        let tier = LocalDirTier::open(TierKind::Nvme, tmp.path().join("nvme")).unwrap();

        let report = tier.store(&name("cp1"), &src).unwrap();
        assert_eq!(report.raw_bytes, 10_004);
        assert_eq!(report.stored_bytes, 10_004);
        assert!(tier.contains(&name("cp1")).unwrap());
        assert_eq!(tier.list().unwrap(), vec![name("cp1")]);
        assert_eq!(tier.used_bytes().unwrap(), 10_004);
        assert_eq!(tier.store(&name("cp1"), &src).unwrap().stored_bytes, 0);

        let dest = tmp.path().join("dest");
        fs::create_dir(&dest).unwrap();
        assert_eq!(tier.load(&name("cp1"), &dest).unwrap().bytes, 10_004);
        assert_eq!(
            fs::read(dest.join("pages-1.img")).unwrap(),
            vec![7u8; 10_000]
        );

        assert!(tier.remove(&name("cp1")).unwrap());
        assert!(!tier.remove(&name("cp1")).unwrap());
        let err = tier.load(&name("cp1"), &dest).unwrap_err();
        assert_eq!(err.to_string(), "nvme tier holds no checkpoint named cp1");
    }

    #[test]
    fn failed_store_leaves_nothing_and_partials_stay_for_recovery() {
        let tmp = tempfile::tempdir().unwrap();
        let tier = LocalDirTier::open(TierKind::Nvme, tmp.path().join("nvme")).unwrap();
        let err = tier
            .store(&name("cp"), &tmp.path().join("missing"))
            .unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        assert!(!tier.contains(&name("cp")).unwrap());
        assert!(tier.list().unwrap().is_empty());

        fs::create_dir(tier.partial_dir_of(&name("left"))).unwrap();
        fs::write(
            tier.partial_dir_of(&name("left")).join("inventory.img"),
            b"x",
        )
        .unwrap();
        let staging = tier.staging_dir_of(&name("cp"), 7);
        fs::create_dir(&staging).unwrap();
        let reopened = LocalDirTier::open(TierKind::Nvme, tier.root()).unwrap();
        assert!(reopened
            .partial_dir_of(&name("left"))
            .join("inventory.img")
            .exists());
        assert_eq!(reopened.partials().unwrap(), vec![name("left")]);
        assert!(!staging.exists(), "restore scratch copies are swept");
        assert!(
            reopened.list().unwrap().is_empty(),
            "a partial set is no checkpoint"
        );
    }

    #[test]
    fn quarantined_sets_are_kept_listed_and_never_clash() {
        let tmp = tempfile::tempdir().unwrap();
        let tier = LocalDirTier::open(TierKind::Ram, tmp.path().join("ram")).unwrap();
        for _ in 0..2 {
            let dir = tier.dir_of(&name("orphan"));
            fs::create_dir(&dir).unwrap();
            fs::write(dir.join("pages-1.img"), vec![1u8; 100]).unwrap();
            let moved = tier.quarantine(&name("orphan"), &dir).unwrap();
            assert!(moved.join("pages-1.img").exists());
            assert!(!dir.exists());
        }
        let sets = tier.quarantined().unwrap();
        assert_eq!(sets.len(), 2);
        assert!(sets
            .iter()
            .all(|(n, _, bytes)| *n == name("orphan") && *bytes == 100));
        assert!(
            tier.list().unwrap().is_empty(),
            "quarantine is no checkpoint"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(tier.root()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
