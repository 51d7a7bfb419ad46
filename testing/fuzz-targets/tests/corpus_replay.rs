//! Replays the seed corpus (fuzz/corpus/<target>/) and every crash the fuzzer ever found
//! (fuzz/regressions/<target>/) through the fuzz targets' bodies, without a fuzzer: no input
//! may panic, `ok-*` seeds must be accepted and `bad-*` seeds refused.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use kybernate_fuzz_targets::{Verdict, TARGETS};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// Every file of `dir`, sorted; a missing directory is an empty set.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.expect("read corpus dir").path())
            .filter(|p| p.is_file())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("{}: {e}", dir.display()),
    };
    files.sort();
    files
}

/// Runs every input of `dir` through `target`; returns the problems found.
fn replay(target: &str, dir: &Path) -> (usize, Vec<String>) {
    let body = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, body)| *body)
        .unwrap_or_else(|| panic!("{} names no target", dir.display()));
    let mut problems = Vec::new();
    let files = inputs(dir);
    for file in &files {
        let data = fs::read(file).expect("read corpus file");
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        match catch_unwind(AssertUnwindSafe(|| body(&data))) {
            Err(_) => problems.push(format!("{}: panicked", file.display())),
            Ok(Verdict::Rejected(e)) if name.starts_with("ok-") => {
                problems.push(format!("{}: refused: {e}", file.display()))
            }
            Ok(Verdict::Accepted) if name.starts_with("bad-") => {
                problems.push(format!("{}: accepted", file.display()))
            }
            Ok(_) => {}
        }
    }
    (files.len(), problems)
}

#[test]
fn every_seed_gives_its_verdict_without_a_panic() {
    let corpus = fuzz_dir().join("corpus");
    let mut problems = Vec::new();
    for (target, _) in TARGETS {
        let (count, found) = replay(target, &corpus.join(target));
        assert!(
            count >= 3,
            "fuzz/corpus/{target} holds {count} seeds; regenerate them with kybernate-fuzz-seeds"
        );
        problems.extend(found);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_crash_found_so_far_stays_fixed() {
    let regressions = fuzz_dir().join("regressions");
    let mut problems = Vec::new();
    for dir in inputs_dirs(&regressions) {
        let target = dir.file_name().unwrap().to_string_lossy().into_owned();
        problems.extend(replay(&target, &dir).1);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn corpus_and_regression_dirs_name_only_known_targets() {
    for parent in [fuzz_dir().join("corpus"), fuzz_dir().join("regressions")] {
        for dir in inputs_dirs(&parent) {
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                TARGETS.iter().any(|(t, _)| *t == name),
                "{} is not a fuzz target",
                dir.display()
            );
        }
    }
}

fn inputs_dirs(parent: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(parent)
        .unwrap_or_else(|e| panic!("{}: {e}", parent.display()))
        .map(|e| e.expect("read dir").path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}
