//! Shared fixtures: deterministic image-set contents and directory comparison.
#![allow(dead_code)]

pub mod s3_server;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

/// Kinds of page runs in a generated image file.
#[derive(Clone, Copy, Debug)]
pub enum Fill {
    /// Zero pages.
    Zero,
    /// Incompressible bytes from a seed.
    Noise(u64),
    /// Compressible, text-like bytes from a seed.
    Text(u64),
}

/// Deterministic bytes for a run of `len` bytes.
pub fn fill_bytes(fill: Fill, len: usize) -> Vec<u8> {
    match fill {
        Fill::Zero => vec![0; len],
        Fill::Noise(seed) => {
            let mut x = seed | 1;
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()[3]
                })
                .collect()
        }
        Fill::Text(seed) => (0..len)
            .map(|i| b"kybernate checkpoint "[(i + usize::try_from(seed % 7).unwrap()) % 21])
            .collect(),
    }
}

/// Writes a file made of the given runs.
pub fn write_file(path: &Path, runs: &[(Fill, usize)]) {
    let mut data = Vec::new();
    for &(fill, len) in runs {
        data.extend(fill_bytes(fill, len));
    }
    fs::write(path, data).unwrap();
}

/// Name → contents of the regular files in `dir`.
pub fn read_dir_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// A new empty directory under `root`.
pub fn new_dir(root: &Path, name: &str) -> std::path::PathBuf {
    let dir = root.join(name);
    fs::create_dir_all(&dir).unwrap();
    dir
}
