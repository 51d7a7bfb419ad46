//! Streamed checkpoints with the real CRIU 4.2: `criu dump --stream` into the NVMe tier and
//! `criu restore --stream` back out of it, with no image set on disk in between. Needs root
//! and `criu` on PATH; fails loudly without them.
//!
//! The workload is a Python process (not ours, and with the interpreter's own heap around
//! it) holding a buffer of mixed content: touched zero pages, incompressible weight-like
//! bytes and compressible heap-like text. It prints the BLAKE2 of the buffer when it is
//! ready, and again into a file each time it gets SIGUSR1, so a restored process proves its
//! memory is bit-identical.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kybernate_dataplane::{
    CheckpointName, ChunkConfig, DataPlane, IoBackend, IoMode, KeyRing, NvmeTier, Sealing, Tier,
    TierError,
};

const WORKLOAD: &str = r#"
import hashlib, os, random, signal, sys, time
mib, state = int(sys.argv[1]), sys.argv[2]
MIB = 1 << 20
buf = bytearray(mib * MIB)
zero_end = mib * 4 // 10 * MIB
weights_end = zero_end + mib * 3 // 10 * MIB
zeros = bytes(MIB)
for off in range(0, zero_end, MIB):
    buf[off:off + MIB] = zeros
rng = random.Random(17)
for off in range(zero_end, weights_end, MIB):
    buf[off:off + MIB] = rng.randbytes(MIB)
text = b"".join(b"key:%08d value:%08x;" % (i, (i * 2654435761) & 0xffffffff) for i in range(MIB // 26 + 1))[:MIB]
for n, off in enumerate(range(weights_end, len(buf), MIB)):
    end = min(off + MIB, len(buf))
    buf[off:end] = text[:end - off]
    buf[off:off + 8] = n.to_bytes(8, "little")
def digest():
    return hashlib.blake2b(buf).hexdigest()
def verify(signum, frame):
    with open(state + ".verify.tmp", "w") as f:
        f.write(digest())
    os.rename(state + ".verify.tmp", state + ".verify")
signal.signal(signal.SIGUSR1, verify)
with open(state + ".tmp", "w") as f:
    f.write(digest())
os.rename(state + ".tmp", state)
while True:
    time.sleep(0.05)
    open(state + ".ran", "w").close()
"#;

fn require_root_and_criu() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "CRIU tests must run as root");
    let found = Command::new("criu")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "criu (4.2 or newer) not on PATH; run scripts/install-test-deps.sh"
    );
}

fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `pid` exists and is not a zombie waiting to be reaped.
fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// The Python workload, in its own session (so CRIU needs no `--shell-job`).
struct Workload {
    child: Option<Child>,
    pid: i32,
    state: PathBuf,
    ready: String,
}

impl Workload {
    fn start(dir: &Path, mib: usize) -> Self {
        let script = dir.join("workload.py");
        fs::write(&script, WORKLOAD).unwrap();
        let state = dir.join("workload.state");
        let mut command = Command::new("python3");
        command
            .arg(&script)
            .arg(mib.to_string())
            .arg(&state)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: setsid is async-signal-safe and touches only the new child.
        unsafe {
            command.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let child = command.spawn().expect("python3 is needed for the workload");
        let pid = i32::try_from(child.id()).unwrap();
        let ready = wait_for(
            "the workload to fill its memory",
            Duration::from_secs(120),
            || fs::read_to_string(&state).ok(),
        );
        Self {
            child: Some(child),
            pid,
            state,
            ready,
        }
    }

    /// Reaps the workload after CRIU's dump ended it, so its PID is free for the restore.
    fn reap_dumped(&mut self) {
        let status = self.child.take().unwrap().wait().unwrap();
        assert!(!status.success(), "the dump kills the workload");
    }

    /// The digest the running (or restored) workload computes now.
    fn digest_now(&self) -> String {
        let verify = self.state.with_extension("state.verify");
        let _ = fs::remove_file(&verify);
        // SAFETY: sends a signal to the workload's PID, which this test owns.
        assert_eq!(unsafe { libc::kill(self.pid, libc::SIGUSR1) }, 0);
        wait_for("the workload's digest", Duration::from_secs(60), || {
            fs::read_to_string(&verify).ok()
        })
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        // SAFETY: kills the workload (original or restored) this test started.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

fn criu(args: &[&str], dir: &Path, log: &str) -> Output {
    let out = Command::new("criu")
        .args(args)
        .args(["-W", dir.to_str().unwrap(), "-o", log, "-v2"])
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!(
            "criu {args:?} failed: {}\n{}",
            out.status,
            fs::read_to_string(dir.join(log)).unwrap_or_default()
        );
    }
    out
}

fn dump(pid: i32, images: &Path, work: &Path, script: &Path) -> Output {
    criu(
        &[
            "dump",
            "-t",
            &pid.to_string(),
            "-D",
            images.to_str().unwrap(),
            "--stream",
            "--action-script",
            script.to_str().unwrap(),
        ],
        work,
        "dump.log",
    )
}

fn restore(images: &Path, work: &Path, script: &Path) -> (Output, Option<i32>) {
    let pidfile = work.join("restored.pid");
    let out = criu(
        &[
            "restore",
            "-D",
            images.to_str().unwrap(),
            "--stream",
            "--restore-detached",
            "--pidfile",
            pidfile.to_str().unwrap(),
            "--action-script",
            script.to_str().unwrap(),
        ],
        work,
        "restore.log",
    );
    let pid = fs::read_to_string(&pidfile)
        .ok()
        .and_then(|p| p.trim().parse().ok());
    (out, pid)
}

struct Fixture {
    dir: tempfile::TempDir,
    tier: Arc<NvmeTier>,
}

impl Fixture {
    fn new(nvme: Option<&Path>) -> Self {
        Self::with_io(nvme, IoMode::Auto)
    }

    /// A fixture whose tier runs on a data plane of its own with I/O engine `io`.
    fn with_io(nvme: Option<&Path>, io: IoMode) -> Self {
        require_root_and_criu();
        let dir = tempfile::Builder::new()
            .prefix("kyb-stream-criu.")
            .tempdir()
            .unwrap();
        let root = nvme.map_or_else(|| dir.path().join("nvme"), Path::to_owned);
        let plane = DataPlane::start(io, &ChunkConfig::default()).unwrap();
        let tier = Arc::new(NvmeTier::open_on(root, ChunkConfig::default(), plane).unwrap());
        Self { dir, tier }
    }

    /// A fixture whose tier seals every chunk with one key (encryption at rest).
    fn sealed() -> Self {
        require_root_and_criu();
        let dir = tempfile::Builder::new()
            .prefix("kyb-stream-criu.")
            .tempdir()
            .unwrap();
        let keys = dir.path().join("keys");
        fs::create_dir_all(&keys).unwrap();
        fs::set_permissions(&keys, fs::Permissions::from_mode(0o700)).unwrap();
        let key = keys.join("2026-12-03");
        fs::write(&key, format!("{}\n", "5a".repeat(32))).unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o400)).unwrap();
        let ring = Arc::new(KeyRing::load(&keys).unwrap());
        let plane = DataPlane::start(IoMode::Auto, &ChunkConfig::default()).unwrap();
        let tier = Arc::new(
            NvmeTier::open_sealed(
                dir.path().join("nvme"),
                ChunkConfig::default(),
                plane,
                Sealing::sealed(ring),
            )
            .unwrap(),
        );
        Self { dir, tier }
    }

    fn subdir(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::create_dir_all(&path).unwrap();
        path
    }
}

fn image_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".img"))
        .collect()
}

#[test]
fn a_streamed_1_gib_round_trip_through_nvme_is_bit_identical() {
    streamed_round_trip(&Fixture::new(None), 1024, 400, "streamed-1g");
}

#[test]
fn a_streamed_round_trip_with_io_uring_forced_off_is_bit_identical() {
    let fx = Fixture::with_io(None, IoMode::Pread);
    assert!(
        matches!(fx.tier.plane().io_backend(), IoBackend::Pread { .. }),
        "{}",
        fx.tier.plane().io_backend()
    );
    // 40% of 256 MiB is zero, 96 MiB of it in whole 8 MiB chunks.
    streamed_round_trip(&fx, 256, 96, "streamed-pread");
}

#[test]
fn a_streamed_round_trip_with_encryption_at_rest_is_bit_identical_and_sealed() {
    let fx = Fixture::sealed();
    // 40% of 256 MiB is zero, 96 MiB of it in whole 8 MiB chunks.
    streamed_round_trip(&fx, 256, 96, "streamed-sealed");
    // The workload's heap text ("key:00000001 value:...") is in no stored file.
    let needle = b"key:00000001 value:";
    let mut files = vec![fx.dir.path().join("nvme")];
    let mut checked = 0;
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            let bytes = fs::read(&path).unwrap();
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{} holds the workload's memory in the clear",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(checked > 3, "only {checked} files stored");
}

/// Dumps a `mib` MiB workload with `criu dump --stream` into `fx`'s tier as `cp` (at least
/// `zero_mib` MiB of it skipped as zero chunks), restores it with `criu restore --stream` and
/// checks the memory is bit-identical.
fn streamed_round_trip(fx: &Fixture, mib: usize, zero_mib: u64, cp: &str) {
    let mut workload = Workload::start(fx.dir.path(), mib);
    let name = CheckpointName::new(cp).unwrap();
    let mib = u64::try_from(mib).unwrap();
    let images = fx.subdir("dump");
    let capture = fx.tier.capture(&name, &images).unwrap();
    let out = dump(
        workload.pid,
        &images,
        fx.dir.path(),
        capture.action_script(),
    );
    assert!(out.status.success(), "criu dump --stream failed");
    let report = capture.commit().unwrap();
    workload.reap_dumped();
    assert!(report.raw_bytes > mib << 20, "{report:?}");
    assert!(
        report.zero_bytes >= zero_mib << 20,
        "zero pages skipped: {report:?}"
    );
    assert!(
        report.stored_bytes < report.raw_bytes * 7 / 10,
        "zeros skipped and text compressed: {report:?}"
    );
    assert!(
        image_files(&images).is_empty(),
        "no image lands in the images dir"
    );
    assert_eq!(fx.tier.list().unwrap(), vec![name.clone()]);

    let restore_dir = fx.subdir("restore");
    let serve = fx.tier.serve(&name, &restore_dir).unwrap();
    let (out, pid) = restore(&restore_dir, fx.dir.path(), serve.action_script());
    let served = serve.finish().unwrap();
    assert!(out.status.success(), "criu restore --stream failed");
    assert_eq!(
        pid,
        Some(workload.pid),
        "CRIU restores the tree under its PID"
    );
    assert!(served.bytes > mib << 20, "{served:?}");
    assert!(image_files(&restore_dir).is_empty());
    assert_eq!(
        workload.digest_now(),
        workload.ready,
        "the restored buffer must be bit-identical"
    );
}

#[test]
fn a_corrupt_chunk_is_refused_before_the_process_runs() {
    let fx = Fixture::new(None);
    let mut workload = Workload::start(fx.dir.path(), 64);
    let name = CheckpointName::new("damaged").unwrap();
    let images = fx.subdir("dump");
    let capture = fx.tier.capture(&name, &images).unwrap();
    let script = capture.action_script().to_owned();
    assert!(dump(workload.pid, &images, fx.dir.path(), &script)
        .status
        .success());
    capture.commit().unwrap();
    workload.reap_dumped();
    wait_for("the dumped PID to be gone", Duration::from_secs(10), || {
        (!alive(workload.pid)).then_some(())
    });

    // Damage the largest stored chunk: one of the page chunks.
    let manifest = fx.tier.manifest(&name).unwrap();
    let chunk = manifest
        .files
        .iter()
        .flat_map(|f| f.chunks.iter())
        .max_by_key(|c| c.stored_len)
        .copied()
        .unwrap();
    let path = fx.tier.chunk_path(&chunk.hash);
    let mut bytes = fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    fs::write(&path, bytes).unwrap();

    // The workload marks each loop it runs; the dump may have come before its first mark.
    let ran = workload.state.with_extension("state.ran");
    match fs::remove_file(&ran) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("{}: {e}", ran.display()),
        _ => {}
    }
    let restore_dir = fx.subdir("restore");
    let serve = fx.tier.serve(&name, &restore_dir).unwrap();
    let (out, _) = restore(&restore_dir, fx.dir.path(), serve.action_script());
    let err = serve.finish().unwrap_err();
    assert!(!out.status.success(), "CRIU must refuse the restore");
    wait_for(
        "CRIU's half-restored tree to go",
        Duration::from_secs(10),
        || (!alive(workload.pid)).then_some(()),
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(!ran.exists(), "the restored process must never run");
    assert!(matches!(err, TierError::Corrupt { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("damaged") && text.contains(&chunk.hash.to_hex()),
        "the error names the checkpoint and the chunk: {text}"
    );
}

/// A small tmpfs standing in for a full disk; unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: PathBuf, mib: u32) -> Self {
        fs::create_dir_all(&at).unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(&at)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mounting a small tmpfs at {}",
            at.display()
        );
        Self(at)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_mid_stream_fails_clearly_and_resumes_the_workload() {
    require_root_and_criu();
    let disk_dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(disk_dir.path().join("nvme"), 48);
    let fx = Fixture::new(Some(&disk.0));
    let workload = Workload::start(fx.dir.path(), 256);
    let name = CheckpointName::new("no-room").unwrap();
    let images = fx.subdir("dump");
    let capture = fx.tier.capture(&name, &images).unwrap();
    let script = capture.action_script().to_owned();
    let out = dump(workload.pid, &images, fx.dir.path(), &script);
    let err = capture.abort();
    assert!(
        !out.status.success(),
        "the dump cannot finish on a full disk"
    );
    let err = err.expect("the capture reports why");
    let text = err.to_string();
    assert!(
        text.contains("No space left") || text.contains("disk full"),
        "a clear error: {text}"
    );
    assert!(alive(workload.pid), "CRIU resumed the workload");
    assert_eq!(
        workload.digest_now(),
        workload.ready,
        "the resumed workload is unharmed"
    );
    assert!(fx.tier.list().unwrap().is_empty(), "no partial checkpoint");
    assert_eq!(fx.tier.used_bytes().unwrap(), 0, "no partial chunks");
    let tmp: Vec<_> = fs::read_dir(disk.0.join("chunks/.tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "no half-written chunk files: {tmp:?}");
    drop(fx);
}
