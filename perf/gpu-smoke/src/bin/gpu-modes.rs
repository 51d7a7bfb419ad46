//! `gpu-modes <dir> <runs> <root-pid>...`: classic against custom-storage CUDA
//! checkpoints of the running processes, end to end to the disk holding `dir`.
//! `CHUNK_MIB` (default 16) sets the custom-storage copy chunk.

use anyhow::{Context, Result};
use kybernate_cuda::CheckpointMode;
use kybernate_gpu_smoke::modes::{measure, median_gbps, ModesConfig};

fn main() -> Result<()> {
    let usage = "usage: gpu-modes <dir> <runs> <root-pid>...";
    let mut args = std::env::args().skip(1);
    let dir = args.next().context(usage)?.into();
    let runs = args.next().context(usage)?.parse().context("runs")?;
    let roots = args
        .map(|a| a.parse().context("root pid"))
        .collect::<Result<Vec<u32>>>()?;
    anyhow::ensure!(!roots.is_empty(), "{usage}");
    let samples = measure(&ModesConfig {
        roots,
        dir,
        runs,
        chunk: chunk_mib()? * 1024 * 1024,
    })?;
    let classic = median_gbps(&samples, CheckpointMode::Classic);
    let custom = median_gbps(&samples, CheckpointMode::CustomStorage);
    println!(
        "median GB/s of VRAM, checkpoint end to end: classic {classic:.2}, custom storage \
         {custom:.2}, ratio {:.2}",
        custom / classic
    );
    Ok(())
}

fn chunk_mib() -> Result<u64> {
    match std::env::var("CHUNK_MIB") {
        Ok(v) => v.parse().context("CHUNK_MIB"),
        Err(_) => Ok(16),
    }
}
