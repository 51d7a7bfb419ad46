//! Several nodes sharing one S3 bucket and prefix: leases, conditional manifests, index
//! objects and garbage collection, against a real S3 HTTP server on loopback (s3s-fs).
//! Each "node" is an `S3Tier` of its own with its own node id.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::s3_server::{open_uploads, PartFault, S3Server, ACCESS_KEY, BUCKET, SECRET_KEY};
use common::{fill_bytes, read_dir_files, Fill};
use kybernate_dataplane::{
    CheckpointName, ChunkConfig, S3Config, S3Tier, Secret, Tier, TierError, MIN_PART_SIZE,
};

const KIB: usize = 1 << 10;
const PREFIX: &str = "shared";

fn name(s: &str) -> CheckpointName {
    CheckpointName::new(s).unwrap()
}

fn chunk_config() -> ChunkConfig {
    ChunkConfig {
        chunk_size: 256 * KIB,
        workers: 1,
        ..ChunkConfig::default()
    }
}

fn node(server: &S3Server, id: &str, lease_ttl_secs: u64, gc_grace_secs: u64) -> S3Tier {
    let config = S3Config {
        endpoint: server.endpoint(),
        bucket: BUCKET.into(),
        prefix: PREFIX.into(),
        force_path_style: true,
        access_key_id: ACCESS_KEY.into(),
        secret_access_key: Secret::new(SECRET_KEY),
        part_size: MIN_PART_SIZE,
        parts_in_flight: 2,
        max_attempts: 5,
        retry_base_ms: 20,
        fetch_concurrency: 4,
        connect_timeout_secs: 2,
        node_id: id.into(),
        lease_ttl_secs,
        gc_grace_secs,
        ..S3Config::default()
    };
    S3Tier::connect(config, chunk_config()).unwrap()
}

/// The image set of checkpoint `name` with seed `seed`: a file naming both, memory shared by
/// every checkpoint with the same `seed % 3` (so packs are shared between checkpoints),
/// zero pages, and bytes of its own.
fn image_files(name: &str, seed: u64) -> BTreeMap<String, Vec<u8>> {
    let mut pages = fill_bytes(Fill::Noise(1001 + 2 * (seed % 3)), 512 * KIB);
    pages.extend(fill_bytes(Fill::Zero, 256 * KIB));
    pages.extend(fill_bytes(Fill::Noise(seed * 2 + 1), 256 * KIB + 777));
    pages.extend(fill_bytes(Fill::Text(seed), 100 * KIB));
    BTreeMap::from([
        ("seed.img".to_owned(), format!("{name} {seed}").into_bytes()),
        ("pages-1.img".to_owned(), pages),
    ])
}

fn write_image(dir: &Path, files: &BTreeMap<String, Vec<u8>>) {
    fs::create_dir_all(dir).unwrap();
    for (file, data) in files {
        fs::write(dir.join(file), data).unwrap();
    }
}

/// Restores `cp` into a fresh directory under `root`; on success checks it bit for bit
/// against the image its seed file names and returns that seed.
fn restore(tier: &S3Tier, cp: &str, root: &Path) -> Result<u64, TierError> {
    let dest = root.join(format!("restore-{}", unique()));
    fs::create_dir_all(&dest).unwrap();
    let loaded = tier.load(&name(cp), &dest);
    let result = loaded.map(|_| {
        let got = read_dir_files(&dest);
        let text = String::from_utf8(got["seed.img"].clone()).unwrap();
        let (named, seed) = text.split_once(' ').unwrap();
        assert_eq!(named, cp, "checkpoint {cp} holds the image of {named}");
        let seed: u64 = seed.parse().unwrap();
        assert!(
            got == image_files(cp, seed),
            "checkpoint {cp} (seed {seed}) did not restore bit-identically"
        );
        seed
    });
    fs::remove_dir_all(&dest).unwrap();
    result
}

fn unique() -> u128 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    t ^ u128::from(N.fetch_add(1, Ordering::SeqCst)) << 100
}

/// Keys (relative to the bucket) of the objects under `PREFIX/<dir>/` in the server's files.
fn objects(server: &S3Server, dir: &str) -> BTreeSet<String> {
    let base = server.root.join(BUCKET).join(PREFIX).join(dir);
    match fs::read_dir(&base) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// Seeded xorshift, so the run's choices repeat.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// A store acknowledged with `Ok`.
    Stored { seed: u64 },
    /// A removal that found and removed the checkpoint.
    Deleted,
}

#[derive(Clone, Debug)]
struct Event {
    cp: &'static str,
    op: Op,
    start: Instant,
    end: Instant,
}

const NAMES: [&str; 5] = ["ck-a", "ck-b", "ck-c", "ck-d", "ck-e"];

#[test]
fn two_nodes_store_delete_and_restore_overlapping_checkpoints_for_60_seconds() {
    let tmp = tempfile::tempdir().unwrap();
    let server = S3Server::start(&tmp.path().join("s3"));
    let (ttl, grace) = (3, 2);
    let nodes = [
        node(&server, "node-1", ttl, grace),
        node(&server, "node-2", ttl, grace),
    ];
    let events = Mutex::new(Vec::<Event>::new());
    let conflicts = Mutex::new(0usize);
    let restores_ok = Mutex::new(0usize);
    let sweeps = Mutex::new(0usize);
    let run_for = Duration::from_secs(60);
    let started = Instant::now();

    std::thread::scope(|s| {
        for (i, tier) in nodes.iter().enumerate() {
            let node_no = u64::try_from(i).unwrap() + 1;
            let (events, conflicts, restores_ok, sweeps) =
                (&events, &conflicts, &restores_ok, &sweeps);
            let work = tmp.path().join(format!("node-{node_no}"));
            s.spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15_u64.wrapping_mul(node_no));
                let mut counter = 0u64;
                while started.elapsed() < run_for {
                    let cp = NAMES[usize::try_from(rng.below(5)).unwrap()];
                    let roll = rng.below(100);
                    let start = Instant::now();
                    if (5..50).contains(&roll) {
                        counter += 1;
                        let seed = node_no * 1_000_000 + counter;
                        let dir = work.join(format!("src-{seed}"));
                        write_image(&dir, &image_files(cp, seed));
                        let stored = tier.store(&name(cp), &dir);
                        fs::remove_dir_all(&dir).unwrap();
                        match stored {
                            Ok(_) => events.lock().unwrap().push(Event {
                                cp,
                                op: Op::Stored { seed },
                                start,
                                end: Instant::now(),
                            }),
                            Err(TierError::AlreadyExists { .. }) => {
                                *conflicts.lock().unwrap() += 1;
                            }
                            Err(e) => panic!("node {node_no}: store of {cp} failed: {e}"),
                        }
                    } else if roll < 5 {
                        // A sweep with no removal, as an idle node would run it.
                        let report = tier.collect_garbage().unwrap();
                        *sweeps.lock().unwrap() += report.packs_deleted;
                    } else if roll < 75 {
                        match tier.remove(&name(cp)) {
                            Ok(true) => events.lock().unwrap().push(Event {
                                cp,
                                op: Op::Deleted,
                                start,
                                end: Instant::now(),
                            }),
                            Ok(false) => {}
                            Err(e) => panic!("node {node_no}: removal of {cp} failed: {e}"),
                        }
                    } else {
                        // Packs go two grace periods after their last reference at the
                        // earliest, so a restore finds its checkpoint whole or not at all.
                        match restore(tier, cp, &work) {
                            Ok(_) => *restores_ok.lock().unwrap() += 1,
                            Err(TierError::NotFound { .. }) => {}
                            Err(e) => panic!("node {node_no}: restore of {cp} failed: {e}"),
                        }
                    }
                }
            });
        }
    });

    let events = events.into_inner().unwrap();
    let deletes: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e.op, Op::Deleted))
        .collect();
    let deleted_after = |cp: &str, t: Instant| deletes.iter().any(|d| d.cp == cp && d.end > t);
    // Every acknowledged store that no removal followed restores to exactly its image.
    let listed: BTreeSet<String> = nodes[0]
        .list()
        .unwrap()
        .iter()
        .map(|n| n.to_string())
        .collect();
    let mut stored_seeds: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    let mut verified_at_end = 0;
    for e in &events {
        if let Op::Stored { seed } = e.op {
            stored_seeds.entry(e.cp).or_default().insert(seed);
            if !deleted_after(e.cp, e.start) {
                assert!(listed.contains(e.cp), "{} (seed {seed}) was lost", e.cp);
                let got = restore(&nodes[1], e.cp, tmp.path()).unwrap();
                assert_eq!(got, seed, "{} holds another store's image", e.cp);
                verified_at_end += 1;
            }
        }
    }
    for cp in &listed {
        let seed = restore(&nodes[0], cp, tmp.path()).unwrap();
        assert!(
            stored_seeds
                .get(cp.as_str())
                .is_some_and(|s| s.contains(&seed)),
            "{cp} holds seed {seed}, which no acknowledged store wrote"
        );
    }
    assert!(nodes[0].leases().unwrap().is_empty(), "leases are left");
    assert!(nodes[1].unfinished_uploads().unwrap().is_empty());
    let open: Vec<String> = open_uploads(&server.root)
        .into_iter()
        .map(|u| u.key)
        .collect();
    assert!(open.is_empty(), "unfinished uploads: {open:?}");

    let stores = events
        .iter()
        .filter(|e| matches!(e.op, Op::Stored { .. }))
        .count();
    let refused = server.faults.refused_keys.lock().unwrap().clone();
    let refused_in = |dir: &str| refused.iter().filter(|k| k.contains(dir)).count();
    eprintln!(
        "60 s run: {stores} stores acknowledged, {} refused because the name was taken \
         ({} of them by the server's If-None-Match on the manifest), {} removals, {} restores \
         verified bit-identical during the run and {verified_at_end} at the end, {} packs \
         deleted during the run ({} by sweeps between removals), {} checkpoints left",
        conflicts.into_inner().unwrap(),
        refused_in("/manifests/"),
        deletes.len(),
        restores_ok.into_inner().unwrap(),
        server
            .faults
            .deleted_keys
            .lock()
            .unwrap()
            .iter()
            .filter(|k| k.contains("/packs/"))
            .count(),
        sweeps.into_inner().unwrap(),
        listed.len(),
    );
    assert!(
        stores >= 20 && deletes.len() >= 10,
        "too little happened: {stores} stores, {} removals",
        deletes.len()
    );

    // Removing everything leaves nothing once collection has had its two grace periods.
    for cp in &listed {
        assert!(nodes[1].remove(&name(cp)).unwrap());
    }
    let mut deleted = 0;
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(grace * 1000 + 200));
        deleted += nodes[0].collect_garbage().unwrap().packs_deleted;
    }
    assert!(deleted > 0);
    assert!(
        objects(&server, "packs").is_empty(),
        "{:?}",
        objects(&server, "packs")
    );
    for dir in ["manifests", "index", "leases", "records", "gc/doomed"] {
        assert!(
            objects(&server, dir).is_empty(),
            "{dir}: {:?}",
            objects(&server, dir)
        );
    }
}

#[test]
fn a_different_checkpoint_under_a_taken_name_is_refused_and_the_same_one_is_a_no_op() {
    let tmp = tempfile::tempdir().unwrap();
    let server = S3Server::start(&tmp.path().join("s3"));
    let (a, b) = (
        node(&server, "node-a", 60, 60),
        node(&server, "node-b", 60, 60),
    );
    let first = image_files("shared", 1);
    let src_a = tmp.path().join("a");
    write_image(&src_a, &first);
    a.store(&name("shared"), &src_a).unwrap();

    let src_b = tmp.path().join("b");
    write_image(&src_b, &image_files("shared", 2));
    let err = b.store(&name("shared"), &src_b).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, TierError::AlreadyExists { .. }), "{msg}");
    assert!(
        msg.contains("checkpoint shared already exists") && msg.contains("another node"),
        "{msg}"
    );
    assert_eq!(
        restore(&a, "shared", tmp.path()).unwrap(),
        1,
        "not overwritten"
    );

    // The same image under the same name (a retried demotion) is stored already.
    let report = b.store(&name("shared"), &src_a).unwrap();
    assert_eq!(report.stored_bytes, 0);
    assert_eq!(objects(&server, "packs").len(), 1);
    assert!(a.leases().unwrap().is_empty());
}

#[test]
fn young_packs_survive_collection_and_unreferenced_ones_go_after_two_grace_periods() {
    let tmp = tempfile::tempdir().unwrap();
    let server = S3Server::start(&tmp.path().join("s3"));
    let grace = 1;
    let (a, b) = (
        node(&server, "node-a", 30, grace),
        node(&server, "node-b", 30, grace),
    );
    let patient = node(&server, "node-c", 30, 3600);
    let (src1, src2) = (tmp.path().join("one"), tmp.path().join("two"));
    // Seeds 3 and 6 share their first 512 KiB, so cp2 references cp1's pack.
    write_image(&src1, &image_files("cp1", 3));
    write_image(&src2, &image_files("cp2", 6));
    a.store(&name("cp1"), &src1).unwrap();
    b.store(&name("cp2"), &src2).unwrap();
    let packs = objects(&server, "packs");
    assert_eq!(packs.len(), 2);
    assert_eq!(
        b.manifest(&name("cp2")).unwrap().packs.len(),
        2,
        "cp2 shares cp1's pack"
    );

    // cp1's pack is still cp2's: it stays, however old.
    assert!(a.remove(&name("cp1")).unwrap());
    std::thread::sleep(Duration::from_millis(grace * 1000 + 200));
    let report = a.collect_garbage().unwrap();
    assert_eq!(
        (report.packs_marked, report.packs_deleted),
        (0, 0),
        "{report:?}"
    );
    assert_eq!(restore(&b, "cp2", tmp.path()).unwrap(), 6);

    // Unreferenced but younger than the grace period: kept.
    assert!(patient.remove(&name("cp2")).unwrap());
    let report = patient.collect_garbage().unwrap();
    assert_eq!(
        (report.packs_marked, report.packs_deleted),
        (0, 0),
        "{report:?}"
    );
    assert_eq!(objects(&server, "packs"), packs);

    // Older than the grace period: marked first, deleted a grace period later.
    let report = a.collect_garbage().unwrap();
    assert_eq!(
        (report.packs_marked, report.packs_deleted),
        (2, 0),
        "{report:?}"
    );
    assert_eq!(objects(&server, "packs"), packs);
    std::thread::sleep(Duration::from_millis(grace * 1000 + 200));
    let report = b.collect_garbage().unwrap();
    assert_eq!(report.packs_deleted, 2, "{report:?}");
    assert!(objects(&server, "packs").is_empty());
    // The marks outlive the packs by a grace period, then go.
    assert_eq!(objects(&server, "gc/doomed").len(), 2);
    std::thread::sleep(Duration::from_millis(grace * 1000 + 200));
    a.collect_garbage().unwrap();
    assert!(objects(&server, "gc/doomed").is_empty());
    assert_eq!(a.used_bytes().unwrap(), 0);
}

#[test]
fn a_crashed_store_keeps_its_pack_while_its_lease_lives_then_everything_is_collected() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s3");
    let mut server = S3Server::start(&root);
    let (ttl, grace) = (8, 1);
    let crashing = node(&server, "node-a", ttl, grace);
    let src = tmp.path().join("src");
    write_image(&src, &image_files("lost", 7));

    // The node's pack is complete, then the server goes away as the manifest is written.
    server.stop_on_put("/manifests/");
    let err = crashing.store(&name("lost"), &src).unwrap_err().to_string();
    server.wait_stopped();
    assert!(err.contains("manifest"), "{err}");
    drop(crashing);
    let addr = server.addr;
    drop(server);
    let mut server = S3Server::start_at(&root, addr);

    // A second crash leaves an unfinished multipart upload behind.
    server.set_fault(PartFault::StopAfter(0));
    let big = tmp.path().join("big");
    fs::create_dir_all(&big).unwrap();
    fs::write(
        big.join("pages-1.img"),
        fill_bytes(Fill::Noise(99), 6 << 20),
    )
    .unwrap();
    let crashing = node(&server, "node-b", ttl, grace);
    assert!(crashing.store(&name("big"), &big).is_err());
    server.wait_stopped();
    drop(crashing);
    drop(server);
    let server = S3Server::start_at(&root, addr);

    let other = node(&server, "node-c", ttl, grace);
    let leases = other.leases().unwrap();
    assert_eq!(leases.len(), 2, "{leases:?}");
    let pack = leases
        .iter()
        .find(|(_, l)| l.checkpoint == "lost")
        .map(|(_, l)| l.upload_key.clone())
        .unwrap();
    assert_eq!(
        objects(&server, "packs"),
        BTreeSet::from([pack.trim_start_matches("packs/").to_owned()])
    );
    assert_eq!(open_uploads(&server.root).len(), 1);

    // Older than the grace period, referenced by nothing, but leased: kept.
    std::thread::sleep(Duration::from_millis(grace * 1000 + 200));
    let report = other.collect_garbage().unwrap();
    assert_eq!(
        (
            report.packs_marked,
            report.uploads_aborted,
            report.leases_removed
        ),
        (0, 0, 0),
        "{report:?}"
    );

    // Once the leases ran out: the leases go, the upload is aborted, the pack is marked...
    let expiry = leases.iter().map(|(_, l)| l.expires_unix_ms).max().unwrap();
    std::thread::sleep(Duration::from_millis(expiry.saturating_sub(now_ms()) + 100));
    let report = other.collect_garbage().unwrap();
    assert_eq!(
        (
            report.leases_removed,
            report.uploads_aborted,
            report.packs_marked
        ),
        (2, 1, 1),
        "{report:?}"
    );
    assert!(other.leases().unwrap().is_empty());
    assert!(open_uploads(&server.root).is_empty());
    assert!(other.unfinished_uploads().unwrap().is_empty());
    // ...and deleted a grace period later.
    std::thread::sleep(Duration::from_millis(grace * 1000 + 200));
    assert_eq!(other.collect_garbage().unwrap().packs_deleted, 1);
    assert!(objects(&server, "packs").is_empty());
    assert!(!other.contains(&name("lost")).unwrap());
}

#[test]
fn stores_read_each_index_object_once_instead_of_every_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let server = S3Server::start(&tmp.path().join("s3"));
    let (a, b) = (
        node(&server, "node-a", 60, 60),
        node(&server, "node-b", 60, 60),
    );
    for (i, cp) in ["one", "two", "three"].iter().enumerate() {
        let src = tmp.path().join(cp);
        write_image(&src, &image_files(cp, u64::try_from(i).unwrap() + 10));
        a.store(&name(cp), &src).unwrap();
    }
    assert_eq!(objects(&server, "index").len(), 3);
    let gets = || server.faults.get_keys.lock().unwrap().clone();
    let count = |keys: &[String], dir: &str| {
        keys.iter()
            .filter(|k| k.contains(&format!("/{dir}/")))
            .count()
    };

    let before = gets().len();
    let src = tmp.path().join("four");
    write_image(&src, &image_files("four", 13));
    let (_, stats) = b.store_with_stats(&name("four"), &src).unwrap();
    assert!(stats.dedup_bytes > 0, "{stats:?}");
    let during = gets()[before..].to_vec();
    assert_eq!(count(&during, "index"), 3, "{during:?}");
    assert_eq!(
        count(&during, "manifests"),
        1,
        "only its own name: {during:?}"
    );

    let before = gets().len();
    let src = tmp.path().join("five");
    write_image(&src, &image_files("five", 14));
    b.store(&name("five"), &src).unwrap();
    let during = gets()[before..].to_vec();
    assert_eq!(count(&during, "index"), 1, "only the new one: {during:?}");
    assert_eq!(count(&during, "manifests"), 1, "{during:?}");
    assert_eq!(restore(&a, "five", tmp.path()).unwrap(), 14);
}

#[test]
fn the_sweeper_collects_what_a_crashed_store_left_without_any_removal() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s3");
    let mut server = S3Server::start(&root);
    let (ttl, grace) = (1, 1);
    let crashing = node(&server, "node-a", ttl, grace);
    let src = tmp.path().join("src");
    write_image(&src, &image_files("lost", 8));
    server.stop_on_put("/manifests/");
    assert!(crashing.store(&name("lost"), &src).is_err());
    server.wait_stopped();
    drop(crashing);
    let addr = server.addr;
    drop(server);
    let server = S3Server::start_at(&root, addr);
    assert_eq!(objects(&server, "packs").len(), 1);
    assert_eq!(objects(&server, "leases").len(), 1);

    let survivor = std::sync::Arc::new(node(&server, "node-b", ttl, grace));
    let sweeper = S3Tier::spawn_sweeper(&survivor).unwrap();
    // Lease expiry, then two grace periods, at one sweep a second: well within a minute.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(objects(&server, "packs").is_empty() && objects(&server, "leases").is_empty()) {
        assert!(Instant::now() < deadline, "the sweeper collected nothing");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(survivor);
    sweeper.join().unwrap();
}
