//! The S3 tier against a real S3 HTTP server on loopback (s3s-fs, started here).

mod common;

use std::fs;
use std::path::Path;
use std::sync::atomic::Ordering;

use common::s3_server::{PartFault, S3Server, ACCESS_KEY, BUCKET, SECRET_KEY};
use common::{new_dir, read_dir_files, write_file, Fill};
use kybernate_dataplane::{
    CheckpointName, ChunkConfig, ChunkLocation, NvmeTier, S3Config, S3Tier, Secret, Tier,
    TierError, MIN_PART_SIZE,
};

const MIB: usize = 1 << 20;

fn name(s: &str) -> CheckpointName {
    CheckpointName::new(s).unwrap()
}

fn chunk_config() -> ChunkConfig {
    ChunkConfig {
        chunk_size: MIB,
        workers: 2,
        ..ChunkConfig::default()
    }
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

/// The directories under the prefix `node-a/` that hold files.
fn prefix_dirs_with_files(server: &S3Server) -> Vec<String> {
    let base = server.root.join(BUCKET).join("node-a");
    let mut dirs: Vec<String> = fs::read_dir(&base)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| fs::read_dir(e.path()).is_ok_and(|mut d| d.next().is_some()))
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    dirs.sort();
    dirs
}

/// About 20 MiB: zero pages, incompressible "weights", compressible heap.
fn image(dir: &Path, seed: u64) {
    write_file(
        &dir.join("pages-1.img"),
        &[
            (Fill::Zero, 4 * MIB),
            (Fill::Noise(seed), 12 * MIB),
            (Fill::Text(seed), 4 * MIB + 123),
        ],
    );
    write_file(&dir.join("core-1.img"), &[(Fill::Text(seed + 1), 5000)]);
}

#[test]
fn upload_restore_and_dedup_across_checkpoints_and_nodes() {
    let tmp = tempfile::tempdir().unwrap();
    let server = S3Server::start(&tmp.path().join("s3"));
    let tier = S3Tier::connect(s3_config(&server), chunk_config()).unwrap();
    let src = new_dir(tmp.path(), "src");
    image(&src, 11);

    let (report, stats) = tier.store_with_stats(&name("cp1"), &src).unwrap();
    assert_eq!(
        server.faults.creates.load(Ordering::SeqCst),
        1,
        "one multipart upload"
    );
    let parts = server.faults.parts.lock().unwrap().clone();
    assert!(parts.len() >= 3, "{parts:?}");
    let last = parts.iter().map(|p| p.0).max().unwrap();
    for (n, len) in &parts {
        assert!(
            *n == last || *len >= MIN_PART_SIZE as i64,
            "part {n} has {len} bytes"
        );
    }
    assert_eq!(stats.zero_bytes, 4 * MIB as u64);
    assert!(report.stored_bytes < report.raw_bytes);
    assert!(tier.contains(&name("cp1")).unwrap());

    let dest = new_dir(tmp.path(), "dest1");
    tier.load(&name("cp1"), &dest).unwrap();
    assert_eq!(read_dir_files(&dest), read_dir_files(&src));

    // Second checkpoint of the same memory with one changed page: one new chunk.
    let mut pages = fs::read(src.join("pages-1.img")).unwrap();
    pages[6 * MIB + 7] ^= 0x55;
    fs::write(src.join("pages-1.img"), &pages).unwrap();
    let (_, stats2) = tier.store_with_stats(&name("cp2"), &src).unwrap();
    assert_eq!(stats2.new_chunks, 1, "{stats2:?}");
    let m2 = tier.manifest(&name("cp2")).unwrap();
    assert_eq!(
        m2.packs.len(),
        2,
        "cp2 references cp1's pack and its own: {:?}",
        m2.packs
    );

    // A second node with its own tier instance shares the weights of a replica.
    let other = S3Tier::connect(s3_config(&server), chunk_config()).unwrap();
    let replica = new_dir(tmp.path(), "replica");
    image(&replica, 11);
    fs::write(replica.join("core-1.img"), b"replica core").unwrap();
    let (_, stats3) = other.store_with_stats(&name("replica"), &replica).unwrap();
    assert_eq!(stats3.new_chunks, 1, "only core-1.img is new: {stats3:?}");
    assert_eq!(
        other.list().unwrap(),
        vec![name("cp1"), name("cp2"), name("replica")]
    );

    // Removing cp1 keeps the pack cp2 and the replica still use.
    assert!(tier.remove(&name("cp1")).unwrap());
    let dest2 = new_dir(tmp.path(), "dest2");
    tier.load(&name("cp2"), &dest2).unwrap();
    assert_eq!(read_dir_files(&dest2), read_dir_files(&src));
    assert!(tier.remove(&name("cp2")).unwrap());
    assert!(tier.remove(&name("replica")).unwrap());
    assert!(!tier.remove(&name("replica")).unwrap());
    // Only the packs are left, until they are older than the grace period (an hour by
    // default): another node's store may be about to reference them.
    assert!(tier.list().unwrap().is_empty());
    assert_eq!(prefix_dirs_with_files(&server), vec!["packs".to_owned()]);
    assert!(server.leftover_upload_files().is_empty());
}

#[test]
fn failing_parts_are_retried_then_the_upload_is_aborted() {
    let tmp = tempfile::tempdir().unwrap();
    let server = S3Server::start(&tmp.path().join("s3"));
    let src = new_dir(tmp.path(), "src");
    image(&src, 5);
    let nvme = NvmeTier::open(tmp.path().join("nvme"), chunk_config()).unwrap();
    nvme.store(&name("cp"), &src).unwrap();
    let tier = S3Tier::connect(s3_config(&server), chunk_config()).unwrap();

    server.set_fault(PartFault::FailAfter(1));
    let err = tier.store(&name("cp"), &src).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, TierError::Remote { .. }), "{msg}");
    assert!(
        // The server answers 503 before reading the body, so the client sees either the 503
        // or a broken pipe; both are retried.
        msg.contains("upload part") && msg.contains("after 3 attempts"),
        "{msg}"
    );
    let parts = server.faults.parts.lock().unwrap().clone();
    let failed_part = parts[1].0;
    assert_eq!(
        parts.iter().filter(|p| p.0 == failed_part).count(),
        3,
        "{parts:?}"
    );
    assert_eq!(server.faults.aborts.load(Ordering::SeqCst), 1);
    assert!(
        server.leftover_upload_files().is_empty(),
        "{:?}",
        server.leftover_upload_files()
    );
    assert!(!tier.contains(&name("cp")).unwrap());
    assert_eq!(tier.used_bytes().unwrap(), 0);

    // The NVMe copy and the source are intact, and a later upload works.
    let dest = new_dir(tmp.path(), "dest");
    nvme.load(&name("cp"), &dest).unwrap();
    assert_eq!(read_dir_files(&dest), read_dir_files(&src));
    server.set_fault(PartFault::None);
    tier.store(&name("cp"), &src).unwrap();
    assert!(tier.contains(&name("cp")).unwrap());
}

#[test]
fn server_stopped_mid_upload_leaves_no_parts_once_it_is_back() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s3");
    let mut server = S3Server::start(&root);
    let src = new_dir(tmp.path(), "src");
    image(&src, 6);
    let tier = S3Tier::connect(s3_config(&server), chunk_config()).unwrap();

    server.set_fault(PartFault::StopAfter(1));
    let err = tier.store(&name("cp"), &src).unwrap_err().to_string();
    server.wait_stopped();
    assert!(err.contains("upload part"), "{err}");
    assert!(
        err.contains("aborting the multipart upload failed too"),
        "{err}"
    );
    assert!(err.contains("no response from the server"), "{err}");

    // The server comes back with the same storage: the pending abort removes every part.
    let addr = server.addr;
    drop(server);
    let server = S3Server::start_at(&root, addr);
    assert!(
        !server.leftover_upload_files().is_empty(),
        "parts were left while it was down"
    );
    assert_eq!(tier.abort_pending_uploads().unwrap(), 1);
    assert!(
        server.leftover_upload_files().is_empty(),
        "{:?}",
        server.leftover_upload_files()
    );
    assert!(!tier.contains(&name("cp")).unwrap());
    tier.store(&name("cp"), &src).unwrap();
    let dest = new_dir(tmp.path(), "dest");
    tier.load(&name("cp"), &dest).unwrap();
    assert_eq!(read_dir_files(&dest), read_dir_files(&src));
}

#[test]
fn wrong_credentials_and_missing_bucket_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let server = S3Server::start(&tmp.path().join("s3"));
    let wrong = S3Config {
        secret_access_key: Secret::new("not-the-secret"),
        ..s3_config(&server)
    };
    let err = S3Tier::connect(wrong, chunk_config())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("access denied (HTTP 403") && err.contains(BUCKET),
        "{err}"
    );
    assert!(!err.contains("not-the-secret"), "{err}");

    let missing = S3Config {
        bucket: "no-such-bucket".into(),
        ..s3_config(&server)
    };
    let err = S3Tier::connect(missing, chunk_config())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bucket no-such-bucket does not exist"),
        "{err}"
    );

    let unreachable = S3Config {
        endpoint: "http://127.0.0.1:9".into(),
        ..s3_config(&server)
    };
    let err = S3Tier::connect(unreachable, chunk_config())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no response from the server"), "{err}");
}

#[test]
fn corrupt_pack_and_deleted_manifest_fall_back_or_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let server = S3Server::start(&tmp.path().join("s3"));
    let tier = S3Tier::connect(s3_config(&server), chunk_config()).unwrap();
    let src = new_dir(tmp.path(), "src");
    image(&src, 8);
    tier.store(&name("cp"), &src).unwrap();
    let nvme = NvmeTier::open(tmp.path().join("nvme"), chunk_config()).unwrap();
    nvme.store(&name("cp"), &src).unwrap();

    let m = tier.manifest(&name("cp")).unwrap();
    let pack_path = server.root.join(BUCKET).join("node-a").join(&m.packs[0]);
    let good = fs::read(&pack_path).unwrap();
    let (file, index, offset) = m
        .files
        .iter()
        .flat_map(|f| f.chunks.iter().enumerate().map(move |(i, c)| (f, i, c)))
        .find_map(|(f, i, c)| match c.location {
            ChunkLocation::Pack { offset, .. } if c.stored_len > 1000 => {
                Some((f.name.clone(), i, offset))
            }
            _ => None,
        })
        .unwrap();
    let mut bad = good.clone();
    bad[usize::try_from(offset).unwrap() + 100] ^= 1;
    fs::write(&pack_path, &bad).unwrap();

    let dest = new_dir(tmp.path(), "dest");
    let err = tier.load(&name("cp"), &dest).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, TierError::Corrupt { .. }), "{msg}");
    assert!(
        msg.contains(&format!("file {file} chunk {index}")) && msg.contains("checkpoint cp"),
        "{msg}"
    );
    assert_eq!(fs::read_dir(&dest).unwrap().count(), 0);

    // A bad NVMe copy fails cleanly; the (repaired) S3 copy loads into the same directory.
    fs::write(&pack_path, &good).unwrap();
    let chunk = nvme.manifest(&name("cp")).unwrap().files[1].chunks[8].hash;
    let chunk_path = nvme.chunk_path(&chunk);
    let len = fs::metadata(&chunk_path).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&chunk_path)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    let err = nvme.load(&name("cp"), &dest).unwrap_err();
    assert!(matches!(err, TierError::Corrupt { .. }), "{err}");
    assert_eq!(fs::read_dir(&dest).unwrap().count(), 0);
    tier.load(&name("cp"), &dest).unwrap();
    assert_eq!(read_dir_files(&dest), read_dir_files(&src));

    // A truncated pack is a clear error, not a short file.
    fs::write(&pack_path, &good[..good.len() / 2]).unwrap();
    let dest2 = new_dir(tmp.path(), "dest2");
    let err = tier.load(&name("cp"), &dest2).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, TierError::Corrupt { .. }), "{msg}");
    assert!(
        msg.contains("checkpoint cp") && msg.contains(" chunk ") && msg.contains("shorter"),
        "{msg}"
    );
    assert_eq!(fs::read_dir(&dest2).unwrap().count(), 0);

    // Without its manifest the checkpoint does not exist.
    fs::remove_file(server.root.join(BUCKET).join("node-a/manifests/cp")).unwrap();
    assert!(!tier.contains(&name("cp")).unwrap());
    let err = tier.load(&name("cp"), &dest2).unwrap_err();
    assert!(matches!(err, TierError::NotFound { .. }), "{err}");
}

#[test]
fn demotion_from_nvme_uploads_verified_chunks_without_the_ram_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let server = S3Server::start(&tmp.path().join("s3"));
    let tier = S3Tier::connect(s3_config(&server), chunk_config()).unwrap();
    let nvme = NvmeTier::open(tmp.path().join("nvme"), chunk_config()).unwrap();
    let src = new_dir(tmp.path(), "src");
    image(&src, 21);
    nvme.store(&name("cp"), &src).unwrap();
    let expected = read_dir_files(&src);
    fs::remove_dir_all(&src).unwrap();

    let (report, stats) = tier.store_from_nvme(&name("cp"), &nvme).unwrap();
    assert!(report.stored_bytes > 0 && stats.new_chunks > 0, "{stats:?}");
    assert_eq!(server.faults.creates.load(Ordering::SeqCst), 1);
    let dest = new_dir(tmp.path(), "dest");
    tier.load(&name("cp"), &dest).unwrap();
    assert_eq!(read_dir_files(&dest), expected);

    // A damaged NVMe chunk never reaches S3: clear error, upload aborted, nothing committed.
    let m = nvme.manifest(&name("cp")).unwrap();
    let chunk = m.files[1].chunks[8];
    let path = nvme.chunk_path(&chunk.hash);
    let mut bad = fs::read(&path).unwrap();
    bad[10] ^= 4;
    fs::write(&path, &bad).unwrap();
    let other = S3Config {
        prefix: "node-b".into(),
        ..s3_config(&server)
    };
    let tier_b = S3Tier::connect(other, chunk_config()).unwrap();
    let err = tier_b.store_from_nvme(&name("cp"), &nvme).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, TierError::Corrupt { .. }), "{msg}");
    assert!(msg.contains("file pages-1.img chunk 8"), "{msg}");
    assert!(!tier_b.contains(&name("cp")).unwrap());
    assert!(server.leftover_upload_files().is_empty());
}

#[test]
fn records_are_shared_between_nodes_and_leave_with_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let server = S3Server::start(&tmp.path().join("s3"));
    let node_a = S3Tier::connect(s3_config(&server), chunk_config()).unwrap();
    let node_b = S3Tier::connect(s3_config(&server), chunk_config()).unwrap();
    let src = new_dir(tmp.path(), "src");
    image(&src, 5);
    node_a.store(&name("moved"), &src).unwrap();
    node_a
        .put_record(&name("moved"), br#"{"name":"moved"}"#)
        .unwrap();

    assert_eq!(
        node_b.get_record(&name("moved")).unwrap().as_deref(),
        Some(&br#"{"name":"moved"}"#[..])
    );
    assert_eq!(node_b.get_record(&name("never")).unwrap(), None);
    // Records are not checkpoints: the listing stays the manifests'.
    assert_eq!(node_b.list().unwrap(), vec![name("moved")]);

    let too_big = vec![b' '; usize::try_from(kybernate_dataplane::MAX_RECORD_BYTES).unwrap() + 1];
    let err = node_a.put_record(&name("big"), &too_big).unwrap_err();
    assert!(err.to_string().contains("larger than"), "{err}");

    assert!(node_b.remove(&name("moved")).unwrap());
    assert_eq!(node_a.get_record(&name("moved")).unwrap(), None);
    assert_eq!(prefix_dirs_with_files(&server), vec!["packs".to_owned()]);

    // A local tier keeps no records: the node's catalog has them.
    let nvme = NvmeTier::open(tmp.path().join("nvme"), chunk_config()).unwrap();
    nvme.put_record(&name("moved"), b"{}").unwrap();
    assert_eq!(nvme.get_record(&name("moved")).unwrap(), None);
}
