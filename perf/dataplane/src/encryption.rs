//! What encryption at rest costs: drain into the NVMe tier and restore from it, plain and
//! sealed, alternating in the same run on one data plane, each drain into a fresh tier (no
//! dedup across cases) and each restore after the page cache is dropped.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kybernate_dataplane::{
    CheckpointName, ChunkConfig, DataPlane, IoMode, KeyRing, NvmeTier, Sealing, Tier,
};

fn drop_caches() -> Result<()> {
    // SAFETY: sync() has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("drop page cache (needs root)")
}

/// CPU time (user + system) of this process so far: the cases run one after another, so the
/// difference across one case is that case's CPU, which a loaded machine disturbs far less
/// than wall time.
fn cpu_now() -> Duration {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, exclusively borrowed rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| {
        Duration::new(
            u64::try_from(t.tv_sec).unwrap_or(0),
            u32::try_from(t.tv_usec).unwrap_or(0) * 1000,
        )
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Wall and CPU time of one step.
#[derive(Clone, Copy, Debug)]
struct Took {
    wall: Duration,
    cpu: Duration,
}

fn timed(f: impl FnOnce() -> Result<()>) -> Result<Took> {
    let (wall, cpu) = (Instant::now(), cpu_now());
    f()?;
    Ok(Took {
        wall: wall.elapsed(),
        cpu: cpu_now() - cpu,
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// One drain and one restore of `image` under `sealing`; returns their times.
fn one(
    plane: &Arc<DataPlane>,
    image: &Path,
    work: &Path,
    restore_to: &Path,
    sealing: Sealing,
) -> Result<(Took, Took)> {
    let _ = std::fs::remove_dir_all(work);
    let _ = std::fs::remove_dir_all(restore_to);
    std::fs::create_dir_all(restore_to)?;
    let cp = CheckpointName::new("cp").context("name")?;
    let tier = NvmeTier::open_sealed(work, ChunkConfig::default(), Arc::clone(plane), sealing)?;
    let drain = timed(|| tier.store(&cp, image).map(|_| ()).map_err(Into::into))?;
    drop_caches()?;
    let restore = timed(|| tier.load(&cp, restore_to).map(|_| ()).map_err(Into::into))?;
    std::fs::remove_dir_all(work)?;
    std::fs::remove_dir_all(restore_to)?;
    Ok((drain, restore))
}

/// Runs plain and sealed `runs` times each on `image`, tiers under `work`, restores into
/// `restore_to` (tmpfs); prints one `key=value` line per run and the medians.
pub fn run(image: &Path, work: &Path, restore_to: &Path, runs: usize) -> Result<()> {
    let plane = DataPlane::start(IoMode::Auto, &ChunkConfig::default())?;
    let mut kek = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut kek))
        .context("read a random key")?;
    let ring = Arc::new(KeyRing::from_keys(Path::new("/bench"), &[("bench", kek)])?);
    let modes = [Sealing::plain(), Sealing::sealed(ring)];
    println!(
        "workers={} io={}",
        plane.workers(),
        plane.io_backend().as_str()
    );
    // Untimed: pins the pool's buffers and reads the image into the page cache.
    one(&plane, image, work, restore_to, Sealing::plain())?;
    let mut times: [Vec<(Took, Took)>; 2] = [Vec::new(), Vec::new()];
    for run in 0..runs {
        for k in 0..2 {
            // Each run starts with the other mode, so drift in the machine's load spreads.
            let mode = (run + k) % 2;
            times[mode].push(one(&plane, image, work, restore_to, modes[mode].clone())?);
        }
        let [(pd, pr), (sd, sr)] = [times[0][run], times[1][run]];
        println!(
            "run={run} plain_drain_s={:.3} sealed_drain_s={:.3} plain_restore_s={:.3} sealed_restore_s={:.3} \
             plain_drain_cpu_s={:.3} sealed_drain_cpu_s={:.3} plain_restore_cpu_s={:.3} sealed_restore_cpu_s={:.3}",
            pd.wall.as_secs_f64(),
            sd.wall.as_secs_f64(),
            pr.wall.as_secs_f64(),
            sr.wall.as_secs_f64(),
            pd.cpu.as_secs_f64(),
            sd.cpu.as_secs_f64(),
            pr.cpu.as_secs_f64(),
            sr.cpu.as_secs_f64()
        );
    }
    let med = |mode: usize, restore: bool, cpu: bool| {
        median(
            times[mode]
                .iter()
                .map(|(d, r)| if restore { r } else { d })
                .map(|t| if cpu { t.cpu } else { t.wall })
                .collect(),
        )
        .as_secs_f64()
    };
    for (what, cpu) in [("wall", false), ("cpu", true)] {
        let (pd, sd) = (med(0, false, cpu), med(1, false, cpu));
        let (pr, sr) = (med(0, true, cpu), med(1, true, cpu));
        println!(
            "median_{what} plain_drain_s={pd:.3} sealed_drain_s={sd:.3} drain_ratio={:.3} \
             plain_restore_s={pr:.3} sealed_restore_s={sr:.3} restore_ratio={:.3}",
            sd / pd,
            sr / pr
        );
    }
    Ok(())
}
