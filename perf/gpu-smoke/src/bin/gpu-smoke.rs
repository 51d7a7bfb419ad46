//! `gpu-smoke <MiB> <state-file>`: fill VRAM with a known pattern and verify it forever.

use anyhow::{Context, Result};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mib = args
        .next()
        .context("usage: gpu-smoke <MiB> <state-file>")?
        .parse()
        .context("MiB")?;
    let state = args.next().context("usage: gpu-smoke <MiB> <state-file>")?;
    kybernate_gpu_smoke::smoke(mib, state.as_ref())
}
