//! Encryption at rest through the NVMe and S3 tiers: round trips, tampering, key rotation,
//! wrong and missing keys, and checkpoints written before encryption was turned on.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::s3_server::{S3Server, ACCESS_KEY, BUCKET, SECRET_KEY};
use common::{new_dir, read_dir_files, write_file, Fill};
use kybernate_dataplane::{
    CheckpointName, ChunkConfig, ChunkEncoding, DataPlane, IoMode, KeyRing, NvmeTier, S3Config,
    S3Tier, Sealing, Secret, Tier, TierError, MANIFEST_VERSION_SEALED, MIN_PART_SIZE,
};

const MIB: usize = 1 << 20;
/// Written into the image so a test can look for it in what the tiers store.
const SECRET_MARK: &[u8] = b"tenant-a-api-token=7f3c9e1d";

fn name(s: &str) -> CheckpointName {
    CheckpointName::new(s).unwrap()
}

fn config() -> ChunkConfig {
    ChunkConfig {
        chunk_size: MIB,
        workers: 2,
        ..ChunkConfig::default()
    }
}

/// A key directory as a Secret volume with `defaultMode: 0400` gives it.
fn key_dir(root: &Path, keys: &[(&str, u8)]) -> PathBuf {
    let dir = root.join("keys");
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    for (id, byte) in keys {
        let path = dir.join(id);
        fs::write(&path, format!("{}\n", format!("{byte:02x}").repeat(32))).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
    }
    dir
}

fn ring(dir: &Path) -> Arc<KeyRing> {
    Arc::new(KeyRing::load(dir).unwrap())
}

/// About 6 MiB: zero pages, noise, a compressible heap with a secret in it.
fn image(dir: &Path, seed: u64) {
    write_file(
        &dir.join("pages-1.img"),
        &[
            (Fill::Zero, MIB),
            (Fill::Noise(seed), 2 * MIB),
            (Fill::Text(seed), 2 * MIB + 77),
        ],
    );
    let mut heap = Vec::new();
    for _ in 0..2000 {
        heap.extend_from_slice(SECRET_MARK);
    }
    fs::write(dir.join("pages-2.img"), &heap).unwrap();
    write_file(&dir.join("core-1.img"), &[(Fill::Text(seed + 1), 5000)]);
}

fn nvme(root: &Path, sealing: Sealing) -> NvmeTier {
    let plane = DataPlane::start(IoMode::Auto, &config()).unwrap();
    NvmeTier::open_sealed(root.join("nvme"), config(), plane, sealing).unwrap()
}

fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(all_files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn nvme_round_trip_seals_every_chunk_and_dedups_within_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = key_dir(tmp.path(), &[("2026-12-01", 1)]);
    let tier = nvme(tmp.path(), Sealing::sealed(ring(&keys)));
    let src = new_dir(tmp.path(), "src");
    image(&src, 1);
    let (_, first) = tier.store_with_stats(&name("cp-1"), &src).unwrap();
    assert!(first.new_chunks > 0);

    let manifest = tier.manifest(&name("cp-1")).unwrap();
    assert_eq!(manifest.key_id.as_ref().unwrap().as_str(), "2026-12-01");
    let on_disk = fs::read(tier.manifest_path(&name("cp-1"))).unwrap();
    assert_eq!(
        u32::from_le_bytes(on_disk[8..12].try_into().unwrap()),
        MANIFEST_VERSION_SEALED
    );
    for path in all_files(&tier.root().join("chunks")) {
        let bytes = fs::read(&path).unwrap();
        assert!(
            !contains(&bytes, SECRET_MARK),
            "{} holds plaintext",
            path.display()
        );
    }
    // Addresses are keyed: the plain BLAKE3 of a chunk names no file.
    let text = fs::read(src.join("pages-1.img")).unwrap();
    let plain = kybernate_dataplane::ChunkHash::of(&text[MIB..2 * MIB]);
    assert!(!tier.chunk_path(&plain).exists());

    let dest = new_dir(tmp.path(), "dest");
    tier.load(&name("cp-1"), &dest).unwrap();
    assert_eq!(read_dir_files(&dest), read_dir_files(&src));

    let (_, second) = tier.store_with_stats(&name("cp-2"), &src).unwrap();
    assert_eq!(second.new_chunks, 0, "{second:?}");
    assert!(second.dedup_bytes > 0);

    // Reopened (chunks verified from disk, not from memory), dedup still holds.
    drop(tier);
    let tier = nvme(tmp.path(), Sealing::sealed(ring(&keys)));
    let (_, third) = tier.store_with_stats(&name("cp-3"), &src).unwrap();
    assert_eq!(third.new_chunks, 0, "{third:?}");
    let dest = new_dir(tmp.path(), "dest-3");
    tier.load(&name("cp-3"), &dest).unwrap();
    assert_eq!(read_dir_files(&dest), read_dir_files(&src));
}

#[test]
fn a_flipped_byte_in_a_chunk_or_manifest_is_named_and_never_restored() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = key_dir(tmp.path(), &[("k1", 1)]);
    let tier = nvme(tmp.path(), Sealing::sealed(ring(&keys)));
    let src = new_dir(tmp.path(), "src");
    image(&src, 2);
    tier.store(&name("cp"), &src).unwrap();
    let manifest = tier.manifest(&name("cp")).unwrap();
    let file = manifest
        .files
        .iter()
        .find(|f| f.name == "pages-1.img")
        .unwrap();
    let (index, chunk) = file
        .chunks
        .iter()
        .enumerate()
        .find(|(_, c)| c.encoding == ChunkEncoding::Raw)
        .unwrap();
    let path = tier.chunk_path(&chunk.hash);
    let good = fs::read(&path).unwrap();
    for at in [0, good.len() / 2, good.len() - 20, good.len() - 1] {
        let mut bad = good.clone();
        bad[at] ^= 0x01;
        fs::write(&path, &bad).unwrap();
        let dest = new_dir(tmp.path(), &format!("dest-{at}"));
        let err = tier.load(&name("cp"), &dest).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, TierError::Corrupt { .. }), "{msg}");
        assert!(
            msg.contains("checkpoint cp")
                && msg.contains(&format!("file pages-1.img chunk {index}"))
                && msg.contains("authentication failed under key k1"),
            "{msg}"
        );
        assert_eq!(
            fs::read_dir(&dest).unwrap().count(),
            0,
            "partial files left"
        );
    }
    fs::write(&path, &good).unwrap();

    let manifest_path = tier.manifest_path(&name("cp"));
    let good = fs::read(&manifest_path).unwrap();
    for at in [9, 24, good.len() / 2, good.len() - 1] {
        let mut bad = good.clone();
        bad[at] ^= 0x20;
        fs::write(&manifest_path, &bad).unwrap();
        let err = tier.load(&name("cp"), &new_dir(tmp.path(), &format!("m-{at}")));
        let msg = err.unwrap_err().to_string();
        assert!(
            msg.contains("checkpoint cp") && msg.contains("manifest"),
            "{msg}"
        );
    }
    fs::write(&manifest_path, &good).unwrap();
    // Another checkpoint's manifest put in its place does not pass as this one.
    tier.store(&name("other"), &src).unwrap();
    fs::copy(tier.manifest_path(&name("other")), &manifest_path).unwrap();
    let msg = tier
        .load(&name("cp"), &new_dir(tmp.path(), "swapped"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("names checkpoint other"), "{msg}");
    fs::write(&manifest_path, &good).unwrap();
    let dest = new_dir(tmp.path(), "dest-good");
    tier.load(&name("cp"), &dest).unwrap();
    assert_eq!(read_dir_files(&dest), read_dir_files(&src));
}

#[test]
fn rotation_keeps_old_checkpoints_readable_and_seals_new_ones_with_the_new_key() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = key_dir(tmp.path(), &[("2026-01-01", 1)]);
    let src = new_dir(tmp.path(), "src");
    image(&src, 3);
    {
        let tier = nvme(tmp.path(), Sealing::sealed(ring(&keys)));
        tier.store(&name("old"), &src).unwrap();
    }
    key_dir(tmp.path(), &[("2026-06-01", 2)]);
    let tier = nvme(tmp.path(), Sealing::sealed(ring(&keys)));
    let (_, stats) = tier.store_with_stats(&name("new"), &src).unwrap();
    // Same plaintext, new key: other addresses, so nothing is shared across keys.
    assert!(stats.new_chunks > 0 && stats.dedup_bytes == 0, "{stats:?}");
    let old = tier.manifest(&name("old")).unwrap();
    let new = tier.manifest(&name("new")).unwrap();
    assert_eq!(old.key_id.as_ref().unwrap().as_str(), "2026-01-01");
    assert_eq!(new.key_id.as_ref().unwrap().as_str(), "2026-06-01");
    let hashes = |m: &kybernate_dataplane::CheckpointManifest| {
        m.files
            .iter()
            .flat_map(|f| f.chunks.iter())
            .filter(|c| c.encoding != ChunkEncoding::Zero)
            .map(|c| c.hash)
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert!(hashes(&old).is_disjoint(&hashes(&new)));
    for cp in ["old", "new"] {
        let dest = new_dir(tmp.path(), &format!("dest-{cp}"));
        tier.load(&name(cp), &dest).unwrap();
        assert_eq!(read_dir_files(&dest), read_dir_files(&src), "{cp}");
    }
}

#[test]
fn a_missing_or_wrong_key_is_a_clear_error_naming_key_and_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = key_dir(tmp.path(), &[("k1", 1)]);
    let src = new_dir(tmp.path(), "src");
    image(&src, 4);
    nvme(tmp.path(), Sealing::sealed(ring(&keys)))
        .store(&name("cp"), &src)
        .unwrap();

    // The ring lost k1 (a Secret without it mounted).
    let other = tempfile::tempdir().unwrap();
    let only_k2 = key_dir(other.path(), &[("k2", 2)]);
    let tier = nvme(tmp.path(), Sealing::sealed(ring(&only_k2)));
    let err = tier
        .load(&name("cp"), &new_dir(tmp.path(), "d1"))
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, TierError::Sealing { .. }), "{msg}");
    assert!(
        msg.contains("checkpoint cp") && msg.contains("\"k1\"") && msg.contains("holds k2"),
        "{msg}"
    );
    drop(tier);

    // No key configured at all.
    let tier = nvme(tmp.path(), Sealing::plain());
    let msg = tier
        .load(&name("cp"), &new_dir(tmp.path(), "d2"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("checkpoint cp")
            && msg.contains("\"k1\"")
            && msg.contains("no encryption key"),
        "{msg}"
    );
    drop(tier);

    // A key with the right id and the wrong bytes.
    let wrong = tempfile::tempdir().unwrap();
    let wrong_k1 = key_dir(wrong.path(), &[("k1", 9)]);
    let tier = nvme(tmp.path(), Sealing::sealed(ring(&wrong_k1)));
    let msg = tier
        .load(&name("cp"), &new_dir(tmp.path(), "d3"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("checkpoint cp") && msg.contains("authentication failed under key k1"),
        "{msg}"
    );
}

#[test]
fn plain_checkpoints_from_before_are_refused_unless_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let src = new_dir(tmp.path(), "src");
    image(&src, 5);
    nvme(tmp.path(), Sealing::plain())
        .store(&name("legacy"), &src)
        .unwrap();
    let keys = key_dir(tmp.path(), &[("k1", 1)]);
    let tier = nvme(tmp.path(), Sealing::sealed(ring(&keys)));
    let err = tier
        .load(&name("legacy"), &new_dir(tmp.path(), "d1"))
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, TierError::Sealing { .. }), "{msg}");
    assert!(
        msg.contains("checkpoint legacy") && msg.contains("manifest format 1"),
        "{msg}"
    );
    drop(tier);
    let tier = nvme(
        tmp.path(),
        Sealing::sealed(ring(&keys)).accepting_plain(true),
    );
    let dest = new_dir(tmp.path(), "d2");
    tier.load(&name("legacy"), &dest).unwrap();
    assert_eq!(read_dir_files(&dest), read_dir_files(&src));
}

fn s3_config(server: &S3Server) -> S3Config {
    S3Config {
        endpoint: server.endpoint(),
        bucket: BUCKET.into(),
        prefix: "node-a".into(),
        force_path_style: true,
        access_key_id: ACCESS_KEY.into(),
        secret_access_key: Secret::new(SECRET_KEY),
        part_size: MIN_PART_SIZE,
        parts_in_flight: 4,
        max_attempts: 3,
        retry_base_ms: 10,
        fetch_concurrency: 8,
        connect_timeout_secs: 2,
        ..S3Config::default()
    }
}

#[test]
fn s3_round_trip_demotion_and_tampering_with_encryption_on() {
    let tmp = tempfile::tempdir().unwrap();
    let server = S3Server::start(&tmp.path().join("s3"));
    let keys = key_dir(tmp.path(), &[("k1", 1)]);
    let ring = ring(&keys);
    let tier = S3Tier::connect_sealed(s3_config(&server), config(), Sealing::sealed(ring.clone()))
        .unwrap();
    let src = new_dir(tmp.path(), "src");
    image(&src, 6);
    tier.store(&name("cp"), &src).unwrap();
    let manifest = tier.manifest(&name("cp")).unwrap();
    assert_eq!(manifest.key_id.as_ref().unwrap().as_str(), "k1");
    let bucket_files = all_files(&server.root.join(BUCKET));
    assert!(!bucket_files.is_empty());
    for path in &bucket_files {
        let bytes = fs::read(path).unwrap();
        assert!(
            !contains(&bytes, SECRET_MARK),
            "{} holds plaintext",
            path.display()
        );
    }
    let dest = new_dir(tmp.path(), "dest");
    tier.load(&name("cp"), &dest).unwrap();
    assert_eq!(read_dir_files(&dest), read_dir_files(&src));

    // A second checkpoint of the same memory dedups against the first in the bucket.
    let (_, stats) = tier.store_with_stats(&name("cp-2"), &src).unwrap();
    assert_eq!(stats.new_chunks, 0, "{stats:?}");

    // Demotion from an encrypted NVMe tier uploads the sealed chunks as they are.
    let nvme = nvme(tmp.path(), Sealing::sealed(ring.clone()));
    nvme.store(&name("from-nvme"), &src).unwrap();
    tier.store_from_nvme(&name("from-nvme"), &nvme).unwrap();
    let dest = new_dir(tmp.path(), "dest-demoted");
    tier.load(&name("from-nvme"), &dest).unwrap();
    assert_eq!(read_dir_files(&dest), read_dir_files(&src));

    // A flipped byte in a pack is caught and named.
    let pack = bucket_files
        .iter()
        .find(|p| p.to_string_lossy().contains("/packs/"))
        .unwrap();
    let good = fs::read(pack).unwrap();
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 0x01;
    fs::write(pack, &bad).unwrap();
    let err = tier
        .load(&name("cp"), &new_dir(tmp.path(), "dest-bad"))
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, TierError::Corrupt { .. }), "{msg}");
    assert!(
        msg.contains("checkpoint cp") && msg.contains("chunk"),
        "{msg}"
    );
    fs::write(pack, &good).unwrap();

    // A flipped byte in the manifest object is caught and named.
    let manifest_file = server.root.join(BUCKET).join("node-a/manifests/cp");
    let good = fs::read(&manifest_file).unwrap();
    let mut bad = good.clone();
    bad[good.len() - 40] ^= 0x01;
    fs::write(&manifest_file, &bad).unwrap();
    let msg = tier
        .load(&name("cp"), &new_dir(tmp.path(), "dest-m"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("checkpoint cp") && msg.contains("manifest"),
        "{msg}"
    );
    fs::write(&manifest_file, &good).unwrap();

    // A second node without the key cannot open it and says which key it needs.
    let keyless = S3Tier::connect(s3_config(&server), config()).unwrap();
    let msg = keyless
        .load(&name("cp"), &new_dir(tmp.path(), "dest-keyless"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("checkpoint cp") && msg.contains("\"k1\""),
        "{msg}"
    );
    // A plain NVMe copy is not demoted into an encrypted bucket.
    let plain_nvme = NvmeTier::open(tmp.path().join("plain-nvme"), config()).unwrap();
    plain_nvme.store(&name("plain"), &src).unwrap();
    let msg = tier
        .store_from_nvme(&name("plain"), &plain_nvme)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("unencrypted"), "{msg}");
}

#[test]
fn s3_records_are_authenticated_and_bound_to_their_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let server = S3Server::start(&tmp.path().join("s3"));
    let keys = key_dir(tmp.path(), &[("k1", 1)]);
    let sealed =
        S3Tier::connect_sealed(s3_config(&server), config(), Sealing::sealed(ring(&keys))).unwrap();
    let record = br#"{"name":"cp","origin":{"namespace":"tenant-a"}}"#;
    sealed.put_record(&name("cp"), record).unwrap();
    assert_eq!(sealed.get_record(&name("cp")).unwrap().unwrap(), record);
    let object = server.root.join(BUCKET).join("node-a/records/cp.json");
    let good = fs::read(&object).unwrap();
    assert!(good.starts_with(&kybernate_dataplane::RECORD_MAGIC));

    // A changed namespace is caught and named.
    let mut bad = good.clone();
    let at = bad.len() - 4;
    bad[at] ^= 0x01;
    fs::write(&object, &bad).unwrap();
    let msg = sealed.get_record(&name("cp")).unwrap_err().to_string();
    assert!(
        msg.contains("checkpoint cp")
            && msg.contains("record")
            && msg.contains("authentication failed"),
        "{msg}"
    );
    // Another checkpoint's record copied under this name is caught too.
    sealed.put_record(&name("cp-b"), record).unwrap();
    fs::copy(
        server.root.join(BUCKET).join("node-a/records/cp-b.json"),
        &object,
    )
    .unwrap();
    assert!(sealed.get_record(&name("cp")).is_err());
    // A forged plain record is refused.
    fs::write(&object, record).unwrap();
    let err = sealed.get_record(&name("cp")).unwrap_err();
    assert!(matches!(err, TierError::Sealing { .. }), "{err}");
    // A node without the key says which key the record needs.
    fs::write(&object, &good).unwrap();
    let keyless = S3Tier::connect(s3_config(&server), config()).unwrap();
    let msg = keyless.get_record(&name("cp")).unwrap_err().to_string();
    assert!(msg.contains("\"k1\""), "{msg}");
}

#[test]
fn reencryption_moves_a_checkpoint_to_the_newest_key_and_collects_the_old_chunks_after() {
    let tmp = tempfile::tempdir().unwrap();
    let src = new_dir(tmp.path(), "src");
    image(&src, 7);
    nvme(tmp.path(), Sealing::plain())
        .store(&name("legacy"), &src)
        .unwrap();
    let keys = key_dir(tmp.path(), &[("2026-01-01", 1)]);
    {
        let tier = nvme(tmp.path(), Sealing::sealed(ring(&keys)));
        tier.store(&name("old"), &src).unwrap();
    }
    key_dir(tmp.path(), &[("2026-06-01", 2)]);
    let tier = nvme(tmp.path(), Sealing::sealed(ring(&keys)));
    let chunk_files = |tier: &NvmeTier| all_files(&tier.root().join("chunks")).len();
    let before = chunk_files(&tier);
    let old_chunks: Vec<_> = tier
        .manifest(&name("old"))
        .unwrap()
        .files
        .iter()
        .flat_map(|f| f.chunks.iter())
        .filter(|c| c.encoding != ChunkEncoding::Zero)
        .map(|c| tier.chunk_path(&c.hash))
        .collect();

    for cp in ["old", "legacy"] {
        let done = tier.reencrypt(&name(cp)).unwrap();
        assert_eq!(done.to.as_str(), "2026-06-01");
        assert!(!done.unchanged);
        let m = tier.manifest(&name(cp)).unwrap();
        assert_eq!(m.key_id.as_ref().unwrap().as_str(), "2026-06-01");
        let dest = new_dir(tmp.path(), &format!("dest-{cp}"));
        tier.load(&name(cp), &dest).unwrap();
        assert_eq!(read_dir_files(&dest), read_dir_files(&src), "{cp}");
    }
    // Both now share the new key's chunks; the old key's and the plain ones are gone.
    assert!(old_chunks.iter().all(|p| !p.exists()));
    assert!(chunk_files(&tier) < before);
    assert!(tier.reencrypt(&name("old")).unwrap().unchanged);
    assert!(!tier.root().join(".reencrypt-old").exists());

    // A checkpoint whose key is gone cannot be re-encrypted and stays as it was.
    drop(tier);
    let other = tempfile::tempdir().unwrap();
    let plain_tier = nvme(tmp.path(), Sealing::plain());
    let err = plain_tier.reencrypt(&name("old")).unwrap_err().to_string();
    assert!(err.contains("does not encrypt"), "{err}");
    drop(plain_tier);
    let only_new = key_dir(other.path(), &[("2027-01-01", 3)]);
    let tier = nvme(tmp.path(), Sealing::sealed(ring(&only_new)));
    let err = tier.reencrypt(&name("old")).unwrap_err().to_string();
    assert!(
        err.contains("\"2026-06-01\"") && err.contains("checkpoint old"),
        "{err}"
    );
}
