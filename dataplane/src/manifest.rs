//! The checkpoint manifest: the list of files and chunks of one image set.
//!
//! It is written last and is the commit point of a store: a checkpoint without a manifest does
//! not exist. Layout: magic (8 bytes), version (u32 LE), body length (u64 LE), body, 32 bytes of
//! check. Version 1 is a plain checkpoint and its check is the BLAKE3 of the body. Version 2 is
//! a sealed checkpoint: the body starts with the id of the key that sealed its chunks, and the
//! check is a keyed BLAKE3 MAC over header and body under a sub-key of that key, so nobody
//! without the key can change a chunk reference, swap the key id or graft another
//! checkpoint's manifest under this name. Reads are capped at [`MAX_MANIFEST_BYTES`] before
//! anything is allocated, and every field is checked, so a damaged manifest is an error, never
//! a wrong restore.

use std::io::{self, Read, Write};

use crate::chunk::{ChunkEncoding, ChunkHash, MAX_CHUNK_SIZE};
use crate::crypt::{KeyError, KeyId, KeyRing, SealKey, SEAL_OVERHEAD};
use crate::CheckpointName;

/// First bytes of every manifest.
pub const MANIFEST_MAGIC: [u8; 8] = *b"KYBMANIF";
/// Format version of plain checkpoints.
pub const MANIFEST_VERSION: u32 = 1;
/// Format version of sealed checkpoints (key id in the body, keyed MAC).
pub const MANIFEST_VERSION_SEALED: u32 = 2;
/// Largest manifest body accepted (a 1 TiB image at 8 MiB chunks needs about 8 MiB).
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// `pack` value of a chunk kept as its own object in a content-addressed chunk store.
const NO_PACK: u32 = u32::MAX;
const HEAD_LEN: usize = 20;

/// Where a stored chunk's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChunkLocation {
    /// In the tier's chunk store, under the chunk's hash (NVMe), or nowhere (zero chunks).
    Store,
    /// At `offset` in pack object number `pack` of [`CheckpointManifest::packs`] (S3).
    Pack {
        /// Index into [`CheckpointManifest::packs`].
        pack: u32,
        /// Byte offset inside the pack.
        offset: u64,
    },
}

/// One chunk of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkRef {
    /// The chunk's address (all zero bytes for [`ChunkEncoding::Zero`]).
    pub hash: ChunkHash,
    /// How the chunk is stored.
    pub encoding: ChunkEncoding,
    /// Length of the raw bytes.
    pub raw_len: u32,
    /// Length of the stored bytes (0 for zero chunks; with the tag and nonce when sealed).
    pub stored_len: u32,
    /// Where the stored bytes are.
    pub location: ChunkLocation,
}

/// One image file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    /// File name inside the image directory (one path component).
    pub name: String,
    /// File size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// The chunks, in file order.
    pub chunks: Vec<ChunkRef>,
}

/// Everything needed to rebuild an image set from a tier's chunks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointManifest {
    /// The checkpoint.
    pub name: CheckpointName,
    /// The key that sealed the chunks (and authenticates this manifest); `None`: plain.
    pub key_id: Option<KeyId>,
    /// Chunk size the files were cut with.
    pub chunk_size: u32,
    /// Pack objects referenced by [`ChunkLocation::Pack`] (keys relative to the tier prefix).
    pub packs: Vec<String>,
    /// The files, sorted by name.
    pub files: Vec<FileEntry>,
}

/// Why a manifest cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Reading or writing failed.
    #[error("manifest I/O: {0}")]
    Io(#[from] io::Error),
    /// The data does not start with [`MANIFEST_MAGIC`].
    #[error("not a manifest (bad magic)")]
    BadMagic,
    /// Written by a newer or unknown format version.
    #[error("unsupported manifest version {0}")]
    UnsupportedVersion(u32),
    /// The declared body is larger than [`MAX_MANIFEST_BYTES`].
    #[error("manifest body of {0} bytes exceeds the limit")]
    TooLarge(u64),
    /// The body does not match its checksum.
    #[error("manifest checksum mismatch")]
    Checksum,
    /// A sealed manifest's MAC does not match: it was changed, or is not from this key.
    #[error(
        "manifest authentication failed under key {0}: it was changed or not written with this key"
    )]
    Forged(KeyId),
    /// A sealed manifest whose key is not at hand.
    #[error("manifest is sealed with key {0:?}: {1}")]
    Key(String, KeyError),
    /// The body is well-formed bytes but not a valid manifest.
    #[error("malformed manifest: {0}")]
    Malformed(String),
}

impl CheckpointManifest {
    /// Sum of the file sizes.
    pub fn raw_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Serialises a plain manifest into `w`; a sealed one needs its key
    /// ([`CheckpointManifest::write_sealed`]).
    pub fn write_to<W: Write>(&self, w: W) -> Result<(), ManifestError> {
        if let Some(id) = &self.key_id {
            return Err(ManifestError::Malformed(format!(
                "manifest sealed with key {id} written without its key"
            )));
        }
        self.write_with(w, None)
    }

    /// Serialises a sealed manifest into `w`, authenticated under `key` (its
    /// [`CheckpointManifest::key_id`]).
    pub fn write_sealed<W: Write>(&self, w: W, key: &SealKey) -> Result<(), ManifestError> {
        if self.key_id.as_ref() != Some(key.id()) {
            return Err(ManifestError::Malformed(format!(
                "manifest names key {:?}, written with key {}",
                self.key_id,
                key.id()
            )));
        }
        self.write_with(w, Some(key))
    }

    fn write_with<W: Write>(&self, mut w: W, key: Option<&SealKey>) -> Result<(), ManifestError> {
        let mut body = Vec::new();
        if let Some(key) = key {
            put_str(&mut body, key.id().as_str());
        }
        put_str(&mut body, self.name.as_str());
        body.extend_from_slice(&self.chunk_size.to_le_bytes());
        put_u32(&mut body, self.packs.len());
        for p in &self.packs {
            put_str(&mut body, p);
        }
        put_u32(&mut body, self.files.len());
        for f in &self.files {
            put_str(&mut body, &f.name);
            body.extend_from_slice(&f.size.to_le_bytes());
            body.extend_from_slice(&f.mode.to_le_bytes());
            put_u32(&mut body, f.chunks.len());
            for c in &f.chunks {
                body.push(c.encoding.to_byte());
                body.extend_from_slice(&c.hash.0);
                body.extend_from_slice(&c.raw_len.to_le_bytes());
                body.extend_from_slice(&c.stored_len.to_le_bytes());
                let (pack, offset) = match c.location {
                    ChunkLocation::Store => (NO_PACK, 0),
                    ChunkLocation::Pack { pack, offset } => (pack, offset),
                };
                body.extend_from_slice(&pack.to_le_bytes());
                body.extend_from_slice(&offset.to_le_bytes());
            }
        }
        let body_len = u64::try_from(body.len()).expect("usize fits u64");
        if body_len > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(body_len));
        }
        let version = if key.is_some() {
            MANIFEST_VERSION_SEALED
        } else {
            MANIFEST_VERSION
        };
        let mut head = Vec::with_capacity(HEAD_LEN);
        head.extend_from_slice(&MANIFEST_MAGIC);
        head.extend_from_slice(&version.to_le_bytes());
        head.extend_from_slice(&body_len.to_le_bytes());
        let check = match key {
            Some(key) => key.manifest_mac(&[&head[..], &body[..]].concat()),
            None => *blake3::hash(&body).as_bytes(),
        };
        w.write_all(&head)?;
        w.write_all(&body)?;
        w.write_all(&check)?;
        w.flush()?;
        Ok(())
    }

    /// Parses and validates a plain manifest from `r`, reading at most the capped size; a
    /// sealed one is an error naming its key ([`CheckpointManifest::read_with_keys`]).
    pub fn read_from<R: Read>(r: R) -> Result<Self, ManifestError> {
        Self::read_with_keys(r, None)
    }

    /// Parses and validates a plain manifest, or a sealed one whose key `keys` holds, from
    /// `r`, reading at most the capped size.
    pub fn read_with_keys<R: Read>(
        mut r: R,
        keys: Option<&KeyRing>,
    ) -> Result<Self, ManifestError> {
        let mut head = [0u8; HEAD_LEN];
        r.read_exact(&mut head)?;
        if head[..8] != MANIFEST_MAGIC {
            return Err(ManifestError::BadMagic);
        }
        let version = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
        if version != MANIFEST_VERSION && version != MANIFEST_VERSION_SEALED {
            return Err(ManifestError::UnsupportedVersion(version));
        }
        let body_len = u64::from_le_bytes(head[12..20].try_into().expect("8 bytes"));
        if body_len > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(body_len));
        }
        let mut body = vec![0u8; usize::try_from(body_len).expect("capped length fits usize")];
        r.read_exact(&mut body)?;
        let mut sum = [0u8; 32];
        r.read_exact(&mut sum)?;
        if version == MANIFEST_VERSION {
            if blake3::hash(&body).as_bytes() != &sum {
                return Err(ManifestError::Checksum);
            }
            return parse_body(Cursor(&body), None);
        }
        // The key id is read before the MAC is checked, only to find the key.
        let mut c = Cursor(&body);
        let id_text = c.string()?;
        let id = KeyId::new(&id_text).map_err(|e| ManifestError::Key(id_text.clone(), e.into()))?;
        let key = match keys {
            Some(ring) => ring.get(&id).map_err(|e| ManifestError::Key(id_text, e))?,
            None => {
                return Err(ManifestError::Key(
                    id_text,
                    KeyError::Path {
                        path: Default::default(),
                        detail: "no encryption key is configured".into(),
                    },
                ))
            }
        };
        let mac = key.manifest_mac(&[&head[..], &body[..]].concat());
        if !constant_time_eq(&mac, &sum) {
            return Err(ManifestError::Forged(id));
        }
        parse_body(c, Some(id))
    }
}

/// Compares two MACs without an early exit, so timing shows nothing of a near miss.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).expect("names are validated shorter than 64 KiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).expect("count fits u32").to_le_bytes());
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ManifestError> {
        if self.0.len() < n {
            return Err(ManifestError::Malformed("body ends early".into()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, ManifestError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, ManifestError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, ManifestError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn string(&mut self) -> Result<String, ManifestError> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().expect("2"));
        let bytes = self.take(usize::from(len))?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| ManifestError::Malformed("name is not UTF-8".into()))
    }
    /// A count of items that each take at least `min_item` bytes, checked against what is left.
    fn count(&mut self, min_item: usize) -> Result<usize, ManifestError> {
        let n = usize::try_from(self.u32()?).expect("u32 fits usize");
        if n.saturating_mul(min_item) > self.0.len() {
            return Err(ManifestError::Malformed(format!(
                "count {n} exceeds the body"
            )));
        }
        Ok(n)
    }
}

fn malformed(msg: String) -> ManifestError {
    ManifestError::Malformed(msg)
}

fn parse_body(
    mut c: Cursor<'_>,
    key_id: Option<KeyId>,
) -> Result<CheckpointManifest, ManifestError> {
    let overhead = if key_id.is_some() {
        u32::try_from(SEAL_OVERHEAD).expect("small")
    } else {
        0
    };
    let name = c.string()?;
    let name = CheckpointName::new(&name).map_err(|e| malformed(e.to_string()))?;
    let chunk_size = c.u32()?;
    if chunk_size == 0 || usize::try_from(chunk_size).map_or(true, |s| s > MAX_CHUNK_SIZE) {
        return Err(malformed(format!("chunk size {chunk_size}")));
    }
    let pack_count = c.count(2)?;
    let mut packs = Vec::with_capacity(pack_count);
    for _ in 0..pack_count {
        packs.push(c.string()?);
    }
    let file_count = c.count(18)?;
    let mut files: Vec<FileEntry> = Vec::with_capacity(file_count);
    for _ in 0..file_count {
        let fname = c.string()?;
        if fname.is_empty() || fname == "." || fname == ".." || fname.contains(['/', '\0']) {
            return Err(malformed(format!(
                "file name {fname:?} is not one path component"
            )));
        }
        if files.last().is_some_and(|prev| prev.name >= fname) {
            return Err(malformed(format!(
                "file {fname:?} is out of order or repeated"
            )));
        }
        let size = c.u64()?;
        let mode = c.u32()?;
        let chunk_count = c.count(53)?;
        let mut chunks = Vec::with_capacity(chunk_count);
        let mut covered = 0u64;
        for i in 0..chunk_count {
            let enc = c.u8()?;
            let encoding = ChunkEncoding::from_byte(enc)
                .ok_or_else(|| malformed(format!("file {fname} chunk {i}: encoding {enc}")))?;
            let hash = ChunkHash(c.take(32)?.try_into().expect("32"));
            let raw_len = c.u32()?;
            let stored_len = c.u32()?;
            let pack = c.u32()?;
            let offset = c.u64()?;
            let bad_len = raw_len == 0
                || raw_len > chunk_size
                || match encoding {
                    ChunkEncoding::Zero => stored_len != 0,
                    ChunkEncoding::Raw => stored_len.checked_sub(overhead) != Some(raw_len),
                    ChunkEncoding::Zstd => stored_len
                        .checked_sub(overhead)
                        .is_none_or(|n| n == 0 || n >= raw_len),
                };
            if bad_len {
                return Err(malformed(format!(
                    "file {fname} chunk {i}: lengths raw {raw_len} stored {stored_len} for {encoding:?}"
                )));
            }
            let location = if pack == NO_PACK {
                ChunkLocation::Store
            } else if usize::try_from(pack).is_ok_and(|p| p < packs.len()) {
                ChunkLocation::Pack { pack, offset }
            } else {
                return Err(malformed(format!(
                    "file {fname} chunk {i}: pack {pack} unknown"
                )));
            };
            covered += u64::from(raw_len);
            chunks.push(ChunkRef {
                hash,
                encoding,
                raw_len,
                stored_len,
                location,
            });
        }
        if covered != size {
            return Err(malformed(format!(
                "file {fname}: chunks cover {covered} of {size} bytes"
            )));
        }
        files.push(FileEntry {
            name: fname,
            size,
            mode,
            chunks,
        });
    }
    if !c.0.is_empty() {
        return Err(malformed(format!("{} trailing bytes", c.0.len())));
    }
    Ok(CheckpointManifest {
        name,
        key_id,
        chunk_size,
        packs,
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CheckpointManifest {
        let chunk = |b: u8, encoding, stored_len, location| ChunkRef {
            hash: ChunkHash([b; 32]),
            encoding,
            raw_len: 4096,
            stored_len,
            location,
        };
        CheckpointManifest {
            name: CheckpointName::new("cp-1").unwrap(),
            key_id: None,
            chunk_size: 4096,
            packs: vec!["packs/cp-1-0.pack".into()],
            files: vec![
                FileEntry {
                    name: "core-1.img".into(),
                    size: 0,
                    mode: 0o600,
                    chunks: vec![],
                },
                FileEntry {
                    name: "pages-1.img".into(),
                    size: 12288,
                    mode: 0o644,
                    chunks: vec![
                        chunk(0, ChunkEncoding::Zero, 0, ChunkLocation::Store),
                        chunk(1, ChunkEncoding::Raw, 4096, ChunkLocation::Store),
                        chunk(
                            2,
                            ChunkEncoding::Zstd,
                            100,
                            ChunkLocation::Pack {
                                pack: 0,
                                offset: 4096,
                            },
                        ),
                    ],
                },
            ],
        }
    }

    fn encoded() -> Vec<u8> {
        let mut buf = Vec::new();
        sample().write_to(&mut buf).unwrap();
        buf
    }

    #[test]
    fn round_trips_through_a_vec() {
        let back = CheckpointManifest::read_from(&encoded()[..]).unwrap();
        assert_eq!(back, sample());
        assert_eq!(back.raw_bytes(), 12288);
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_an_error() {
        let good = encoded();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(
                CheckpointManifest::read_from(&bad[..]).is_err(),
                "flip at {i}"
            );
            assert!(
                CheckpointManifest::read_from(&good[..i]).is_err(),
                "cut at {i}"
            );
        }
    }

    #[test]
    fn header_errors_are_specific() {
        let mut bad = encoded();
        bad[0] = b'X';
        assert!(matches!(
            CheckpointManifest::read_from(&bad[..]),
            Err(ManifestError::BadMagic)
        ));
        let mut bad = encoded();
        bad[8] = 9;
        assert!(matches!(
            CheckpointManifest::read_from(&bad[..]),
            Err(ManifestError::UnsupportedVersion(9))
        ));
        let mut bad = encoded();
        bad[12..20].copy_from_slice(&(MAX_MANIFEST_BYTES + 1).to_le_bytes());
        assert!(matches!(
            CheckpointManifest::read_from(&bad[..]),
            Err(ManifestError::TooLarge(_))
        ));
        let mut bad = encoded();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert!(matches!(
            CheckpointManifest::read_from(&bad[..]),
            Err(ManifestError::Checksum)
        ));
    }

    struct FailingReader;
    impl Read for FailingReader {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::other("disk went away"))
        }
    }

    struct FailingWriter;
    impl Write for FailingWriter {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("disk went away"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn io_failures_surface() {
        let err = CheckpointManifest::read_from(FailingReader).unwrap_err();
        assert!(err.to_string().contains("disk went away"), "{err}");
        let err = sample().write_to(FailingWriter).unwrap_err();
        assert!(err.to_string().contains("disk went away"), "{err}");
    }

    #[test]
    fn semantic_checks_reject_escaping_names_and_wrong_coverage() {
        let mut m = sample();
        m.files[1].name = "../etc".into();
        let mut buf = Vec::new();
        m.write_to(&mut buf).unwrap();
        let err = CheckpointManifest::read_from(&buf[..]).unwrap_err();
        assert!(err.to_string().contains("path component"), "{err}");
        let mut m = sample();
        m.files[1].size = 9999;
        let mut buf = Vec::new();
        m.write_to(&mut buf).unwrap();
        let err = CheckpointManifest::read_from(&buf[..]).unwrap_err();
        assert!(err.to_string().contains("cover"), "{err}");
    }
}

#[cfg(test)]
mod sealed_tests {
    use super::*;
    use std::path::Path;

    fn ring() -> KeyRing {
        KeyRing::from_keys(Path::new("/keys"), &[("k1", [1; 32]), ("k2", [2; 32])]).unwrap()
    }

    fn sealed(key: &SealKey) -> (CheckpointManifest, Vec<u8>) {
        let m = CheckpointManifest {
            name: CheckpointName::new("cp-s").unwrap(),
            key_id: Some(key.id().clone()),
            chunk_size: 4096,
            packs: vec![],
            files: vec![FileEntry {
                name: "pages-1.img".into(),
                size: 8192,
                mode: 0o600,
                chunks: vec![
                    ChunkRef {
                        hash: ChunkHash(key.address(b"a")),
                        encoding: ChunkEncoding::Raw,
                        raw_len: 4096,
                        stored_len: 4096 + 28,
                        location: ChunkLocation::Store,
                    },
                    ChunkRef {
                        hash: ChunkHash(key.address(b"b")),
                        encoding: ChunkEncoding::Zstd,
                        raw_len: 4096,
                        stored_len: 100 + 28,
                        location: ChunkLocation::Store,
                    },
                ],
            }],
        };
        let mut buf = Vec::new();
        m.write_sealed(&mut buf, key).unwrap();
        (m, buf)
    }

    #[test]
    fn a_sealed_manifest_round_trips_and_every_flipped_byte_is_caught() {
        let ring = ring();
        let key = ring.get(&KeyId::new("k1").unwrap()).unwrap();
        let (m, buf) = sealed(key);
        assert_eq!(
            CheckpointManifest::read_with_keys(&buf[..], Some(&ring)).unwrap(),
            m
        );
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            assert!(
                CheckpointManifest::read_with_keys(&bad[..], Some(&ring)).is_err(),
                "flip at {i}"
            );
        }
        let err = CheckpointManifest::read_from(&buf[..])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"k1\"") && err.contains("no encryption key"),
            "{err}"
        );
        assert!(m.write_to(Vec::new()).is_err());
    }

    #[test]
    fn a_manifest_relabelled_with_another_key_or_a_missing_key_is_refused_by_name() {
        let ring = ring();
        let k1 = ring.get(&KeyId::new("k1").unwrap()).unwrap();
        let (_, buf) = sealed(k1);
        // Same-length id, MAC left as it was: the MAC under k2 does not match.
        let mut swapped = buf.clone();
        let at = HEAD_LEN + 2;
        swapped[at + 1] = b'2';
        let err = CheckpointManifest::read_with_keys(&swapped[..], Some(&ring)).unwrap_err();
        assert!(matches!(err, ManifestError::Forged(_)), "{err}");
        let only_k2 = KeyRing::from_keys(Path::new("/keys"), &[("k2", [2; 32])]).unwrap();
        let err = CheckpointManifest::read_with_keys(&buf[..], Some(&only_k2))
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"k1\"") && err.contains("/keys"), "{err}");
        let wrong_bytes = KeyRing::from_keys(Path::new("/keys"), &[("k1", [9; 32])]).unwrap();
        let err = CheckpointManifest::read_with_keys(&buf[..], Some(&wrong_bytes)).unwrap_err();
        assert!(matches!(err, ManifestError::Forged(_)), "{err}");
    }
}
