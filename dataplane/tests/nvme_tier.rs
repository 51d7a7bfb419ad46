//! The NVMe tier against a plain model, plus dedup, corruption, fallback and disk-full cases.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{new_dir, read_dir_files, write_file, Fill};
use kybernate_dataplane::{
    ByteRate, CheckpointName, ChunkConfig, ChunkEncoding, LocalDirTier, NvmeTier, Pacing, Tier,
    TierError, TierKind,
};
use proptest::prelude::*;

fn name(s: &str) -> CheckpointName {
    CheckpointName::new(s).unwrap()
}

/// Every chunk goes through zstd by the documented rule (no adaptive raw stores while the
/// disk is idle), so the plain model can predict each encoding.
fn config(chunk_size: usize) -> ChunkConfig {
    ChunkConfig {
        chunk_size,
        workers: 2,
        adaptive: false,
        ..ChunkConfig::default()
    }
}

/// The plain model: read() the file, cut it, compress single-threaded with the zstd
/// convenience API, decide zero / raw / zstd by the documented rule.
fn model_chunks(data: &[u8], cfg: &ChunkConfig) -> Vec<(ChunkEncoding, Vec<u8>)> {
    data.chunks(cfg.chunk_size)
        .map(|raw| {
            if raw.iter().all(|&b| b == 0) {
                return (ChunkEncoding::Zero, Vec::new());
            }
            let z = zstd::bulk::compress(raw, cfg.zstd_level).unwrap();
            let limit = raw.len() / 100 * usize::from(cfg.max_compressed_percent);
            if z.len() <= limit && z.len() < raw.len() {
                (ChunkEncoding::Zstd, z)
            } else {
                (ChunkEncoding::Raw, raw.to_vec())
            }
        })
        .collect()
}

fn fill_strategy() -> impl Strategy<Value = (Fill, usize)> {
    let fill = prop_oneof![
        Just(Fill::Zero),
        any::<u64>().prop_map(Fill::Noise),
        any::<u64>().prop_map(Fill::Text),
    ];
    // Runs of 0..3 pages plus an odd tail, so chunk and file ends fall anywhere.
    (fill, 0usize..3, 0usize..5000).prop_map(|(f, pages, extra)| (f, pages * 4096 + extra))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn round_trip_matches_the_plain_model(
        files in prop::collection::vec(prop::collection::vec(fill_strategy(), 0..5), 1..4),
        chunk_pages in prop::sample::select(vec![1usize, 2, 4, 16]),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let src = new_dir(tmp.path(), "src");
        for (i, runs) in files.iter().enumerate() {
            write_file(&src.join(format!("pages-{i}.img")), runs);
        }
        let cfg = config(chunk_pages * 4096);
        let tier = NvmeTier::open(tmp.path().join("nvme"), cfg.clone()).unwrap();
        let report = tier.store(&name("cp"), &src).unwrap();
        let source = read_dir_files(&src);
        prop_assert_eq!(report.raw_bytes, source.values().map(|v| v.len() as u64).sum::<u64>());

        let manifest = tier.manifest(&name("cp")).unwrap();
        for entry in &manifest.files {
            let model = model_chunks(&source[&entry.name], &cfg);
            prop_assert_eq!(model.len(), entry.chunks.len());
            for (i, (chunk, (enc, bytes))) in entry.chunks.iter().zip(&model).enumerate() {
                prop_assert_eq!(chunk.encoding, *enc, "file {} chunk {}", entry.name, i);
                if *enc == ChunkEncoding::Zero {
                    continue;
                }
                let stored = fs::read(tier.chunk_path(&chunk.hash)).unwrap();
                let (got, want) = if *enc == ChunkEncoding::Zstd {
                    (zstd::stream::decode_all(&stored[..]).unwrap(),
                     zstd::stream::decode_all(&bytes[..]).unwrap())
                } else {
                    (stored, bytes.clone())
                };
                prop_assert_eq!(got, want, "file {} chunk {}", entry.name, i);
            }
        }

        let dest = new_dir(tmp.path(), "dest");
        let loaded = tier.load(&name("cp"), &dest).unwrap();
        prop_assert_eq!(loaded.bytes, report.raw_bytes);
        prop_assert_eq!(read_dir_files(&dest), source);
    }
}

fn sample_image(dir: &Path, seed: u64) {
    write_file(
        &dir.join("pages-1.img"),
        &[
            (Fill::Zero, 3 * 65536),
            (Fill::Noise(seed), 2 * 65536),
            (Fill::Text(seed), 3 * 65536 + 100),
        ],
    );
    write_file(&dir.join("core-1.img"), &[(Fill::Text(1), 300)]);
    fs::write(dir.join("empty.img"), b"").unwrap();
}

#[test]
fn second_checkpoint_and_second_replica_store_only_new_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let tier = NvmeTier::open(tmp.path().join("nvme"), config(65536)).unwrap();
    let a = new_dir(tmp.path(), "a");
    sample_image(&a, 7);
    let (first, stats1) = tier.store_with_stats(&name("cp1"), &a).unwrap();
    assert_eq!(stats1.zero_bytes, 3 * 65536);
    assert!(first.stored_bytes > 0);

    // Same memory with one page changed: one new chunk.
    let mut pages = fs::read(a.join("pages-1.img")).unwrap();
    pages[5 * 65536 + 10] ^= 0xff;
    fs::write(a.join("pages-1.img"), &pages).unwrap();
    let (_, stats2) = tier.store_with_stats(&name("cp2"), &a).unwrap();
    assert_eq!(stats2.new_chunks, 1, "{stats2:?}");

    // Another "process" whose weights are the same: its pages file adds nothing.
    let b = new_dir(tmp.path(), "b");
    sample_image(&b, 7);
    fs::write(b.join("core-1.img"), b"other process").unwrap();
    let (_, stats3) = tier.store_with_stats(&name("replica"), &b).unwrap();
    assert_eq!(stats3.new_chunks, 1, "only core-1.img is new: {stats3:?}");

    // Storing a held name is a no-op; removal keeps chunks other checkpoints use.
    assert_eq!(tier.store(&name("cp1"), &a).unwrap().stored_bytes, 0);
    assert_eq!(
        tier.list().unwrap(),
        vec![name("cp1"), name("cp2"), name("replica")]
    );
    assert!(tier.remove(&name("cp1")).unwrap());
    for cp in ["cp2", "replica"] {
        let dest = new_dir(tmp.path(), &format!("dest-{cp}"));
        tier.load(&name(cp), &dest).unwrap();
    }
    let before = tier.used_bytes().unwrap();
    assert!(tier.remove(&name("cp2")).unwrap());
    assert!(tier.remove(&name("replica")).unwrap());
    assert!(before > 0);
    assert_eq!(tier.used_bytes().unwrap(), 0);
    assert!(!tier.remove(&name("cp2")).unwrap());
}

fn stored_tier(tmp: &Path) -> (NvmeTier, PathBuf) {
    let tier = NvmeTier::open(tmp.join("nvme"), config(65536)).unwrap();
    let src = new_dir(tmp, "src");
    sample_image(&src, 3);
    tier.store(&name("cp"), &src).unwrap();
    (tier, src)
}

fn first_stored_chunk(tier: &NvmeTier, encoding: ChunkEncoding) -> (String, usize, PathBuf) {
    let m = tier.manifest(&name("cp")).unwrap();
    for f in &m.files {
        for (i, c) in f.chunks.iter().enumerate() {
            if c.encoding == encoding {
                return (f.name.clone(), i, tier.chunk_path(&c.hash));
            }
        }
    }
    panic!("no {encoding:?} chunk");
}

#[test]
fn flipped_byte_is_a_clear_error_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let (tier, _) = stored_tier(tmp.path());
    for encoding in [ChunkEncoding::Raw, ChunkEncoding::Zstd] {
        let (file, index, path) = first_stored_chunk(&tier, encoding);
        let good = fs::read(&path).unwrap();
        let mut bad = good.clone();
        bad[good.len() / 2] ^= 1;
        fs::write(&path, &bad).unwrap();
        let dest = new_dir(tmp.path(), &format!("dest-{encoding:?}"));
        let err = tier.load(&name("cp"), &dest).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, TierError::Corrupt { .. }), "{msg}");
        assert!(
            msg.contains("checkpoint cp") && msg.contains(&format!("file {file} chunk {index}")),
            "{msg}"
        );
        assert_eq!(
            fs::read_dir(&dest).unwrap().count(),
            0,
            "partial files removed"
        );
        fs::write(&path, &good).unwrap();
    }
}

/// Dedup reuses a chunk only when it is known good: a chunk damaged on disk (same length,
/// so a length check cannot see it) is written anew by the next store that needs it, and
/// both checkpoints restore; a reopened tier verifies what it reuses.
#[test]
fn a_damaged_chunk_is_written_anew_by_the_next_store_that_needs_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (tier, src) = stored_tier(tmp.path());
    for encoding in [ChunkEncoding::Raw, ChunkEncoding::Zstd] {
        let (_, _, path) = first_stored_chunk(&tier, encoding);
        let mut bad = fs::read(&path).unwrap();
        let middle = bad.len() / 2;
        bad[middle] ^= 0x10;
        fs::write(&path, &bad).unwrap();
    }
    let (_, stats) = tier.store_with_stats(&name("cp2"), &src).unwrap();
    assert_eq!(
        stats.new_chunks, 2,
        "the two damaged chunks are rewritten: {stats:?}"
    );
    for cp in ["cp", "cp2"] {
        let dest = new_dir(tmp.path(), &format!("dest-{cp}"));
        tier.load(&name(cp), &dest).unwrap();
        assert_eq!(read_dir_files(&dest), read_dir_files(&src), "{cp}");
    }

    let (_, stats) = tier.store_with_stats(&name("cp3"), &src).unwrap();
    assert_eq!(
        stats.new_chunks, 0,
        "known good chunks are reused: {stats:?}"
    );
    drop(tier);
    let reopened = NvmeTier::open(tmp.path().join("nvme"), config(65536)).unwrap();
    let (_, stats) = reopened.store_with_stats(&name("cp4"), &src).unwrap();
    assert_eq!(
        stats.new_chunks, 0,
        "intact chunks pass verification: {stats:?}"
    );
}

#[test]
fn truncated_chunk_and_deleted_manifest_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let (tier, _) = stored_tier(tmp.path());
    let (file, index, path) = first_stored_chunk(&tier, ChunkEncoding::Zstd);
    let len = fs::metadata(&path).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let dest = new_dir(tmp.path(), "dest");
    let msg = tier.load(&name("cp"), &dest).unwrap_err().to_string();
    assert!(
        msg.contains(&format!("file {file} chunk {index}")) && msg.contains("manifest says"),
        "{msg}"
    );

    fs::remove_file(tier.manifest_path(&name("cp"))).unwrap();
    assert!(!tier.contains(&name("cp")).unwrap());
    let err = tier.load(&name("cp"), &dest).unwrap_err();
    assert!(matches!(err, TierError::NotFound { .. }), "{err}");

    fs::write(tier.manifest_path(&name("cp")), b"KYBMANIF garbage").unwrap();
    let msg = tier.load(&name("cp"), &dest).unwrap_err().to_string();
    assert!(msg.contains("manifest") && msg.contains("corrupt"), "{msg}");
}

/// The data plane's half of restoring from the nearest good copy (the agent's
/// `restore::stage` walks the tiers): a damaged copy fails with an error naming the chunk and
/// leaves the destination empty, so the next tier can load into the same directory.
#[test]
fn a_damaged_copy_fails_cleanly_so_the_next_tier_can_load() {
    let tmp = tempfile::tempdir().unwrap();
    let (nvme, src) = stored_tier(tmp.path());
    let far = NvmeTier::open(tmp.path().join("far"), config(65536)).unwrap();
    far.store(&name("cp"), &src).unwrap();
    let (_, _, path) = first_stored_chunk(&nvme, ChunkEncoding::Raw);
    let mut bad = fs::read(&path).unwrap();
    bad[0] ^= 0x80;
    fs::write(&path, &bad).unwrap();
    let ram = LocalDirTier::open(TierKind::Ram, tmp.path().join("ram")).unwrap();

    let dest = new_dir(tmp.path(), "dest");
    assert!(!ram.contains(&name("cp")).unwrap());
    let err = nvme.load(&name("cp"), &dest).unwrap_err();
    assert!(matches!(err, TierError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("content hash mismatch"), "{err}");
    assert_eq!(fs::read_dir(&dest).unwrap().count(), 0);
    far.load(&name("cp"), &dest).unwrap();
    assert_eq!(read_dir_files(&dest), read_dir_files(&src));
}

/// A tmpfs mounted for one test and unmounted on drop.
struct SmallMount(PathBuf);

impl SmallMount {
    fn new(path: PathBuf, size: &str) -> Self {
        fs::create_dir_all(&path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("the disk-full test needs the `mount` command (run as root, as CI does)");
        assert!(
            status.success(),
            "mounting a small tmpfs failed: the disk-full test needs root"
        );
        Self(path)
    }
}

impl Drop for SmallMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn disk_full_is_a_clear_error_and_keeps_the_source() {
    let tmp = tempfile::tempdir().unwrap();
    let mount = SmallMount::new(tmp.path().join("small"), "1m");
    let src = new_dir(tmp.path(), "src");
    write_file(&src.join("pages-1.img"), &[(Fill::Noise(9), 4 << 20)]);
    let before = read_dir_files(&src);
    let tier = NvmeTier::open(mount.0.join("nvme"), config(65536)).unwrap();
    let err = tier.store(&name("cp"), &src).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, TierError::Io { .. }), "{msg}");
    assert!(
        msg.contains("No space left on device") || msg.contains("disk full"),
        "{msg}"
    );
    assert_eq!(read_dir_files(&src), before, "the RAM copy is untouched");
    assert!(!tier.contains(&name("cp")).unwrap());
    assert_eq!(
        tier.used_bytes().unwrap(),
        0,
        "chunks of the failed store are removed"
    );
    assert_eq!(
        fs::read_dir(mount.0.join("nvme/chunks/.tmp"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn bad_config_and_bad_source_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let err = NvmeTier::open(tmp.path().join("n"), config(1000)).unwrap_err();
    assert!(err.to_string().contains("chunk_size 1000"), "{err}");
    let tier = NvmeTier::open(tmp.path().join("n"), config(65536)).unwrap();
    let err = tier
        .store(&name("cp"), &tmp.path().join("missing"))
        .unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
    let src = new_dir(tmp.path(), "src");
    fs::create_dir(src.join("subdir")).unwrap();
    let err = tier.store(&name("cp"), &src).unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
    assert!(!tier.contains(&name("cp")).unwrap());
}

#[test]
fn a_paced_store_waits_for_its_write_limit_and_stores_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let src = new_dir(tmp.path(), "src");
    sample_image(&src, 21);
    let image_bytes: u64 = read_dir_files(&src).values().map(|d| d.len() as u64).sum();

    let waits = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = waits.clone();
    // A limit of a quarter of the image per second, so the writes must wait.
    let rate = ByteRate::new(image_bytes / 4)
        .unwrap()
        .unwrap()
        .with_wait_hook(std::sync::Arc::new(move |_| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
    let pacing = Pacing {
        disk_write: Some(std::sync::Arc::new(rate)),
        ..Pacing::default()
    };
    let tier = NvmeTier::open(tmp.path().join("nvme"), config(65536)).unwrap();
    let report = tier
        .store_paced(&name("paced"), &src, None, &pacing)
        .unwrap();
    assert!(report.stored_bytes > 0);
    assert!(
        waits.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the writer never waited for its limit"
    );
    let dest = new_dir(tmp.path(), "dest");
    tier.load(&name("paced"), &dest).unwrap();
    assert_eq!(read_dir_files(&dest), read_dir_files(&src));
}
