//! Deterministic CRIU-like image sets: 40% zero pages, 30% bf16-like weights, 30% heap and
//! binaries, in regions of 1–48 MiB, the same bytes on every run.

use std::fs;
use std::io::Write;
use std::path::Path;

const MIB: usize = 1 << 20;
const PAGE: usize = 4096;

/// xorshift64*: small, fast and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Zero,
    Weights,
    Heap,
}

fn fill_weights(rng: &mut Rng, out: &mut [u8]) {
    for pair in out.chunks_exact_mut(8) {
        let r = rng.next();
        for (i, v) in pair.chunks_exact_mut(2).enumerate() {
            // Roughly normal(0, 0.02) via a sum of uniforms, truncated to bf16.
            let bits = r >> (i * 16);
            let u = |s: u64| f32::from(u16::try_from((bits >> s) & 0xf).expect("4 bits")) / 15.0;
            let x = (u(0) + u(4) + u(8) - 1.5) * 0.04;
            let bf16 = (x.to_bits() >> 16) as u16;
            v.copy_from_slice(&bf16.to_le_bytes());
        }
    }
}

const WORDS: [&str; 16] = [
    "libc.so.6",
    "__GI_memcpy",
    "/usr/lib/python3",
    "torch",
    "cuda_runtime",
    "malloc_state",
    "<module>",
    "tensor(",
    "GLIBC_2.34",
    "main_arena",
    "PyObject",
    "self.weight",
    "0x7ffd",
    "std::vector",
    "free",
    "\0\0\0\0",
];

fn fill_heap(rng: &mut Rng, out: &mut [u8]) {
    let mut base = 0x0000_7f3a_0000_0000u64 + (rng.below(1 << 20) << 12);
    for block in out.chunks_mut(64) {
        match rng.below(10) {
            0..=3 => {
                for w in block.chunks_exact_mut(8) {
                    base += rng.below(4) * 16;
                    w.copy_from_slice(&base.to_le_bytes());
                }
            }
            4..=6 => {
                let mut i = 0;
                while i < block.len() {
                    let word = WORDS[usize::try_from(rng.below(16)).expect("small")].as_bytes();
                    let n = word.len().min(block.len() - i);
                    block[i..i + n].copy_from_slice(&word[..n]);
                    i += n;
                }
            }
            7 | 8 => {
                for w in block.chunks_exact_mut(4) {
                    let small = u32::try_from(rng.below(256)).expect("small");
                    w.copy_from_slice(&small.to_le_bytes());
                }
            }
            _ => {
                for b in block.iter_mut() {
                    *b = rng.next().to_le_bytes()[7];
                }
            }
        }
    }
}

/// Writes the image set into `dir`: `pages-1.img` of `size` bytes plus small metadata files.
/// `dirty_clusters` > 0 overwrites that many 64 KiB heap clusters with new bytes, as a process
/// running between two checkpoints would.
pub fn generate(dir: &Path, size: usize, dirty_clusters: usize) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let mut rng = Rng(0x4B59_4245_524E_4154);
    let mut budget = [
        size / 10 * 4,
        size / 10 * 3,
        size - size / 10 * 4 - size / 10 * 3,
    ];
    let mut data = vec![0u8; size];
    let mut pos = 0;
    let mut heap_regions = Vec::new();
    while pos < size {
        let total: usize = budget.iter().sum();
        let mut pick =
            usize::try_from(rng.below(u64::try_from(total).expect("fits"))).expect("fits");
        let mut k = 0;
        while pick >= budget[k] {
            pick -= budget[k];
            k += 1;
        }
        let want = usize::try_from(1 + rng.below(48)).expect("small") * MIB;
        let len = want.min(budget[k]).div_ceil(PAGE) * PAGE;
        let len = len.min(size - pos);
        budget[k] = budget[k].saturating_sub(len);
        let kind = [Kind::Zero, Kind::Weights, Kind::Heap][k];
        let region = &mut data[pos..pos + len];
        match kind {
            Kind::Zero => {}
            Kind::Weights => fill_weights(&mut rng, region),
            Kind::Heap => {
                fill_heap(&mut rng, region);
                heap_regions.push((pos, len));
            }
        }
        pos += len;
    }
    let mut dirty = Rng(0xD1_27F0);
    for _ in 0..dirty_clusters {
        let (start, len) =
            heap_regions[usize::try_from(dirty.below(heap_regions.len() as u64)).expect("fits")];
        let cluster = 16 * PAGE;
        let at = start
            + usize::try_from(
                dirty.below(u64::try_from(len.saturating_sub(cluster) / PAGE + 1).expect("fits")),
            )
            .expect("fits")
                * PAGE;
        let end = (at + cluster).min(start + len);
        fill_heap(&mut dirty, &mut data[at..end]);
    }
    fs::File::create(dir.join("pages-1.img"))?.write_all(&data)?;
    let mut small = vec![0u8; 64 << 10];
    fill_heap(&mut rng, &mut small);
    fs::write(dir.join("pagemap-1.img"), &small)?;
    fs::write(dir.join("core-1.img"), &small[..4096])?;
    fs::write(dir.join("mm-1.img"), &small[..8192])?;
    Ok(())
}
