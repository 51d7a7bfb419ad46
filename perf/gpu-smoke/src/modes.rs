//! Classic and custom-storage CUDA checkpoints of the same running processes, side by
//! side: each run checkpoints the processes (CUDA checkpoint, then CRIU dump with
//! `--leave-running`, then `syncfs` so the bytes are on the disk), then resumes them.
//! Reported as GB/s of VRAM, end to end to the disk under `dir`.

use anyhow::{bail, Context, Result};
use kybernate_cuda::{
    CheckpointMode, CheckpointOptions, CudaSession, CustomCheckpointOptions, CustomStorageSetting,
    DirVramStore,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to measure.
#[derive(Debug, Clone)]
pub struct ModesConfig {
    /// Root pids of the processes to checkpoint (each dumped by CRIU as a tree).
    pub roots: Vec<u32>,
    /// Directory on the disk under test.
    pub dir: PathBuf,
    /// Runs per mode.
    pub runs: usize,
    /// Copy chunk of the custom-storage path, bytes.
    pub chunk: u64,
}

/// One timed checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// The path.
    pub mode: CheckpointMode,
    /// CUDA checkpoint (with the VRAM copy on the custom path).
    pub cuda: Duration,
    /// CRIU dump and syncfs.
    pub criu: Duration,
    /// Restore and unlock afterwards (not part of the checkpoint figure).
    pub resume: Duration,
    /// VRAM bytes checkpointed.
    pub vram: u64,
}

impl Sample {
    /// End-to-end checkpoint throughput, GB/s of VRAM.
    pub fn gbps(&self) -> f64 {
        self.vram as f64 / (self.cuda + self.criu).as_secs_f64() / 1e9
    }
}

fn criu_dump(root: u32, images: &Path) -> Result<()> {
    std::fs::create_dir_all(images)?;
    let status = Command::new("criu")
        .args([
            "dump",
            "--leave-running",
            "-t",
            &root.to_string(),
            "-o",
            "dump.log",
            "-v1",
        ])
        .arg("-D")
        .arg(images)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running criu")?;
    if !status.success() {
        bail!(
            "criu dump of {root} failed; see {}/dump.log",
            images.display()
        );
    }
    Ok(())
}

fn syncfs(dir: &Path) -> Result<()> {
    let status = Command::new("sync").arg("-f").arg(dir).status()?;
    if !status.success() {
        bail!("sync -f {} failed", dir.display());
    }
    Ok(())
}

fn tree(roots: &[u32]) -> Result<Vec<u32>> {
    let mut pids = Vec::new();
    for &root in roots {
        pids.extend(kybernate_cuda::process_tree(root)?);
    }
    Ok(pids)
}

fn run_once(
    session: &CudaSession,
    cfg: &ModesConfig,
    mode: CheckpointMode,
    run: usize,
) -> Result<Sample> {
    let pids = tree(&cfg.roots)?;
    let vram: u64 = session
        .record(&pids, mode)
        .map(|r| r.used.iter().sum())
        .unwrap_or(0);
    let dir = cfg.dir.join(format!("{}-{run}", mode.as_str()));
    std::fs::create_dir_all(&dir)?;
    let started = Instant::now();
    let held = match mode {
        CheckpointMode::Classic => session.checkpoint(
            &pids,
            &CheckpointOptions {
                lock_timeout: Duration::from_secs(30),
                host_ram_margin: 256 * 1024 * 1024,
            },
        )?,
        CheckpointMode::CustomStorage => session.checkpoint_custom(
            &pids,
            &CustomCheckpointOptions {
                lock_timeout: Duration::from_secs(30),
                chunk_size: cfg.chunk,
            },
            Arc::new(DirVramStore::create(dir.join("vram"))?),
        )?,
    };
    let cuda = started.elapsed();
    let started = Instant::now();
    let dumped = cfg
        .roots
        .iter()
        .try_for_each(|&root| criu_dump(root, &dir.join(format!("criu-{root}"))))
        .and_then(|()| syncfs(&dir));
    let criu = started.elapsed();
    let started = Instant::now();
    held.resume()?;
    let resume = started.elapsed();
    dumped?;
    std::fs::remove_dir_all(&dir)?;
    Ok(Sample {
        mode,
        cuda,
        criu,
        resume,
        vram,
    })
}

/// Runs both modes `cfg.runs` times, alternating, and returns every sample.
pub fn measure(cfg: &ModesConfig) -> Result<Vec<Sample>> {
    let session = CudaSession::load_with(CustomStorageSetting::On)
        .context("custom storage must be available to compare both modes")?;
    let mut samples = Vec::new();
    for run in 0..cfg.runs {
        for mode in [CheckpointMode::Classic, CheckpointMode::CustomStorage] {
            let s = run_once(&session, cfg, mode, run)?;
            println!(
                "run {run} {:<14} vram {:>6} MiB  cuda {:>7.3} s  criu+sync {:>7.3} s  \
                 resume {:>7.3} s  {:>6.2} GB/s",
                mode.as_str(),
                s.vram >> 20,
                s.cuda.as_secs_f64(),
                s.criu.as_secs_f64(),
                s.resume.as_secs_f64(),
                s.gbps()
            );
            samples.push(s);
        }
    }
    Ok(samples)
}

/// Median GB/s of one mode.
pub fn median_gbps(samples: &[Sample], mode: CheckpointMode) -> f64 {
    let mut v: Vec<f64> = samples
        .iter()
        .filter(|s| s.mode == mode)
        .map(Sample::gbps)
        .collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
