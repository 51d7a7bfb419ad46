//! `gpu-cycle <pid> <images-dir>`: CUDA checkpoint, CRIU dump, CRIU restore and CUDA
//! restore of one process, with per-phase timings as JSON on stdout.

use anyhow::{Context, Result};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let pid = args
        .next()
        .context("usage: gpu-cycle <pid> <images-dir>")?
        .parse()
        .context("pid")?;
    let images = args.next().context("usage: gpu-cycle <pid> <images-dir>")?;
    kybernate_gpu_smoke::cycle(pid, images.as_ref())
}
