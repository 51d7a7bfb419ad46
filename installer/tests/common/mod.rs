//! Shared test fixtures: a host root in a temp dir with a shim source, file snapshots, and
//! a runner for the installer binary.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A temp dir standing in for the host's filesystem, plus a fake shim binary beside it.
pub struct Host {
    pub dir: tempfile::TempDir,
    pub shim_source: PathBuf,
}

pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

pub fn fixture(name: &str) -> String {
    fs::read_to_string(Path::new(FIXTURES).join(name))
        .unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

impl Host {
    /// A host root with `/usr/local/bin` and a shim source of known bytes.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        fs::create_dir_all(dir.path().join("root/usr/local/bin")).unwrap();
        let shim_source = dir.path().join("containerd-shim-kybernate-v1.source");
        fs::write(&shim_source, b"#!/bin/sh\necho kybernate shim stand-in\n").unwrap();
        Self { dir, shim_source }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// Writes `text` at host path `host_path`.
    pub fn put(&self, host_path: &str, text: &str) -> PathBuf {
        let path = self.path(host_path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, text).unwrap();
        path
    }

    pub fn path(&self, host_path: &str) -> PathBuf {
        self.root().join(host_path.trim_start_matches('/'))
    }

    /// Every file under the host root with its bytes.
    pub fn snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        fn walk(dir: &Path, base: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
            for entry in fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, base, out);
                } else {
                    out.insert(
                        path.strip_prefix(base).unwrap().to_path_buf(),
                        fs::read(&path).unwrap(),
                    );
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.root(), &self.root(), &mut out);
        out
    }

    pub fn options(&self) -> kybernate_installer::plan::InstallOptions {
        kybernate_installer::plan::InstallOptions {
            host: kybernate_installer::files::HostRoot::new(self.root()),
            flavour: None,
            config: None,
            shim_source: self.shim_source.clone(),
            shim_dir: PathBuf::from("/usr/local/bin"),
            force: false,
        }
    }

    /// Runs the installer binary against this host with `--no-restart` and `extra` flags.
    pub fn run(&self, extra: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kybernate-installer"))
            .arg("--host-root")
            .arg(self.root())
            .arg("--shim-source")
            .arg(&self.shim_source)
            .arg("--no-restart")
            .args(extra)
            .output()
            .expect("run kybernate-installer")
    }
}

/// Asserts that the run failed with exactly one line on stderr containing every `needle`.
pub fn assert_refused(output: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "expected a refusal, got success; stderr: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {stderr}");
    for needle in needles {
        assert!(
            lines[0].contains(needle),
            "{needle:?} missing from: {}",
            lines[0]
        );
    }
}
