//! The real-GPU smoke check (see `README.md`): [`smoke`] keeps a known pattern in VRAM
//! and verifies it forever, so a checkpoint and restore through the agent can be proven
//! on real hardware.

pub mod modes;

use anyhow::{bail, Result};
use cudarc::driver::{result, sys};
use std::path::Path;

const CHUNK: usize = 8 * 1024 * 1024;

fn word(chunk: usize, generation: u32, i: usize) -> u64 {
    let (chunk, i) = (chunk as u64, i as u64); // hash inputs: truncation is harmless
    let x = (chunk << 40 ^ u64::from(generation) << 24 ^ i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^ (x >> 29)
}

fn driver<T>(what: &str, r: Result<T, result::DriverError>) -> Result<T> {
    r.map_err(|e| anyhow::anyhow!("{what} failed: {:?} ({})", e.0, e.0 as i32))
}

/// Fills `mib` MiB of VRAM on device 0 and verifies it chunk by chunk forever,
/// rewriting each chunk with its next generation. Writes `sweeps=N status=ok` to
/// `state` after every full sweep; returns the first error (and records it there).
pub fn smoke(mib: usize, state: &Path) -> Result<()> {
    let mut sweeps = 0u64;
    let outcome = smoke_loop(mib, state, &mut sweeps);
    if let Err(e) = &outcome {
        let _ = std::fs::write(state, format!("sweeps={sweeps} status=error: {e:#}\n"));
    }
    outcome
}

fn smoke_loop(mib: usize, state: &Path, sweeps: &mut u64) -> Result<()> {
    driver("cuInit", result::init())?;
    let dev = driver("cuDeviceGet", result::device::get(0))?;
    // SAFETY: `dev` comes from cuDeviceGet; the context lives as long as the process.
    let ctx = driver("cuDevicePrimaryCtxRetain", unsafe {
        result::primary_ctx::retain(dev)
    })?;
    // SAFETY: `ctx` was just retained.
    driver("cuCtxSetCurrent", unsafe { result::ctx::set_current(ctx) })?;
    let chunks = (mib * 1024 * 1024).div_ceil(CHUNK);
    let words = CHUNK / 8;
    let mut host = vec![0u64; words];
    let mut ptrs = Vec::with_capacity(chunks);
    for chunk in 0..chunks {
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: valid out pointer; a context is current.
        let rc = unsafe { sys::cuMemAlloc_v2(&mut ptr, CHUNK) };
        driver("cuMemAlloc", rc.result())?;
        host.iter_mut()
            .enumerate()
            .for_each(|(i, w)| *w = word(chunk, 0, i));
        // SAFETY: `ptr` holds CHUNK bytes, `host` is CHUNK bytes.
        driver("cuMemcpyHtoD", unsafe {
            result::memcpy_htod_sync(ptr, &host)
        })?;
        ptrs.push(ptr);
    }
    let mut generations = vec![0u32; chunks];
    loop {
        for (chunk, &ptr) in ptrs.iter().enumerate() {
            // SAFETY: as above.
            driver("cuMemcpyDtoH", unsafe {
                result::memcpy_dtoh_sync(&mut host, ptr)
            })?;
            let g = generations[chunk];
            if let Some(bad) = (0..words).find(|&i| host[i] != word(chunk, g, i)) {
                bail!("VRAM corrupt: chunk {chunk} word {bad} (generation {g})");
            }
            generations[chunk] = g.wrapping_add(1);
            host.iter_mut()
                .enumerate()
                .for_each(|(i, w)| *w = word(chunk, g + 1, i));
            // SAFETY: as above.
            driver("cuMemcpyHtoD", unsafe {
                result::memcpy_htod_sync(ptr, &host)
            })?;
        }
        *sweeps += 1;
        let tmp = state.with_extension("tmp");
        std::fs::write(&tmp, format!("sweeps={sweeps} status=ok\n"))?;
        std::fs::rename(&tmp, state)?;
    }
}
