//! The workload itself: a known pattern in device memory, rewritten chunk by chunk
//! and verified on every read, with its progress in a state file. Used by the CUDA +
//! CRIU tests (against the fake driver) and usable on a real GPU.

use anyhow::{bail, Context, Result};
use cudarc::driver::{result, sys};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Bytes handled per loop iteration.
pub const CHUNK: usize = 2 * 1024 * 1024;

/// What the workload is told on its command line.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// Device memory to hold, in MiB.
    pub mib: usize,
    /// Directory for the state file `<pid>.state`.
    pub state_dir: PathBuf,
    /// CUDA device ordinal.
    pub device: i32,
    /// Keep the data in host memory instead: a CPU-only workload, no driver needed.
    pub cpu: bool,
}

/// The word at index `word` of chunk `chunk` after `generation` rewrites.
pub fn pattern(chunk: usize, generation: u32, word: usize) -> u64 {
    let (chunk, word) = (chunk as u64, word as u64); // hash inputs: truncation is harmless
    let mut x = chunk << 40 ^ u64::from(generation) << 20 ^ word;
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn fill(buf: &mut [u64], chunk: usize, generation: u32) {
    for (i, w) in buf.iter_mut().enumerate() {
        *w = pattern(chunk, generation, i);
    }
}

fn check(err: sys::CUresult, what: &str) -> Result<()> {
    match err {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        other => bail!("{what} failed: {other:?} ({})", other as i32),
    }
}

/// Progress as written to the state file.
#[derive(Debug, Default)]
struct Progress {
    iterations: u64,
    sweeps: u64,
}

fn write_state(dir: &Path, progress: &Progress, status: &str) {
    let pid = std::process::id();
    let tmp = dir.join(format!("{pid}.state.tmp"));
    let text = format!(
        "pid={pid}\niterations={}\nsweeps={}\nstatus={status}\n",
        progress.iterations, progress.sweeps
    );
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, dir.join(format!("{pid}.state")));
    }
}

/// Runs forever (until killed) or returns the first error, which is also written to
/// the state file as `status=error: ...`.
pub fn run(config: &WorkloadConfig) -> Result<()> {
    let mut progress = Progress::default();
    let result = if config.cpu {
        work_on_host(config, &mut progress)
    } else {
        work(config, &mut progress)
    };
    if let Err(e) = &result {
        write_state(&config.state_dir, &progress, &format!("error: {e:#}"));
    }
    result
}

fn work(config: &WorkloadConfig, progress: &mut Progress) -> Result<()> {
    result::init().map_err(|e| anyhow::anyhow!("cuInit failed: {:?}", e.0))?;
    let dev = result::device::get(config.device)
        .map_err(|e| anyhow::anyhow!("cuDeviceGet failed: {:?}", e.0))?;
    // SAFETY: `dev` comes from cuDeviceGet; the context lives as long as the process.
    let ctx = unsafe { result::primary_ctx::retain(dev) }
        .map_err(|e| anyhow::anyhow!("cuDevicePrimaryCtxRetain failed: {:?}", e.0))?;
    // SAFETY: `ctx` was just retained.
    unsafe { result::ctx::set_current(ctx) }
        .map_err(|e| anyhow::anyhow!("cuCtxSetCurrent failed: {:?}", e.0))?;
    let chunks = (config.mib * 1024 * 1024).div_ceil(CHUNK);
    let words = CHUNK / 8;
    let mut device_ptrs = Vec::with_capacity(chunks);
    let mut generations = vec![0u32; chunks];
    let mut host = vec![0u64; words];
    for chunk in 0..chunks {
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: valid out pointer; a context is current.
        check(unsafe { sys::cuMemAlloc_v2(&mut ptr, CHUNK) }, "cuMemAlloc")?;
        fill(&mut host, chunk, 0);
        // SAFETY: `ptr` holds CHUNK bytes and `host` is CHUNK bytes long.
        unsafe { result::memcpy_htod_sync(ptr, &host) }
            .map_err(|e| anyhow::anyhow!("initial cuMemcpyHtoD failed: {:?}", e.0))?;
        device_ptrs.push(ptr);
    }
    write_state(&config.state_dir, progress, "ok");
    let mut last_report = Instant::now();
    loop {
        for chunk in 0..chunks {
            let ptr = device_ptrs[chunk];
            // SAFETY: `ptr` holds CHUNK bytes and `host` is CHUNK bytes long.
            unsafe { result::memcpy_dtoh_sync(&mut host, ptr) }
                .map_err(|e| anyhow::anyhow!("cuMemcpyDtoH failed: {:?} ({})", e.0, e.0 as i32))?;
            let generation = generations[chunk];
            if let Some(bad) = (0..words).find(|&i| host[i] != pattern(chunk, generation, i)) {
                bail!(
                    "VRAM corrupt: chunk {chunk} word {bad} is {:#x}, expected {:#x} (generation {generation})",
                    host[bad],
                    pattern(chunk, generation, bad)
                );
            }
            generations[chunk] = generation.wrapping_add(1);
            fill(&mut host, chunk, generations[chunk]);
            // SAFETY: as above.
            unsafe { result::memcpy_htod_sync(ptr, &host) }
                .map_err(|e| anyhow::anyhow!("cuMemcpyHtoD failed: {:?} ({})", e.0, e.0 as i32))?;
            progress.iterations += 1;
            if last_report.elapsed() >= Duration::from_millis(20) {
                write_state(&config.state_dir, progress, "ok");
                last_report = Instant::now();
            }
        }
        progress.sweeps += 1;
        write_state(&config.state_dir, progress, "ok");
    }
}

/// The same loop over host memory, for CPU-only nodes.
fn work_on_host(config: &WorkloadConfig, progress: &mut Progress) -> Result<()> {
    let chunks = (config.mib * 1024 * 1024).div_ceil(CHUNK);
    let words = CHUNK / 8;
    let mut data: Vec<Vec<u64>> = (0..chunks)
        .map(|chunk| {
            let mut buf = vec![0u64; words];
            fill(&mut buf, chunk, 0);
            buf
        })
        .collect();
    let mut generations = vec![0u32; chunks];
    write_state(&config.state_dir, progress, "ok");
    loop {
        for (chunk, buf) in data.iter_mut().enumerate() {
            let generation = generations[chunk];
            if let Some(bad) = (0..words).find(|&i| buf[i] != pattern(chunk, generation, i)) {
                bail!("host memory corrupt: chunk {chunk} word {bad}");
            }
            generations[chunk] = generation.wrapping_add(1);
            fill(buf, chunk, generations[chunk]);
            progress.iterations += 1;
        }
        progress.sweeps += 1;
        write_state(&config.state_dir, progress, "ok");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Parses `--state-dir DIR [--mib N] [--device N] [--children N] [--cpu]`.
pub fn parse_args(args: impl Iterator<Item = String>) -> Result<(WorkloadConfig, usize)> {
    let mut mib = 256;
    let mut state_dir = None;
    let mut device = 0;
    let mut children = 0;
    let mut cpu = false;
    let mut args = args.peekable();
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--mib" => mib = value()?.parse().context("--mib")?,
            "--state-dir" => state_dir = Some(PathBuf::from(value()?)),
            "--device" => device = value()?.parse().context("--device")?,
            "--children" => children = value()?.parse().context("--children")?,
            "--cpu" => cpu = true,
            other => bail!("unknown argument {other:?}"),
        }
    }
    let state_dir = state_dir.context("--state-dir is required")?;
    Ok((
        WorkloadConfig {
            mib,
            state_dir,
            device,
            cpu,
        },
        children,
    ))
}
