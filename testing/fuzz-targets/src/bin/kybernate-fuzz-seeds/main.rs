//! Writes the seed corpus of every fuzz target (fuzz/corpus/<target>/) from values the code
//! itself produces: manifests written by the data plane, records and requests serialised by
//! the agent's own types, a rootfs diff captured by the shim from a real directory tree, and
//! the shipped config file. `ok-*` seeds must be accepted and `bad-*` ones refused; the
//! corpus replay test holds them to that. Run as root (a whiteout is a device node):
//! `cargo run -p kybernate-fuzz-targets --bin kybernate-fuzz-seeds -- fuzz/corpus`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};

mod seeds;

fn main() -> Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: kybernate-fuzz-seeds OUT_DIR")?,
    );
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let sets = [
        ("manifest", seeds::manifests()?),
        ("record", seeds::records()?),
        ("rootfs_diff", rootfs_diffs()?),
        ("config", seeds::configs(&repo)?),
        ("request", seeds::requests()),
    ];
    for (target, files) in sets {
        let dir = out.join(target);
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        for (name, bytes) in files {
            let verdict = kybernate_fuzz_targets::TARGETS
                .iter()
                .find(|(t, _)| *t == target)
                .map(|(_, body)| body(&bytes))
                .context("unknown target")?;
            let accepted = verdict == kybernate_fuzz_targets::Verdict::Accepted;
            ensure!(
                accepted == name.starts_with("ok-"),
                "seed {target}/{name} gave {verdict:?}"
            );
            fs::write(dir.join(&name), &bytes)?;
        }
        println!("{target}: seeds written to {}", dir.display());
    }
    Ok(())
}

/// Diffs the shim captures from a real upper dir, as `list NUL tar`, plus hostile variants.
fn rootfs_diffs() -> Result<Vec<(String, Vec<u8>)>> {
    use kybernate_shim::rootfs_diff::{capture, DIFF_LIST, DIFF_TAR};
    let dir = tempfile::tempdir()?;
    let (upper, images) = (dir.path().join("upper"), dir.path().join("images"));
    fs::create_dir_all(upper.join("etc")).context("upper dir")?;
    fs::create_dir_all(upper.join("data/logs"))?;
    fs::create_dir_all(&images)?;
    fs::write(upper.join("etc/conf"), "key = value\n")?;
    fs::write(upper.join("data/logs/app.log"), "started\nserving\n")?;
    std::os::unix::fs::symlink("logs/app.log", upper.join("data/current"))?;
    seeds::whiteout(&upper.join("etc/motd"))?;
    capture(&upper, &BTreeSet::new(), &images)?;
    let join = |list: &[u8], tar: &[u8]| [list, &[0], tar].concat();
    let list = fs::read(images.join(DIFF_LIST))?;
    let tar = fs::read(images.join(DIFF_TAR))?;
    ensure!(
        String::from_utf8_lossy(&list).contains("etc/motd"),
        "the whiteout was not captured"
    );
    let hostile_list = br#"{"version":1,"deleted":["../../etc/shadow"],"opaque":[]}"#;
    let below_link = seeds::tar_of(&[
        ("data/current", None, Some("/")),
        ("data/current/x", Some("x"), None),
    ])?;
    let leaving = seeds::tar_of(&[("../escape", Some("x"), None)])?;
    Ok(vec![
        ("ok-captured".into(), join(&list, &tar)),
        (
            "ok-list-only".into(),
            join(br#"{"version":1,"deleted":["a/b"],"opaque":["c"]}"#, b""),
        ),
        ("bad-list-leaves-rootfs".into(), join(hostile_list, &tar)),
        ("bad-entry-below-symlink".into(), join(&list, &below_link)),
        ("bad-entry-leaves-rootfs".into(), join(&list, &leaving)),
        (
            "bad-version".into(),
            join(br#"{"version":2,"deleted":[],"opaque":[]}"#, &tar),
        ),
    ])
}
