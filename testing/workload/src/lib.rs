//! A sample stateful workload for the demo, the tests and the benchmarks: it holds a block of
//! memory with a known pattern, counts in one or more threads and reports through a status
//! file, so that a restore can prove its state continued.
//!
//! The status file is rewritten in place at a fixed size (CRIU checks the size of open files
//! on restore). SIGUSR1 makes it verify the whole memory block against the pattern.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Size of the status record.
pub const STATUS_BYTES: usize = 256;

/// What the workload reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Random id chosen at start; a restarted (not restored) workload has another.
    pub epoch: u64,
    /// Ticks of the main counter.
    pub counter: u64,
    /// Ticks of each worker thread.
    pub threads: Vec<u64>,
    /// Completed memory verifications.
    pub verified: u64,
    /// Result of the last verification.
    pub memory_ok: bool,
    /// Lines written to the journal, if any.
    pub journal: u64,
}

impl Status {
    /// Parses a status record.
    pub fn parse(text: &str) -> Option<Self> {
        let mut status = Status {
            epoch: 0,
            counter: 0,
            threads: Vec::new(),
            verified: 0,
            memory_ok: false,
            journal: 0,
        };
        let mut seen = 0;
        for field in text.trim_end_matches(['\0', ' ', '\n']).split_whitespace() {
            let (key, value) = field.split_once('=')?;
            seen += 1;
            match key {
                "epoch" => status.epoch = u64::from_str_radix(value, 16).ok()?,
                "counter" => status.counter = value.parse().ok()?,
                "threads" => {
                    status.threads = value
                        .split(',')
                        .filter(|v| !v.is_empty())
                        .map(str::parse)
                        .collect::<Result<_, _>>()
                        .ok()?
                }
                "verified" => status.verified = value.parse().ok()?,
                "memory" => status.memory_ok = value == "ok",
                "journal" => status.journal = value.parse().ok()?,
                _ => seen -= 1,
            }
        }
        (seen >= 6).then_some(status)
    }

    /// Reads the status file; `None` before the first record.
    pub fn read(path: &Path) -> Option<Self> {
        Self::parse(&std::fs::read_to_string(path).ok()?)
    }

    fn render(&self) -> [u8; STATUS_BYTES] {
        let threads: Vec<String> = self.threads.iter().map(u64::to_string).collect();
        let text = format!(
            "epoch={:016x} counter={} threads={} verified={} memory={} journal={}\n",
            self.epoch,
            self.counter,
            threads.join(","),
            self.verified,
            if self.memory_ok { "ok" } else { "BAD" },
            self.journal
        );
        let mut out = [b' '; STATUS_BYTES];
        let n = text.len().min(STATUS_BYTES);
        out[..n].copy_from_slice(&text.as_bytes()[..n]);
        out
    }
}

/// How the workload runs.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    /// MiB of patterned memory to hold.
    pub mib: usize,
    /// Extra counting threads.
    pub threads: usize,
    /// Where to report.
    pub status: std::path::PathBuf,
    /// A file to append one numbered line to per tick (an open file that grows).
    pub journal: Option<std::path::PathBuf>,
}

fn pattern(seed: u64, i: usize) -> u64 {
    // splitmix64: cheap, deterministic, and every word differs.
    let mut z = seed.wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Runs the workload forever (until killed).
pub fn run(spec: &WorkloadSpec) -> std::io::Result<()> {
    let epoch: u64 = rand::random();
    let words = spec.mib * (1 << 20) / 8;
    let memory: Vec<u64> = (0..words).map(|i| pattern(epoch, i)).collect();
    let verify_requested = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, verify_requested.clone())?;

    let counters: Arc<Vec<AtomicU64>> =
        Arc::new((0..spec.threads).map(|_| AtomicU64::new(0)).collect());
    for t in 0..spec.threads {
        let counters = counters.clone();
        std::thread::spawn(move || loop {
            counters[t].fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(10));
        });
    }

    let status_file = File::options()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&spec.status)?;
    let mut journal = match &spec.journal {
        Some(path) => Some(File::options().create(true).append(true).open(path)?),
        None => None,
    };
    let mut status = Status {
        epoch,
        counter: 0,
        threads: vec![0; spec.threads],
        verified: 0,
        memory_ok: true,
        journal: 0,
    };
    loop {
        status.counter += 1;
        if verify_requested.swap(false, Ordering::Relaxed) {
            status.memory_ok = memory
                .iter()
                .enumerate()
                .all(|(i, w)| *w == pattern(epoch, i));
            status.verified += 1;
        }
        if let Some(file) = journal.as_mut() {
            use std::io::Write;
            status.journal += 1;
            writeln!(file, "{}", status.journal)?;
        }
        for (slot, counter) in status.threads.iter_mut().zip(counters.iter()) {
            *slot = counter.load(Ordering::Relaxed);
        }
        status_file.write_all_at(&status.render(), 0)?;
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_at_fixed_size() {
        let status = Status {
            epoch: 0xdead_beef,
            counter: 42,
            threads: vec![1, 2, 3],
            verified: 1,
            memory_ok: true,
            journal: 0,
        };
        let bytes = status.render();
        assert_eq!(bytes.len(), STATUS_BYTES);
        assert_eq!(
            Status::parse(std::str::from_utf8(&bytes).unwrap()),
            Some(status)
        );
        assert_eq!(Status::parse("garbage"), None);
        assert_ne!(pattern(1, 0), pattern(1, 1));
        assert_ne!(pattern(1, 0), pattern(2, 0));
    }
}
