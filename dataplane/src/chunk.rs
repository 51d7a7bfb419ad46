//! One chunk of an image file: its content address, how it is encoded, and the encoder and
//! decoder every tier shares, so a chunk stored by one tier reads back the same in any other.

use std::fmt;

use crate::crypt::{SealError, SealKey};

/// Default chunk size: large enough for zstd to find redundancy and for O_DIRECT writes to
/// run at disk speed, small enough that a changed page costs little in a second checkpoint.
pub const DEFAULT_CHUNK_SIZE: usize = 8 << 20;
/// Alignment of chunk sizes and of I/O buffers (O_DIRECT needs the logical block size).
pub const IO_ALIGN: usize = 4096;
/// Smallest accepted chunk size.
pub const MIN_CHUNK_SIZE: usize = IO_ALIGN;
/// Largest accepted chunk size (lengths are stored as `u32` in the manifest).
pub const MAX_CHUNK_SIZE: usize = 256 << 20;

/// A chunk's address in every tier's chunk store: the BLAKE3 hash of its raw bytes, keyed
/// under the checkpoint's key when it is sealed (see `crypt`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    /// Stands for an all-zero chunk, which is recorded and never hashed or stored.
    pub const ZERO: ChunkHash = ChunkHash([0; 32]);

    /// Parses [`ChunkHash::to_hex`].
    pub fn from_hex(hex: &str) -> Option<Self> {
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            let digit = |c: u8| {
                char::from(c)
                    .to_digit(16)
                    .and_then(|d| u8::try_from(d).ok())
            };
            *o = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Some(Self(out))
    }

    /// Hashes raw chunk bytes.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// Lower-case hex form, used as file and object names.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 15)]));
        }
        s
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({})", &self.to_hex()[..16])
    }
}

/// How a chunk's bytes are kept in a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChunkEncoding {
    /// All zeros: recorded in the manifest, never stored.
    Zero,
    /// Stored as is, because compression did not save enough.
    Raw,
    /// One independent zstd frame.
    Zstd,
}

impl ChunkEncoding {
    /// Wire value in the manifest.
    pub fn to_byte(self) -> u8 {
        match self {
            ChunkEncoding::Zero => 0,
            ChunkEncoding::Raw => 1,
            ChunkEncoding::Zstd => 2,
        }
    }

    /// Parses [`ChunkEncoding::to_byte`].
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(ChunkEncoding::Zero),
            1 => Some(ChunkEncoding::Raw),
            2 => Some(ChunkEncoding::Zstd),
            _ => None,
        }
    }
}

/// Knobs of the chunk pipeline; the agent fills them from its config file (every field is
/// optional there, defaults below).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChunkConfig {
    /// Chunk size in bytes, a multiple of 4096 between 4 KiB and 256 MiB.
    pub chunk_size: usize,
    /// zstd level (1..=19); 1 keeps compression faster than the disk.
    pub zstd_level: i32,
    /// Chunks hashed and compressed at once, node-wide (the data plane's worker permits, and
    /// the threads of each transfer); 0 means one per core. Checkpoints and restores may use
    /// them all: the workload is frozen, or not running yet.
    pub workers: usize,
    /// Of those, how many prefetches and background drains may use together, so the work
    /// running beside the workload leaves its threads the rest; 0 means half of `workers`,
    /// at least one.
    pub background_workers: usize,
    /// A compressed chunk is kept only if it is at most this many percent of the raw size.
    pub max_compressed_percent: u8,
    /// Store new chunks raw while the destination's writer has too little queued to stay busy
    /// during a compression (the device is faster than zstd on the available cores), and
    /// compress them while it is backed up. `false` compresses every chunk that shrinks enough.
    /// Either way each chunk is an independent, verifiable unit; only the stored size differs.
    pub adaptive: bool,
}

impl Default for ChunkConfig {
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            zstd_level: 1,
            workers: 0,
            background_workers: 0,
            max_compressed_percent: 95,
            adaptive: true,
        }
    }
}

impl ChunkConfig {
    /// Checks the values; returns why they cannot work.
    pub fn validate(&self) -> Result<(), String> {
        if !self.chunk_size.is_multiple_of(IO_ALIGN)
            || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size)
        {
            return Err(format!(
                "chunk_size {} must be a multiple of 4096 between 4 KiB and 256 MiB",
                self.chunk_size
            ));
        }
        if !(1..=19).contains(&self.zstd_level) {
            return Err(format!("zstd_level {} is not in 1..=19", self.zstd_level));
        }
        if !(1..=100).contains(&self.max_compressed_percent) {
            return Err("max_compressed_percent must be in 1..=100".into());
        }
        Ok(())
    }

    /// Number of chunks worked on at once (see [`ChunkConfig::workers`]).
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            return self.workers;
        }
        std::thread::available_parallelism().map_or(2, |n| n.get())
    }

    /// Permits prefetch and background work may hold (see [`ChunkConfig::background_workers`]).
    pub fn background_worker_count(&self) -> usize {
        let all = self.worker_count();
        match self.background_workers {
            0 => (all / 2).max(1),
            n => n.min(all),
        }
    }

    /// Longest compressed output that is still worth storing.
    pub(crate) fn compressed_limit(&self, raw_len: usize) -> usize {
        raw_len / 100 * usize::from(self.max_compressed_percent)
    }
}

/// The address of a chunk with these raw bytes: keyed under `key` for a sealed checkpoint,
/// plain BLAKE3 without.
pub(crate) fn address_of(key: Option<&SealKey>, raw: &[u8]) -> ChunkHash {
    match key {
        Some(key) => ChunkHash(key.address(raw)),
        None => ChunkHash::of(raw),
    }
}

/// Seals the `len` encoded bytes at the start of `buf` under `key` (appending tag and nonce)
/// and returns the stored length; without a key the bytes stay as they are.
pub(crate) fn seal_stored(
    key: Option<&SealKey>,
    hash: &ChunkHash,
    encoding: ChunkEncoding,
    raw_len: u32,
    buf: &mut [u8],
    len: usize,
) -> usize {
    match key {
        Some(key) => key.seal_chunk(&hash.0, encoding.to_byte(), raw_len, buf, len),
        None => len,
    }
}

/// Opens the stored bytes of a chunk in place when `key` sealed them; returns the encoded
/// bytes.
pub(crate) fn open_stored<'a>(
    key: Option<&SealKey>,
    hash: &ChunkHash,
    encoding: ChunkEncoding,
    raw_len: u32,
    stored: &'a mut [u8],
) -> Result<&'a [u8], ChunkDecodeError> {
    match key {
        None => Ok(stored),
        Some(key) => key
            .open_chunk(&hash.0, encoding.to_byte(), raw_len, stored)
            .map_err(ChunkDecodeError::Seal),
    }
}

/// Whether every byte of `data` is zero; vectorises well, so it runs at memory speed.
pub fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(64);
    let all_words = words
        .by_ref()
        .all(|w| w.iter().fold(0u8, |acc, &b| acc | b) == 0);
    all_words && words.remainder().iter().all(|&b| b == 0)
}

/// Length of each sample compressed before a whole chunk.
const SAMPLE_LEN: usize = 16 << 10;
/// Samples taken, spread over the chunk.
const SAMPLES: usize = 4;

/// Encodes one non-zero chunk into `out` (at least `raw.len()` bytes long) with a reused
/// compressor; returns the encoding and the number of bytes written to `out`.
///
/// A large chunk is first judged by compressing a few small samples spread over it (about 1%
/// of the work): if they do not shrink by the configured margin, the chunk is stored raw
/// without compressing it whole (real bf16 weights, already compressed data).
pub(crate) fn encode_into(
    raw: &[u8],
    config: &ChunkConfig,
    compressor: &mut zstd::bulk::Compressor<'_>,
    out: &mut [u8],
) -> (ChunkEncoding, usize) {
    if raw.len() >= SAMPLES * SAMPLE_LEN * 8 && !samples_shrink(raw, config, compressor, out) {
        return store_raw(raw, out);
    }
    let limit = config.compressed_limit(raw.len()).min(out.len());
    // A destination smaller than the limit makes zstd fail fast on data that would not
    // shrink enough; such chunks are stored raw.
    match compressor.compress_to_buffer(raw, &mut out[..limit]) {
        Ok(n) if n < raw.len() => (ChunkEncoding::Zstd, n),
        _ => store_raw(raw, out),
    }
}

/// Copies a chunk as is into `out`.
pub(crate) fn store_raw(raw: &[u8], out: &mut [u8]) -> (ChunkEncoding, usize) {
    out[..raw.len()].copy_from_slice(raw);
    (ChunkEncoding::Raw, raw.len())
}

/// Whether samples of `raw` compress to within the configured margin; `scratch` is reused.
fn samples_shrink(
    raw: &[u8],
    config: &ChunkConfig,
    compressor: &mut zstd::bulk::Compressor<'_>,
    scratch: &mut [u8],
) -> bool {
    let stride = raw.len() / SAMPLES;
    let mut packed = 0usize;
    for i in 0..SAMPLES {
        let sample = &raw[i * stride..i * stride + SAMPLE_LEN];
        match compressor.compress_to_buffer(sample, &mut scratch[..SAMPLE_LEN]) {
            Ok(n) => packed += n,
            Err(_) => packed += SAMPLE_LEN,
        }
    }
    packed <= config.compressed_limit(SAMPLES * SAMPLE_LEN)
}

/// Why a stored chunk does not decode to the bytes its hash names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkDecodeError {
    /// The stored bytes are not a valid zstd frame.
    #[error("zstd frame does not decode: {0}")]
    Zstd(String),
    /// The stored or decoded length differs from the manifest.
    #[error("expected {expected} bytes, got {actual}")]
    Length {
        /// Length the manifest records.
        expected: usize,
        /// Length found.
        actual: usize,
    },
    /// The sealed bytes do not open under the checkpoint's key.
    #[error("{0}")]
    Seal(SealError),
    /// The decoded bytes hash to something else.
    #[error("content hash mismatch: expected {expected}, got {actual}")]
    Hash {
        /// Hash the manifest records.
        expected: ChunkHash,
        /// Hash of the decoded bytes.
        actual: ChunkHash,
    },
}

/// Decodes stored (already opened) chunk bytes into `dest` (exactly the raw length) and
/// verifies the address, keyed under `key` when the checkpoint is sealed.
pub(crate) fn decode_into(
    encoding: ChunkEncoding,
    stored: &[u8],
    expected: &ChunkHash,
    key: Option<&SealKey>,
    decompressor: &mut zstd::bulk::Decompressor<'_>,
    dest: &mut [u8],
) -> Result<(), ChunkDecodeError> {
    match encoding {
        ChunkEncoding::Zero => {
            dest.fill(0);
            return Ok(());
        }
        ChunkEncoding::Raw => {
            if stored.len() != dest.len() {
                return Err(ChunkDecodeError::Length {
                    expected: dest.len(),
                    actual: stored.len(),
                });
            }
            dest.copy_from_slice(stored);
        }
        ChunkEncoding::Zstd => {
            let n = decompressor
                .decompress_to_buffer(stored, dest)
                .map_err(|e| ChunkDecodeError::Zstd(e.to_string()))?;
            if n != dest.len() {
                return Err(ChunkDecodeError::Length {
                    expected: dest.len(),
                    actual: n,
                });
            }
        }
    }
    verify(dest, expected, key)
}

/// Checks that `raw` has the address `expected` (keyed under `key` when sealed).
pub(crate) fn verify(
    raw: &[u8],
    expected: &ChunkHash,
    key: Option<&SealKey>,
) -> Result<(), ChunkDecodeError> {
    let actual = address_of(key, raw);
    if actual != *expected {
        return Err(ChunkDecodeError::Hash {
            expected: *expected,
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_junk() {
        let h = ChunkHash::of(b"chunk");
        assert_eq!(ChunkHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(ChunkHash::from_hex("ab"), None);
        assert_eq!(ChunkHash::from_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn zero_detection_sees_a_single_set_byte_anywhere() {
        let mut data = vec![0u8; 4096 + 7];
        assert!(is_zero(&data));
        for i in [0, 63, 64, 4095, 4096 + 6] {
            data[i] = 1;
            assert!(!is_zero(&data), "byte {i}");
            data[i] = 0;
        }
    }

    #[test]
    fn encode_decode_round_trip_picks_raw_for_noise() {
        let config = ChunkConfig::default();
        let mut c = zstd::bulk::Compressor::new(1).unwrap();
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        let text: Vec<u8> = (0..65536u32).map(|i| (i % 7) as u8 + b'a').collect();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[5]
            })
            .collect();
        for (data, want) in [(&text, ChunkEncoding::Zstd), (&noise, ChunkEncoding::Raw)] {
            let mut out = vec![0u8; data.len()];
            let (enc, n) = encode_into(data, &config, &mut c, &mut out);
            assert_eq!(enc, want);
            let mut back = vec![0u8; data.len()];
            decode_into(
                enc,
                &out[..n],
                &ChunkHash::of(data),
                None,
                &mut d,
                &mut back,
            )
            .unwrap();
            assert_eq!(&back, data);
        }
    }

    #[test]
    fn samples_send_an_incompressible_chunk_raw_and_keep_a_compressible_one() {
        let config = ChunkConfig::default();
        let mut c = zstd::bulk::Compressor::new(1).unwrap();
        let len = 1 << 20;
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[3]
            })
            .collect();
        let text: Vec<u8> = (0..len).map(|i| b"kybernate "[i % 10]).collect();
        let mut out = vec![0u8; len];
        assert!(!samples_shrink(&noise, &config, &mut c, &mut out));
        assert_eq!(
            encode_into(&noise, &config, &mut c, &mut out).0,
            ChunkEncoding::Raw
        );
        assert_eq!(&out[..len], &noise[..]);
        assert!(samples_shrink(&text, &config, &mut c, &mut out));
        assert_eq!(
            encode_into(&text, &config, &mut c, &mut out).0,
            ChunkEncoding::Zstd
        );
    }

    #[test]
    fn decode_rejects_wrong_hash_and_bad_frames() {
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        let mut dest = vec![0u8; 4];
        let err = decode_into(
            ChunkEncoding::Raw,
            b"abcd",
            &ChunkHash::of(b"abce"),
            None,
            &mut d,
            &mut dest,
        )
        .unwrap_err();
        assert!(matches!(err, ChunkDecodeError::Hash { .. }), "{err}");
        let err = decode_into(
            ChunkEncoding::Zstd,
            b"junk",
            &ChunkHash::of(b"abcd"),
            None,
            &mut d,
            &mut dest,
        )
        .unwrap_err();
        assert!(matches!(err, ChunkDecodeError::Zstd(_)), "{err}");
    }

    #[test]
    fn config_validation_names_the_bad_value() {
        let bad = ChunkConfig {
            chunk_size: 5000,
            ..ChunkConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("5000"));
        let bad = ChunkConfig {
            zstd_level: 0,
            ..ChunkConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("zstd_level"));
        ChunkConfig::default().validate().unwrap();
    }
}
