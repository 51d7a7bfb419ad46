//! The key ring: key-encryption keys read from files a Kubernetes Secret mounts.
//!
//! A key file holds 32 random bytes, raw or as 64 hex digits (`openssl rand -hex 32`). Its
//! file name is its key id, which manifests and sealed chunks record. The ring is either one
//! file or a directory of them; the id that sorts last (byte order) is the newest key, which
//! seals everything new, and every key in the ring opens what it sealed, so rotation is adding
//! a file named after the date (`2026-12-03`). Key material never leaves this module except as
//! derived sub-keys, and no `Debug` or error message shows any of it.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use zeroize::Zeroizing;

use super::derive::SealKey;
use super::key_id::KeyId;

/// Why the key ring cannot be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The configured path is unusable.
    #[error("encryption key path {}: {detail}", path.display())]
    Path {
        /// The key file or directory.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// A key file's ownership or mode lets someone else read or replace it.
    #[error("encryption key {}: owned by uid {uid} with mode {mode:04o}; it must be owned by uid {want_uid} and not accessible by group or others (0400 or 0600 files, 0700 directories)", path.display())]
    Exposed {
        /// The file or directory.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// Its permission bits.
        mode: u32,
        /// The owner required (the agent's own uid, root in a deployment).
        want_uid: u32,
    },
    /// A key file does not hold 32 bytes or 64 hex digits.
    #[error("encryption key {}: expected 32 bytes or 64 hex digits, found {len} bytes", path.display())]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// Its length (never its content).
        len: usize,
    },
    /// A key id is not a valid name.
    #[error(transparent)]
    BadId(#[from] super::key_id::InvalidKeyId),
    /// A checkpoint names a key the ring does not hold.
    #[error("encryption key {id:?} is not in the key ring at {} (it holds {held}); mount the Secret that holds it", path.display())]
    Missing {
        /// The key asked for.
        id: KeyId,
        /// Where the ring was read from.
        path: PathBuf,
        /// The ids the ring holds.
        held: String,
    },
}

/// Every key the node can open checkpoints with; the newest seals new ones.
pub struct KeyRing {
    source: PathBuf,
    keys: BTreeMap<KeyId, Arc<SealKey>>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("source", &self.source)
            .field("ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl KeyRing {
    /// Reads the key file or directory of key files at `path`, checking that it is absolute,
    /// owned by the agent's uid and closed to group and others (a Secret volume mounted with
    /// `defaultMode: 0400`). In a directory, entries starting with `.` are skipped (the
    /// `..data` links of a Secret volume); the others may be links that stay inside it.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let bad = |detail: String| KeyError::Path {
            path: path.to_owned(),
            detail,
        };
        if !path.is_absolute() {
            return Err(bad("must be an absolute path".into()));
        }
        let meta = fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        let mut keys = BTreeMap::new();
        if meta.is_dir() {
            check_dir(path, &meta)?;
            let root = fs::canonicalize(path).map_err(|e| bad(e.to_string()))?;
            let entries = fs::read_dir(path).map_err(|e| bad(e.to_string()))?;
            for entry in entries {
                let entry = entry.map_err(|e| bad(e.to_string()))?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with('.') {
                    continue;
                }
                let file = entry.path();
                let real = fs::canonicalize(&file).map_err(|e| bad(format!("{name}: {e}")))?;
                if !real.starts_with(&root) {
                    return Err(bad(format!("{name} points outside the key directory")));
                }
                if real.is_dir() {
                    continue;
                }
                let id = KeyId::new(&name)?;
                let key = read_key(&file, id.clone())?;
                keys.insert(id, Arc::new(key));
            }
            if keys.is_empty() {
                return Err(bad("the directory holds no key files".into()));
            }
        } else {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let id = KeyId::new(&name)?;
            let key = read_key(path, id.clone())?;
            keys.insert(id, Arc::new(key));
        }
        Ok(Self {
            source: path.to_owned(),
            keys,
        })
    }

    /// A ring of keys given as bytes, for tests and benchmarks that have no Secret volume.
    pub fn from_keys(source: &Path, keys: &[(&str, [u8; 32])]) -> Result<Self, KeyError> {
        let mut ring = BTreeMap::new();
        for (id, kek) in keys {
            let id = KeyId::new(id)?;
            ring.insert(id.clone(), Arc::new(SealKey::derive(id, kek)));
        }
        if ring.is_empty() {
            return Err(KeyError::Path {
                path: source.to_owned(),
                detail: "no keys given".into(),
            });
        }
        Ok(Self {
            source: source.to_owned(),
            keys: ring,
        })
    }

    /// Where the ring was read from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The key that seals new checkpoints: the id that sorts last.
    pub fn newest(&self) -> &Arc<SealKey> {
        self.keys.values().next_back().expect("a ring holds a key")
    }

    /// The key with `id`, or an error naming it and what the ring holds.
    pub fn get(&self, id: &KeyId) -> Result<&Arc<SealKey>, KeyError> {
        self.keys.get(id).ok_or_else(|| KeyError::Missing {
            id: id.clone(),
            path: self.source.clone(),
            held: self.ids().join(", "),
        })
    }

    /// The ids the ring holds, oldest first.
    pub fn ids(&self) -> Vec<String> {
        self.keys.keys().map(|k| k.as_str().to_owned()).collect()
    }
}

/// The uid key files must belong to: the agent's own (root in a deployment).
fn own_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn check_dir(path: &Path, meta: &fs::Metadata) -> Result<(), KeyError> {
    let mode = meta.permissions().mode() & 0o7777;
    let want_uid = own_uid();
    // A Secret volume is a tmpfs the kubelet mounts with the sticky bit and mode 1777 in some
    // versions; files in it are still checked one by one below, and nobody else can add a
    // file that passes those checks.
    let closed = mode & 0o077 == 0 || (mode & 0o1000 != 0 && meta.uid() == 0);
    if meta.uid() != want_uid || !closed {
        return Err(KeyError::Exposed {
            path: path.to_owned(),
            uid: meta.uid(),
            mode,
            want_uid,
        });
    }
    Ok(())
}

fn read_key(path: &Path, id: KeyId) -> Result<SealKey, KeyError> {
    let meta = fs::metadata(path).map_err(|e| KeyError::Path {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    let want_uid = own_uid();
    if meta.uid() != want_uid || mode & 0o077 != 0 || !meta.is_file() {
        return Err(KeyError::Exposed {
            path: path.to_owned(),
            uid: meta.uid(),
            mode,
            want_uid,
        });
    }
    let bytes = Zeroizing::new(fs::read(path).map_err(|e| KeyError::Path {
        path: path.to_owned(),
        detail: e.to_string(),
    })?);
    let kek = parse_key(&bytes).ok_or_else(|| KeyError::BadKey {
        path: path.to_owned(),
        len: bytes.len(),
    })?;
    Ok(SealKey::derive(id, &kek))
}

/// 32 raw bytes, or 64 hex digits with surrounding white space.
fn parse_key(bytes: &[u8]) -> Option<Zeroizing<[u8; 32]>> {
    let mut kek = Zeroizing::new([0u8; 32]);
    if bytes.len() == 32 {
        kek.copy_from_slice(bytes);
        return Some(kek);
    }
    let text = bytes.trim_ascii();
    if text.len() != 64 {
        return None;
    }
    for (out, pair) in kek.iter_mut().zip(text.chunks_exact(2)) {
        let digit = |c: u8| {
            char::from(c)
                .to_digit(16)
                .and_then(|d| u8::try_from(d).ok())
        };
        *out = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(kek)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn write_key(path: &Path, content: &[u8], mode: u32) {
        fs::write(path, content).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_directory_ring_uses_the_last_id_and_opens_with_every_key() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        write_key(&dir.path().join("2026-01-01"), &[7u8; 32], 0o400);
        write_key(
            &dir.path().join("2026-06-01"),
            format!("{}\n", "ab".repeat(32)).as_bytes(),
            0o600,
        );
        // A Secret volume's bookkeeping entries are skipped.
        fs::create_dir(dir.path().join("..data")).unwrap();
        let ring = KeyRing::load(dir.path()).unwrap();
        assert_eq!(ring.ids(), ["2026-01-01", "2026-06-01"]);
        assert_eq!(ring.newest().id().as_str(), "2026-06-01");
        let old = KeyId::new("2026-01-01").unwrap();
        assert_eq!(ring.get(&old).unwrap().id(), &old);
        let err = ring.get(&KeyId::new("1999").unwrap()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("\"1999\"") && msg.contains("2026-01-01, 2026-06-01"),
            "{msg}"
        );
        assert!(!format!("{ring:?}").contains("abab"));
    }

    #[test]
    fn exposed_short_relative_and_escaping_keys_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let key = dir.path().join("k1");
        write_key(&key, &[1u8; 32], 0o644);
        let err = KeyRing::load(&key).unwrap_err().to_string();
        assert!(err.contains("k1") && err.contains("0644"), "{err}");
        write_key(&key, b"too short", 0o600);
        let err = KeyRing::load(&key).unwrap_err().to_string();
        assert!(err.contains("found 9 bytes"), "{err}");
        assert!(!err.contains("too short"));
        let err = KeyRing::load(Path::new("keys/k1")).unwrap_err().to_string();
        assert!(err.contains("absolute"), "{err}");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let err = KeyRing::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("0755"), "{err}");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        write_key(&key, &[1u8; 32], 0o600);
        let outside = tempfile::NamedTempFile::new().unwrap();
        symlink(outside.path(), dir.path().join("k2")).unwrap();
        let err = KeyRing::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("outside the key directory"), "{err}");
    }

    #[test]
    fn key_ids_are_single_safe_names() {
        assert!(KeyId::new("2026-12-03").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(KeyId::new(bad).is_err(), "{bad:?}");
        }
    }
}
