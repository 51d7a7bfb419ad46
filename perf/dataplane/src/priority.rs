//! How much a background drain slows a checkpoint that starts while it runs, with the data
//! plane's priority classes and without them: three stores of the same image set through
//! one data plane (one gate, one writer, one buffer pool), each into a fresh NVMe tier so
//! no store deduplicates against another.
//!
//! - `alone`: the checkpoint's store with nothing else running;
//! - `with_background_drain`: the same store started while a background drain of another
//!   copy runs (the drain yields at its next chunk);
//! - `with_unprioritised_drain`: the same, with the drain in the foreground class, i.e. the
//!   plain sharing the data plane did before priority classes.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kybernate_dataplane::{
    CheckpointName, ChunkConfig, DataPlane, IoMode, NvmeTier, Pacing, WorkClass,
};

fn pacing(class: WorkClass) -> Pacing {
    Pacing {
        class,
        ..Pacing::default()
    }
}

fn has_chunks(root: &Path) -> bool {
    std::fs::read_dir(root.join("chunks")).is_ok_and(|shards| {
        shards.flatten().any(|s| {
            s.file_name() != ".tmp" && s.path().read_dir().is_ok_and(|mut d| d.next().is_some())
        })
    })
}

/// One checkpoint store into a fresh tier under `work`, while a drain of class `drain`
/// (if any) runs into another; returns the checkpoint's store time.
fn one(
    plane: &Arc<DataPlane>,
    image: &Path,
    work: &Path,
    drain: Option<WorkClass>,
) -> Result<Duration> {
    let _ = std::fs::remove_dir_all(work);
    let cp = CheckpointName::new("ckpt").context("name")?;
    let config = ChunkConfig::default();
    let ckpt = NvmeTier::open_on(work.join("ckpt"), config.clone(), Arc::clone(plane))?;
    let drain_root = work.join("drain");
    let drainer = match drain {
        Some(class) => {
            let tier = NvmeTier::open_on(&drain_root, config, Arc::clone(plane))?;
            let (image, cp) = (image.to_owned(), cp.clone());
            let thread =
                std::thread::spawn(move || tier.store_known(&cp, &image, None, &pacing(class)));
            // Measure from the drain's first stored chunk on: it is running, not starting.
            while !has_chunks(&drain_root) && !thread.is_finished() {
                std::thread::sleep(Duration::from_millis(5));
            }
            Some(thread)
        }
        None => None,
    };
    let start = Instant::now();
    ckpt.store_known(&cp, image, None, &pacing(WorkClass::Foreground))?;
    let took = start.elapsed();
    if let Some(thread) = drainer {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("the drain panicked"))??;
    }
    std::fs::remove_dir_all(work)?;
    Ok(took)
}

/// Runs the three cases `runs` times on `image` with tiers under `work`; prints one
/// `key=value` line per run.
pub fn run(image: &Path, work: &Path, runs: usize) -> Result<()> {
    let plane = DataPlane::start(IoMode::Auto, &ChunkConfig::default())?;
    println!(
        "workers={} io={} pinned_pool_bytes={}",
        plane.workers(),
        plane.io_backend().as_str(),
        plane.pinned_pool_bytes()
    );
    // Untimed: allocates and pins the pool's buffers and reads the image into the page
    // cache, which would otherwise count against whichever case runs first.
    one(&plane, image, work, None)?;
    let cases = [
        None,
        Some(WorkClass::Background),
        Some(WorkClass::Foreground),
    ];
    for run in 0..runs {
        // Each run starts with another case, so drift in the machine's load spreads evenly.
        let mut took = [Duration::ZERO; 3];
        for k in 0..cases.len() {
            let case = (run + k) % cases.len();
            took[case] = one(&plane, image, work, cases[case])?;
        }
        let [alone, yielding, sharing] = took;
        println!(
            "run={run} alone_s={:.3} with_background_drain_s={:.3} with_unprioritised_drain_s={:.3}",
            alone.as_secs_f64(),
            yielding.as_secs_f64(),
            sharing.as_secs_f64()
        );
    }
    Ok(())
}
