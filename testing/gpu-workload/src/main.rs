//! `gpu-workload --state-dir DIR [--mib N] [--device N] [--children N] [--cpu]`: holds
//! N MiB of known data in device memory (host memory with `--cpu`) and verifies it
//! forever; `--children` starts that many more workload processes beneath it.

use anyhow::{Context, Result};
use kybernate_gpu_workload::{parse_args, run};
use std::process::{Command, Stdio};

fn main() -> Result<()> {
    let (config, children) = parse_args(std::env::args().skip(1))?;
    let exe = std::env::current_exe().context("locating gpu-workload")?;
    let mut kids = Vec::new();
    for _ in 0..children {
        kids.push(
            Command::new(&exe)
                .args(["--mib", &config.mib.to_string()])
                .arg("--state-dir")
                .arg(&config.state_dir)
                .args(["--device", &config.device.to_string()])
                .args(config.cpu.then_some("--cpu"))
                .stdin(Stdio::null())
                .spawn()
                .context("starting a child workload")?,
        );
    }
    let outcome = run(&config);
    for mut kid in kids {
        let _ = kid.kill();
        let _ = kid.wait();
    }
    outcome
}
