//! The capture and serve sessions driven by a scripted peer that plays CRIU's side of the
//! protocol, byte for byte as `criu/img-streamer.c` does. CRIU itself drives them in
//! `tests/stream_criu.rs`; these cover the edges CRIU cannot be made to hit on purpose.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use prost::Message;

use super::wire::tests::{send_fd, send_request};
use super::wire::ReplyEntry;
use crate::{CheckpointName, ChunkConfig, NvmeTier, Tier, TierError};

const CHUNK: usize = 64 << 10;

fn tier(dir: &Path) -> Arc<NvmeTier> {
    let config = ChunkConfig {
        chunk_size: CHUNK,
        workers: 2,
        ..ChunkConfig::default()
    };
    Arc::new(NvmeTier::open(dir.join("nvme"), config).unwrap())
}

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect()
}

/// A page image with zero, text and noise runs, not a whole number of chunks.
fn pages() -> Vec<u8> {
    let mut data = vec![0u8; 2 * CHUNK];
    data.extend((0..3 * CHUNK + 100).map(|i| b"heap object 16b;"[i % 16]));
    data.extend(noise(CHUNK + 4096, 7));
    data
}

/// Plays `criu dump --stream` sending `images`, each through its own pipe.
fn dump_as_criu(socket: &Path, images: &[(&str, &[u8])]) {
    let mut sock = UnixStream::connect(socket).unwrap();
    for (name, data) in images {
        let (read_end, mut write_end) = std::io::pipe().unwrap();
        send_request(&mut sock, name);
        send_fd(&sock, &read_end);
        drop(read_end);
        write_end.write_all(data).unwrap();
    }
}

/// Plays `criu restore --stream` asking for `name`: the bytes served, or `None` when the
/// streamer says the image does not exist.
fn restore_as_criu(sock: &mut UnixStream, name: &str) -> Option<Vec<u8>> {
    send_request(sock, name);
    let mut len = [0u8; 4];
    sock.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; usize::try_from(u32::from_ne_bytes(len)).unwrap()];
    sock.read_exact(&mut body).unwrap();
    if !ReplyEntry::decode(body.as_slice()).unwrap().exists {
        return None;
    }
    let (mut read_end, write_end) = std::io::pipe().unwrap();
    send_fd(sock, &write_end);
    drop(write_end);
    let mut data = Vec::new();
    read_end.read_to_end(&mut data).unwrap();
    Some(data)
}

fn name(s: &str) -> CheckpointName {
    CheckpointName::new(s).unwrap()
}

fn chunk_files(tier: &NvmeTier) -> usize {
    let mut n = 0;
    for shard in std::fs::read_dir(tier.root().join("chunks")).unwrap() {
        let shard = shard.unwrap();
        n += std::fs::read_dir(shard.path()).unwrap().count();
    }
    n
}

#[test]
fn a_captured_stream_loads_and_serves_back_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let tier = tier(dir.path());
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let pages = pages();
    let cp = name("streamed");
    let capture = tier.capture(&cp, &images).unwrap();
    dump_as_criu(
        capture.socket_path(),
        &[
            ("pages-1.img", &pages),
            ("core-1.img", b"core entry"),
            ("empty.img", b""),
        ],
    );
    let report = capture.commit().unwrap();
    assert_eq!(
        report.raw_bytes,
        u64::try_from(pages.len() + 10).unwrap(),
        "{report:?}"
    );
    assert_eq!(report.zero_bytes, 2 * CHUNK as u64, "{report:?}");
    assert!(
        report.dedup_bytes >= CHUNK as u64,
        "repeated text chunks dedup: {report:?}"
    );
    assert_eq!(tier.list().unwrap(), vec![cp.clone()]);
    let left: Vec<_> = std::fs::read_dir(&images).unwrap().collect();
    assert!(left.is_empty(), "nothing lands in the images dir: {left:?}");

    let loaded = dir.path().join("loaded");
    std::fs::create_dir(&loaded).unwrap();
    tier.load(&cp, &loaded).unwrap();
    assert_eq!(std::fs::read(loaded.join("pages-1.img")).unwrap(), pages);
    assert_eq!(
        std::fs::read(loaded.join("core-1.img")).unwrap(),
        b"core entry"
    );
    assert!(std::fs::read(loaded.join("empty.img")).unwrap().is_empty());

    let restore = dir.path().join("restore");
    std::fs::create_dir(&restore).unwrap();
    let serve = tier.serve(&cp, &restore).unwrap();
    let mut sock = UnixStream::connect(serve.socket_path()).unwrap();
    assert_eq!(
        restore_as_criu(&mut sock, "pages-1.img"),
        Some(pages.clone())
    );
    assert_eq!(restore_as_criu(&mut sock, "missing.img"), None);
    assert_eq!(
        restore_as_criu(&mut sock, "core-1.img").as_deref(),
        Some(&b"core entry"[..])
    );
    drop(sock);
    let served = serve.finish().unwrap();
    assert_eq!(served.bytes, u64::try_from(pages.len() + 10).unwrap());
}

#[test]
fn an_aborted_capture_leaves_no_checkpoint_and_no_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let tier = tier(dir.path());
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let capture = tier.capture(&name("failed"), &images).unwrap();
    dump_as_criu(capture.socket_path(), &[("pages-1.img", &pages())]);
    assert!(capture.abort().is_none(), "nothing failed on our side");
    assert!(tier.list().unwrap().is_empty());
    assert_eq!(chunk_files(&tier), 0);
    assert_eq!(tier.used_bytes().unwrap(), 0);

    // CRIU never connected at all.
    let capture = tier.capture(&name("never"), &images).unwrap();
    assert!(capture.abort().is_none());
    assert!(tier.list().unwrap().is_empty());
}

#[test]
fn an_image_sent_twice_fails_the_capture() {
    let dir = tempfile::tempdir().unwrap();
    let tier = tier(dir.path());
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let capture = tier.capture(&name("twice"), &images).unwrap();
    dump_as_criu(
        capture.socket_path(),
        &[("core-1.img", b"one"), ("core-1.img", b"two")],
    );
    let err = capture.commit().unwrap_err();
    assert!(err.to_string().contains("core-1.img twice"), "{err}");
    assert!(tier.list().unwrap().is_empty());
    assert_eq!(chunk_files(&tier), 0);
}

#[test]
fn a_bad_chunk_stops_its_image_and_fails_the_action_script() {
    let dir = tempfile::tempdir().unwrap();
    let tier = tier(dir.path());
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let cp = name("damaged");
    let capture = tier.capture(&cp, &images).unwrap();
    let data = noise(3 * CHUNK, 11);
    dump_as_criu(capture.socket_path(), &[("pages-1.img", &data)]);
    capture.commit().unwrap();
    let manifest = tier.manifest(&cp).unwrap();
    let bad = manifest.files[0].chunks[1];
    let path = tier.chunk_path(&bad.hash);
    let mut stored = std::fs::read(&path).unwrap();
    stored[100] ^= 0xff;
    std::fs::write(&path, stored).unwrap();

    let restore = dir.path().join("restore");
    std::fs::create_dir(&restore).unwrap();
    let serve = tier.serve(&cp, &restore).unwrap();
    let script = serve.action_script().to_owned();
    let run_script = |action: &str| {
        std::process::Command::new(&script)
            .env("CRTOOLS_SCRIPT_ACTION", action)
            .status()
            .unwrap()
            .success()
    };
    assert!(run_script("post-restore"), "no failure yet");
    let mut sock = UnixStream::connect(serve.socket_path()).unwrap();
    let got = restore_as_criu(&mut sock, "pages-1.img").unwrap();
    assert_eq!(got, data[..CHUNK], "only the chunk before the bad one");
    drop(sock);
    let err = serve.finish().unwrap_err();
    assert!(matches!(err, TierError::Corrupt { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("damaged") && text.contains("chunk 1") && text.contains(&bad.hash.to_hex()),
        "{text}"
    );
    assert!(!run_script("post-restore"), "CRIU must abort the restore");
    assert!(run_script("pre-restore"), "other steps are not affected");
}

#[test]
fn chunks_no_manifest_references_are_swept_when_the_tier_opens() {
    let dir = tempfile::tempdir().unwrap();
    let tier = tier(dir.path());
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let kept = name("kept");
    let capture = tier.capture(&kept, &images).unwrap();
    dump_as_criu(capture.socket_path(), &[("pages-1.img", &pages())]);
    capture.commit().unwrap();
    let held = chunk_files(&tier);
    // What an agent killed in the middle of a stream leaves: chunks without a manifest.
    let orphan = tier.chunk_path(&crate::ChunkHash::of(b"cut off mid-stream"));
    std::fs::create_dir_all(orphan.parent().unwrap()).unwrap();
    std::fs::write(&orphan, b"cut off mid-stream").unwrap();
    drop(tier);

    let tier = self::tier(dir.path());
    assert!(!orphan.exists(), "space is reclaimed");
    assert_eq!(chunk_files(&tier), held, "referenced chunks stay");
    let loaded = dir.path().join("loaded");
    std::fs::create_dir(&loaded).unwrap();
    tier.load(&kept, &loaded).unwrap();
    assert_eq!(std::fs::read(loaded.join("pages-1.img")).unwrap(), pages());
}
