//! What one key-encryption key (KEK) does: chunk addresses, sealed chunks, and the MACs of
//! manifests and checkpoint records, each with its own sub-key derived from the KEK.
//!
//! # Chunk addresses
//! A sealed chunk's address is the BLAKE3 keyed hash of its raw bytes under a sub-key of the
//! KEK. Equal plaintexts under one key get one address, so dedup keeps working; under two
//! keys they get unrelated addresses, so the store does not show which plaintexts are equal
//! across keys, and without the key an address says nothing about the bytes (a plain BLAKE3
//! would let anyone confirm a guessed page).
//!
//! # Keys and nonces
//! Each chunk is sealed with AES-256-GCM under its own key, derived from the KEK, the chunk's
//! address and its encoding (raw or zstd), with a fresh random 96-bit nonce stored beside it.
//! A (key, nonce) pair must never seal two different messages: that would reveal the XOR of
//! the two and GCM's authentication key. A fixed nonce is not enough here, because the sealed
//! message is the *encoded* chunk, which the address does not fix: the same raw bytes may be
//! stored as a zstd frame of another level or library version, or raw. So the key depends on
//! the address and encoding, which already narrows each key to the few times one chunk is
//! written (its first store, a rewrite after damage), and the random nonce makes a repeat among
//! those few a 2^-90 event. No counter has to be kept across nodes or restarts.
//!
//! The associated data binds the sealed bytes to the format version, the key id, the address,
//! the encoding and the raw length, so a chunk moved under another address, relabelled as
//! another encoding or presented as sealed by another key fails to open.

use std::fmt;

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use super::key_id::KeyId;

/// Bytes a sealed chunk adds to its encoded form: the GCM tag and the nonce.
pub const SEAL_OVERHEAD: usize = TAG_LEN + NONCE_LEN;
const TAG_LEN: usize = 16;
/// Version of the sealed chunk layout (`ciphertext ‖ tag ‖ nonce`), bound into every chunk.
const SEAL_FORMAT: u8 = 1;

const ADDRESS_CONTEXT: &str = "kybernate 2026-12-03 chunk address";
const CHUNK_CONTEXT: &str = "kybernate 2026-12-03 chunk sealing key";
const MANIFEST_CONTEXT: &str = "kybernate 2026-12-03 manifest authentication";
const RECORD_CONTEXT: &str = "kybernate 2026-12-03 checkpoint record authentication";

/// The sub-keys of one KEK, under its id. The KEK itself is not kept.
pub struct SealKey {
    id: KeyId,
    address: Zeroizing<[u8; 32]>,
    chunk: Zeroizing<[u8; 32]>,
    manifest: Zeroizing<[u8; 32]>,
    record: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealKey").field("id", &self.id).finish()
    }
}

/// A sealed chunk does not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Shorter than the tag and nonce.
    #[error("sealed chunk of {0} bytes is shorter than its tag and nonce")]
    Short(usize),
    /// The tag does not match: the bytes were changed, or sealed by another key or for
    /// another chunk.
    #[error("authentication failed under key {0}: the stored bytes were changed, or belong to another chunk or key")]
    Forged(KeyId),
}

impl SealKey {
    /// Derives the sub-keys of `kek`.
    pub(crate) fn derive(id: KeyId, kek: &[u8; 32]) -> Self {
        let sub = |context| Zeroizing::new(blake3::derive_key(context, kek));
        Self {
            id,
            address: sub(ADDRESS_CONTEXT),
            chunk: sub(CHUNK_CONTEXT),
            manifest: sub(MANIFEST_CONTEXT),
            record: sub(RECORD_CONTEXT),
        }
    }

    /// The key's id.
    pub fn id(&self) -> &KeyId {
        &self.id
    }

    /// The address of a chunk with these raw bytes.
    pub fn address(&self, raw: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.address, raw).as_bytes()
    }

    /// MAC of a manifest's header and body.
    pub fn manifest_mac(&self, bytes: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.manifest, bytes).as_bytes()
    }

    /// MAC of a checkpoint record.
    pub fn record_mac(&self, bytes: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.record, bytes).as_bytes()
    }

    fn chunk_cipher(&self, address: &[u8; 32], encoding: u8) -> LessSafeKey {
        let mut input = [0u8; 34];
        input[0] = SEAL_FORMAT;
        input[1] = encoding;
        input[2..].copy_from_slice(address);
        let key = Zeroizing::new(*blake3::keyed_hash(&self.chunk, &input).as_bytes());
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key[..]).expect("32-byte AES-256 key"))
    }

    fn aad(&self, address: &[u8; 32], encoding: u8, raw_len: u32) -> Vec<u8> {
        let mut aad = Vec::with_capacity(48 + self.id.as_str().len());
        aad.extend_from_slice(b"KYBC");
        aad.push(SEAL_FORMAT);
        aad.push(u8::try_from(self.id.as_str().len()).expect("key ids are at most 64 bytes"));
        aad.extend_from_slice(self.id.as_str().as_bytes());
        aad.extend_from_slice(address);
        aad.push(encoding);
        aad.extend_from_slice(&raw_len.to_le_bytes());
        aad
    }

    /// Seals the `len` encoded bytes at the start of `buf` in place and appends the tag and
    /// nonce; returns the sealed length (`len + SEAL_OVERHEAD`). `buf` must have room.
    /// `encoding` is the chunk's encoding byte in the manifest.
    pub fn seal_chunk(
        &self,
        address: &[u8; 32],
        encoding: u8,
        raw_len: u32,
        buf: &mut [u8],
        len: usize,
    ) -> usize {
        assert!(buf.len() >= len + SEAL_OVERHEAD, "no room for the tag");
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the kernel's random source is available");
        let tag = self
            .chunk_cipher(address, encoding)
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(self.aad(address, encoding, raw_len)),
                &mut buf[..len],
            )
            .expect("a chunk is far below GCM's message limit");
        buf[len..len + TAG_LEN].copy_from_slice(tag.as_ref());
        buf[len + TAG_LEN..len + SEAL_OVERHEAD].copy_from_slice(&nonce);
        len + SEAL_OVERHEAD
    }

    /// Opens a sealed chunk whose ciphertext was read into `ciphertext` (its place in the
    /// restored file) and whose tag and nonce into `trailer`, in place: a raw chunk's restore
    /// then needs no buffer and no copy.
    pub fn open_detached(
        &self,
        address: &[u8; 32],
        encoding: u8,
        raw_len: u32,
        ciphertext: &mut [u8],
        trailer: &[u8; SEAL_OVERHEAD],
    ) -> Result<(), SealError> {
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&trailer[..TAG_LEN]);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&trailer[TAG_LEN..]);
        self.chunk_cipher(address, encoding)
            .open_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(self.aad(address, encoding, raw_len)),
                Tag::from(tag),
                ciphertext,
                0..,
            )
            .map_err(|_| SealError::Forged(self.id.clone()))?;
        Ok(())
    }

    /// Opens a sealed chunk in place; returns the encoded bytes (a prefix of `stored`).
    pub fn open_chunk<'a>(
        &self,
        address: &[u8; 32],
        encoding: u8,
        raw_len: u32,
        stored: &'a mut [u8],
    ) -> Result<&'a [u8], SealError> {
        let total = stored.len();
        let Some(body_len) = total.checked_sub(NONCE_LEN).filter(|&n| n >= TAG_LEN) else {
            return Err(SealError::Short(total));
        };
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&stored[body_len..]);
        let opened = self
            .chunk_cipher(address, encoding)
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(self.aad(address, encoding, raw_len)),
                &mut stored[..body_len],
            )
            .map_err(|_| SealError::Forged(self.id.clone()))?;
        Ok(opened)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAW: u8 = 1;
    const ZSTD: u8 = 2;

    fn key(id: &str, b: u8) -> SealKey {
        SealKey::derive(KeyId::new(id).unwrap(), &[b; 32])
    }

    #[test]
    fn addresses_dedup_within_a_key_and_differ_across_keys() {
        let (a, b) = (key("a", 1), key("b", 2));
        assert_eq!(a.address(b"page"), a.address(b"page"));
        assert_ne!(a.address(b"page"), b.address(b"page"));
        assert_ne!(a.address(b"page"), *blake3::hash(b"page").as_bytes());
        assert_ne!(a.manifest_mac(b"m"), a.record_mac(b"m"));
    }

    #[test]
    fn a_sealed_chunk_opens_once_and_every_change_is_caught() {
        let k = key("k1", 9);
        let data = b"heap page with a secret token".to_vec();
        let addr = k.address(&data);
        let mut buf = data.clone();
        buf.resize(data.len() + SEAL_OVERHEAD, 0);
        let n = k.seal_chunk(&addr, RAW, 29, &mut buf, data.len());
        assert_eq!(n, data.len() + SEAL_OVERHEAD);
        assert!(!buf.windows(6).any(|w| w == b"secret"));
        let sealed = buf.clone();
        let opened = k.open_chunk(&addr, RAW, 29, &mut buf).unwrap();
        assert_eq!(opened, &data[..]);
        let mut detached = sealed[..data.len()].to_vec();
        let trailer: [u8; SEAL_OVERHEAD] = sealed[data.len()..].try_into().unwrap();
        k.open_detached(&addr, RAW, 29, &mut detached, &trailer)
            .unwrap();
        assert_eq!(detached, data);
        let mut detached = sealed[..data.len()].to_vec();
        assert!(k
            .open_detached(&addr, ZSTD, 29, &mut detached, &trailer)
            .is_err());
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(
                k.open_chunk(&addr, RAW, 29, &mut bad).is_err(),
                "flip at {i}"
            );
        }
        let mut other = sealed.clone();
        assert!(k.open_chunk(&addr, ZSTD, 29, &mut other).is_err());
        let mut other = sealed.clone();
        assert!(k.open_chunk(&addr, RAW, 30, &mut other).is_err());
        let mut other = sealed.clone();
        let err = key("k2", 9)
            .open_chunk(&addr, RAW, 29, &mut other)
            .unwrap_err();
        assert_eq!(err, SealError::Forged(KeyId::new("k2").unwrap()));
        let mut other = sealed.clone();
        assert!(k.open_chunk(&k.address(b"x"), RAW, 29, &mut other).is_err());
        assert_eq!(
            k.open_chunk(&addr, RAW, 29, &mut [0u8; 27]),
            Err(SealError::Short(27))
        );
    }

    #[test]
    fn sealing_the_same_chunk_twice_uses_fresh_nonces() {
        let k = key("k1", 3);
        let addr = k.address(b"abc");
        let seal = || {
            let mut buf = b"abc".to_vec();
            buf.resize(3 + SEAL_OVERHEAD, 0);
            k.seal_chunk(&addr, RAW, 3, &mut buf, 3);
            buf
        };
        assert_ne!(seal(), seal());
    }
}
