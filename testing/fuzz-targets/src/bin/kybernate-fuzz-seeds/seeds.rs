//! Seed values for the targets whose inputs the code builds from its own types.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use kybernate_agent::catalog::{CheckpointRecord, Phase};
use kybernate_agent::images::ImageFile;
use kybernate_agent::tenancy::{Origin, PodOrigin};
use kybernate_dataplane::{
    CheckpointManifest, CheckpointName, ChunkEncoding, ChunkHash, ChunkLocation, ChunkRef,
    FileEntry,
};
use kybernate_proto::agent::v1 as pb;
use prost::Message;

type Seeds = Vec<(String, Vec<u8>)>;

/// Manifests the data plane writes: an NVMe one (chunks in the store) and an S3 one (chunks
/// in packs), each whole and as a bare body (the target frames bodies), and damaged ones.
pub fn manifests() -> Result<Seeds> {
    let chunk = |n: u8, encoding, raw_len, stored_len, location| ChunkRef {
        hash: ChunkHash::of(&[n; 16]),
        encoding,
        raw_len,
        stored_len,
        location,
    };
    let nvme = CheckpointManifest {
        name: CheckpointName::new("web-1764770000-0a1b")?,
        key_id: None,
        chunk_size: 1 << 20,
        packs: Vec::new(),
        files: vec![
            FileEntry {
                name: "pagemap-1.img".into(),
                size: 4096,
                mode: 0o600,
                chunks: vec![chunk(0, ChunkEncoding::Zero, 4096, 0, ChunkLocation::Store)],
            },
            FileEntry {
                name: "pages-1.img".into(),
                size: (1 << 20) + 4096,
                mode: 0o600,
                chunks: vec![
                    chunk(1, ChunkEncoding::Zstd, 1 << 20, 1000, ChunkLocation::Store),
                    chunk(2, ChunkEncoding::Raw, 4096, 4096, ChunkLocation::Store),
                ],
            },
        ],
    };
    let s3 = CheckpointManifest {
        name: CheckpointName::new("train-7")?,
        key_id: None,
        chunk_size: 8 << 20,
        packs: vec!["packs/train-7-0".into(), "packs/train-7-1".into()],
        files: vec![FileEntry {
            name: "core-1.img".into(),
            size: 12288,
            mode: 0o600,
            chunks: vec![
                chunk(
                    3,
                    ChunkEncoding::Raw,
                    8192,
                    8192,
                    ChunkLocation::Pack { pack: 0, offset: 0 },
                ),
                chunk(
                    4,
                    ChunkEncoding::Zstd,
                    4096,
                    77,
                    ChunkLocation::Pack {
                        pack: 1,
                        offset: 8192,
                    },
                ),
            ],
        }],
    };
    let mut seeds = Vec::new();
    for (label, manifest) in [("nvme", nvme), ("s3", s3)] {
        let mut whole = Vec::new();
        manifest.write_to(&mut whole)?;
        let body = whole[20..whole.len() - 32].to_vec();
        let mut flipped = whole.clone();
        let last = flipped.len() - 40;
        flipped[last] ^= 1;
        seeds.push((format!("ok-{label}-whole"), whole));
        seeds.push((format!("ok-{label}-body"), body));
        seeds.push((format!("bad-{label}-flipped-byte"), flipped));
    }
    Ok(seeds)
}

/// Records as the agent writes them: node-local, from a pod and from an unmanaged container;
/// and records another node could have written wrongly.
pub fn records() -> Result<Seeds> {
    let record = |name: &str, origin| CheckpointRecord {
        name: name.into(),
        pid: 4242,
        container_id: String::new(),
        pod_uid: String::new(),
        gpu_group: String::new(),
        gpu_seat: String::new(),
        created_unix: 1_764_770_000,
        leave_running: false,
        shell_job: false,
        phases: vec![Phase {
            name: "criu_dump".into(),
            millis: 812,
        }],
        raw_bytes: 1 << 20,
        stored_bytes: 4096,
        files: vec![ImageFile {
            name: "pages-1.img".into(),
            size: 1 << 20,
            chunk_size: 1 << 20,
            chunks: vec![ChunkHash::of(b"pages").to_hex()],
        }],
        gpu: None,
        note: String::new(),
        origin,
    };
    let pod = Origin::Pod(PodOrigin {
        namespace: "tenant-a".into(),
        pod_uid: "0b6c3f8e-4f1e-4c55-9d62-1d2f3a4b5c6d".into(),
        pod_name: "trainer-0".into(),
        service_account: String::new(),
    });
    let mut from_pod = record("trainer-0-1764770000-beef", pod);
    from_pod.container_id = "3f2a9c".into();
    from_pod.pod_uid = "0b6c3f8e-4f1e-4c55-9d62-1d2f3a4b5c6d".into();
    from_pod.leave_running = true;
    let mut seeds = vec![
        (
            "ok-node-local".into(),
            serde_json::to_vec(&record("pid4242-1764770000-0001", Origin::NodeLocal))?,
        ),
        ("ok-pod".into(), serde_json::to_vec_pretty(&from_pod)?),
        (
            "ok-unmanaged".into(),
            serde_json::to_vec(&record("ctr-1", Origin::UnmanagedContainer))?,
        ),
    ];
    let mut bad_name = serde_json::to_value(record("x", Origin::NodeLocal))?;
    bad_name["name"] = "../../etc".into();
    let mut bad_file = serde_json::to_value(record("x", Origin::NodeLocal))?;
    bad_file["files"][0]["name"] = "../pages-1.img".into();
    let mut bad_origin = serde_json::to_value(&from_pod)?;
    bad_origin["origin"]["namespace"] = "Tenant A".into();
    for (name, value) in [
        ("bad-name", bad_name),
        ("bad-file-name", bad_file),
        ("bad-origin", bad_origin),
    ] {
        seeds.push((name.to_owned(), serde_json::to_vec(&value)?));
    }
    Ok(seeds)
}

/// The shipped config file, a config that sets every table, and refused ones.
pub fn configs(repo: &Path) -> Result<Seeds> {
    let shipped =
        fs::read(repo.join("deploy/agent-config.toml")).context("deploy/agent-config.toml")?;
    let full = br#"socket = "/run/kb/agent.sock"
state_dir = "/srv/kybernate"
allowed_uids = [1000, 1001]

[tiers]
ram_path = "/dev/shm/kb"
nvme_path = "/mnt/nvme/kb"
ram_budget_bytes = 8589934592
nvme_budget_bytes = 107374182400

[tiers.ram]
high_watermark_percent = 80
low_watermark_percent = 60
max_age_secs = 3600

[dataplane]
chunk_size_mib = 8
zstd_level = 3

[timeouts]
dump_ms = 60000
shim_lease_ms = 120000

[s3]
endpoint = "http://127.0.0.1:9000"
region = "us-east-1"
bucket = "checkpoints"
prefix = "node-a/"
force_path_style = true
access_key_id = "kybernate"
"#;
    Ok(vec![
        ("ok-shipped".into(), shipped),
        ("ok-every-table".into(), full.to_vec()),
        ("ok-empty".into(), Vec::new()),
        (
            "bad-relative-state-dir".into(),
            b"state_dir = \"var/lib/kb\"\n".to_vec(),
        ),
        (
            "bad-watermarks".into(),
            b"[tiers.nvme]\nhigh_watermark_percent = 50\nlow_watermark_percent = 70\n".to_vec(),
        ),
        (
            "bad-secret-in-file".into(),
            b"[s3]\nbucket = \"b\"\nsecret_access_key = \"hunter2\"\n".to_vec(),
        ),
        ("bad-unknown-key".into(), b"sockets = \"/run/x\"\n".to_vec()),
    ])
}

/// One request of each type the agent checks, prefixed with the target's type byte.
pub fn requests() -> Seeds {
    let pod = Some(pb::PodIdentity {
        namespace: "tenant-a".into(),
        pod_uid: "0b6c3f8e-4f1e-4c55-9d62-1d2f3a4b5c6d".into(),
        pod_name: "trainer-0".into(),
    });
    let typed = |kind: u8, message: Vec<u8>| [vec![kind], message].concat();
    vec![
        (
            "ok-checkpoint".into(),
            typed(
                0,
                pb::CheckpointRequest {
                    name: "web-1".into(),
                    pid: 4242,
                    tier: "s3".into(),
                    leave_running: true,
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
        ),
        (
            "ok-restore".into(),
            typed(
                1,
                pb::RestoreRequest {
                    checkpoint_ref: "web-1".into(),
                    from_tier: "nvme".into(),
                    timeout_ms: 60000,
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
        ),
        (
            "ok-inspect".into(),
            typed(
                2,
                pb::InspectRequest {
                    checkpoint_ref: "web-1".into(),
                }
                .encode_to_vec(),
            ),
        ),
        (
            "ok-delete".into(),
            typed(
                3,
                pb::DeleteRequest {
                    checkpoint_ref: "web-1".into(),
                }
                .encode_to_vec(),
            ),
        ),
        (
            "ok-prefetch".into(),
            typed(
                4,
                pb::PrefetchRequest {
                    checkpoint_ref: "web-1".into(),
                    to_tier: "ram".into(),
                }
                .encode_to_vec(),
            ),
        ),
        (
            "ok-container-checkpoint-begin".into(),
            typed(
                5,
                pb::ContainerCheckpointBeginRequest {
                    container_id: "3f2a9c".into(),
                    pids: vec![4242, 4243],
                    pod: pod.clone(),
                    cuda_timeout_ms: 30000,
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
        ),
        (
            "ok-container-checkpoint-end".into(),
            typed(
                6,
                pb::ContainerCheckpointEndRequest {
                    checkpoint_ref: "3f2a9c-1764770000-beef".into(),
                    dumped: true,
                    dump_millis: 812,
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
        ),
        (
            "ok-container-restore-stage".into(),
            typed(
                7,
                pb::ContainerRestoreStageRequest {
                    checkpoint_ref: "web-1".into(),
                    container_id: "9e1d".into(),
                    from_tier: "".into(),
                    target: pod,
                }
                .encode_to_vec(),
            ),
        ),
        (
            "ok-container-restore-end".into(),
            typed(
                8,
                pb::ContainerRestoreEndRequest {
                    checkpoint_ref: "web-1".into(),
                    pids: vec![77],
                    restored: true,
                }
                .encode_to_vec(),
            ),
        ),
        (
            "ok-pin".into(),
            typed(
                9,
                pb::PinRequest {
                    checkpoint_ref: "web-1".into(),
                    tier: "nvme".into(),
                }
                .encode_to_vec(),
            ),
        ),
        (
            "ok-unpin".into(),
            typed(
                10,
                pb::UnpinRequest {
                    checkpoint_ref: "web-1".into(),
                }
                .encode_to_vec(),
            ),
        ),
        (
            "bad-restore-traversal".into(),
            typed(
                1,
                pb::RestoreRequest {
                    checkpoint_ref: "../../etc/passwd".into(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
        ),
        (
            "bad-pin-s3".into(),
            typed(
                9,
                pb::PinRequest {
                    checkpoint_ref: "web-1".into(),
                    tier: "s3".into(),
                }
                .encode_to_vec(),
            ),
        ),
        (
            "bad-begin-bad-namespace".into(),
            typed(
                5,
                pb::ContainerCheckpointBeginRequest {
                    container_id: "c".into(),
                    pids: vec![1],
                    pod: Some(pb::PodIdentity {
                        namespace: "Tenant_A".into(),
                        pod_uid: "u".into(),
                        pod_name: "p".into(),
                    }),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
        ),
        ("bad-not-protobuf".into(), vec![2, 0xff, 0xff, 0xff]),
    ]
}

/// A whiteout (character device 0/0), as overlayfs marks a deleted file.
pub fn whiteout(path: &Path) -> Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: `c` is NUL-terminated and lives for the call; the rest are plain integers.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(0, 0)) };
    ensure!(
        rc == 0,
        "mknod {} (run as root): {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// A tar of `(raw name, file content, symlink target)` entries whose names bypass the tar
/// crate's own checks, as a hostile checkpoint would carry.
pub fn tar_of(entries: &[(&str, Option<&str>, Option<&str>)]) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, content, link) in entries {
        let mut header = tar::Header::new_old();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_mode(0o644);
        let data = content.unwrap_or_default().as_bytes();
        if let Some(target) = link {
            header.set_entry_type(tar::EntryType::Symlink);
            header.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
        }
        header.set_size(u64::try_from(data.len())?);
        header.set_cksum();
        builder.append(&header, data)?;
    }
    Ok(builder.into_inner()?)
}
