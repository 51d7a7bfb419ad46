//! Prints every Kybernate CRD as YAML, or writes one file per CRD with `--out DIR`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;

/// Generates the CRD manifests from the Rust types.
#[derive(Debug, Parser)]
struct Args {
    /// Write `<plural>.yaml` files into this directory instead of printing (repeatable:
    /// deploy/crds and the Helm chart's crds/).
    #[arg(long)]
    out: Vec<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for (file, crd) in kybernate_api::all() {
        let yaml = kybernate_api::render(&crd)?;
        if args.out.is_empty() {
            print!("---\n{yaml}");
        }
        for dir in &args.out {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
            let path = dir.join(file);
            std::fs::write(&path, &yaml).with_context(|| format!("write {}", path.display()))?;
        }
    }
    Ok(())
}
