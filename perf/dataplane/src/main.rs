//! `dataplane-bench`: generate the image, run the suite, or run one measured step.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use kybernate_dataplane_bench::{encryption, generate, priority, steps, suite};

const USAGE: &str = "usage:
  dataplane-bench suite [--ram DIR] [--disk DIR] [--size-mib N] [--runs N]
  dataplane-bench generate DIR [SIZE_MIB] [DIRTY_CLUSTERS]
  dataplane-bench drain-nvme IMAGE_DIR NVME_ROOT NAME
  dataplane-bench restore-nvme NVME_ROOT NAME DEST
  dataplane-bench drain-s3 IMAGE_DIR ENDPOINT PREFIX NAME
  dataplane-bench restore-s3 ENDPOINT PREFIX NAME DEST
  dataplane-bench serve-s3 ROOT ADDR
  dataplane-bench priority IMAGE_DIR WORK_DIR RUNS
  dataplane-bench encryption IMAGE_DIR WORK_DIR RESTORE_DIR RUNS";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a = |i: usize| -> Result<&str> { args.get(i).map(String::as_str).context(USAGE) };
    let path = |i: usize| -> Result<PathBuf> { a(i).map(PathBuf::from) };
    match args.first().map(String::as_str) {
        Some("suite") => {
            let mut cfg = suite::SuiteConfig {
                ram: "/dev/shm/kyb-bench".into(),
                disk: "/var/tmp/kyb-bench".into(),
                size_mib: 1024,
                runs: 3,
            };
            let mut i = 1;
            while i < args.len() {
                let v = a(i + 1)?;
                match a(i)? {
                    "--ram" => cfg.ram = v.into(),
                    "--disk" => cfg.disk = v.into(),
                    "--size-mib" => cfg.size_mib = v.parse()?,
                    "--runs" => cfg.runs = v.parse()?,
                    other => bail!("unknown option {other}\n{USAGE}"),
                }
                i += 2;
            }
            print!("{}", suite::run_suite(&cfg)?);
            Ok(())
        }
        Some("generate") => {
            let size = args.get(2).map_or(Ok(1024), |s| s.parse())?;
            let dirty = args.get(3).map_or(Ok(0), |s| s.parse())?;
            Ok(generate::generate(&path(1)?, size << 20, dirty)?)
        }
        Some("drain-nvme") => steps::drain_nvme(&path(1)?, &path(2)?, a(3)?),
        Some("restore-nvme") => steps::restore_nvme(&path(1)?, a(2)?, &path(3)?),
        Some("drain-s3") => steps::drain_s3(&path(1)?, a(2)?, a(3)?, a(4)?),
        Some("restore-s3") => steps::restore_s3(a(1)?, a(2)?, a(3)?, &path(4)?),
        Some("serve-s3") => steps::serve_s3(&path(1)?, a(2)?),
        Some("encryption") => encryption::run(&path(1)?, &path(2)?, &path(3)?, a(4)?.parse()?),
        Some("priority") => priority::run(&path(1)?, &path(2)?, a(3)?.parse()?),
        _ => bail!("{USAGE}"),
    }
}
