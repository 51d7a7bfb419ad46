//! The whole comparison, in one run: the data plane against pzstd, dd oflag=direct and s5cmd
//! on the same generated image, each step a child process measured with wait4.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

use crate::measure::{run, shell, Sample};
use crate::steps::{ACCESS_KEY, BUCKET, SECRET_KEY};

/// Where and how big.
#[derive(Debug, Clone)]
pub struct SuiteConfig {
    /// A tmpfs directory (the RAM tier).
    pub ram: PathBuf,
    /// A directory on the local disk (the NVMe tier).
    pub disk: PathBuf,
    /// Size of pages-1.img in MiB.
    pub size_mib: usize,
    /// Repetitions of each step; the median is reported.
    pub runs: usize,
}

#[derive(Default)]
struct Row {
    command: String,
    samples: Vec<Sample>,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn figures(stdout: &str) -> BTreeMap<String, u64> {
    stdout
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect()
}

fn drop_caches() -> Result<()> {
    // SAFETY: sync() has no preconditions.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", "3").context("drop page cache (needs root)")
}

fn same_file(a: &Path, b: &Path) -> Result<bool> {
    let (mut fa, mut fb) = (fs::File::open(a)?, fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut fs::File, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let got = f.read(&mut buf[n..])?;
        if got == 0 {
            break;
        }
        n += got;
    }
    Ok(n)
}

fn same_dir(a: &Path, b: &Path) -> Result<bool> {
    for entry in fs::read_dir(a)? {
        let entry = entry?;
        if !same_file(&entry.path(), &b.join(entry.file_name()))? {
            return Ok(false);
        }
    }
    Ok(fs::read_dir(a)?.count() == fs::read_dir(b)?.count())
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(exe: &Path, root: &Path) -> Result<(Server, String)> {
    let mut child = Command::new(exe)
        .arg("serve-s3")
        .arg(root)
        .arg("127.0.0.1:0")
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    let server = Server(child);
    let Some(addr) = line.trim().strip_prefix("ready ") else {
        bail!("S3 server did not start: {line:?}");
    };
    Ok((server, format!("http://{addr}")))
}

fn s5cmd(endpoint: &str, args: &str) -> Command {
    let mut c = shell(&format!("s5cmd --endpoint-url {endpoint} {args}"));
    c.env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_REGION", "us-east-1");
    c
}

fn ours(exe: &Path, args: &[&Path]) -> Command {
    let mut c = Command::new(exe);
    c.args(args);
    c
}

/// Directories removed on drop.
struct Scratch([PathBuf; 2]);

impl Drop for Scratch {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Runs everything and returns the Markdown report.
pub fn run_suite(cfg: &SuiteConfig) -> Result<String> {
    let exe = std::env::current_exe()?;
    let (ram, disk) = (&cfg.ram, &cfg.disk);
    for d in [ram, disk] {
        let _ = fs::remove_dir_all(d);
        fs::create_dir_all(d)?;
    }
    // Two image sets in RAM and several GiB on disk: gone when the suite ends, however it ends.
    let _scratch = Scratch([ram.clone(), disk.clone()]);
    let (img_a, img_b) = (ram.join("img-a"), ram.join("img-b"));
    let size = cfg.size_mib << 20;
    // In child processes, so this process stays small: a forked child's peak RSS counts
    // the parent's pages until it execs.
    for (dir, dirty) in [(&img_a, "0"), (&img_b, "4")] {
        let mut cmd = Command::new(&exe);
        cmd.arg("generate")
            .arg(dir)
            .arg(cfg.size_mib.to_string())
            .arg(dirty);
        run(cmd)?;
    }
    let pages = img_a.join("pages-1.img");
    let gib = (size as f64) / f64::from(1u32 << 30);
    let p = |p: &Path| p.display().to_string();
    let mut rows: BTreeMap<&str, Row> = BTreeMap::new();
    let mut record = |key: &'static str, cmd: String, s: Sample| {
        let row = rows.entry(key).or_default();
        row.command = cmd;
        row.samples.push(s);
    };
    let nvme = disk.join("nvme");
    let mut second = String::new();

    for r in 0..cfg.runs {
        let _ = fs::remove_dir_all(&nvme);
        let cmd = ours(
            &exe,
            &[Path::new("drain-nvme"), &img_a, &nvme, Path::new("cp1")],
        );
        record(
            "1 drain: kybernate → NVMe",
            format!("dataplane-bench drain-nvme {} {} cp1", p(&img_a), p(&nvme)),
            run(cmd)?,
        );
        let base = disk.join("base.zst");
        let script = format!(
            "pzstd -1 -p 2 -q -c {} | dd of={} bs=1M iflag=fullblock oflag=direct status=none",
            p(&pages),
            p(&base)
        );
        record(
            "1 drain: pzstd -1 -p 2 | dd oflag=direct",
            script.clone(),
            run(shell(&script))?,
        );
        let script = format!(
            "dd if={} of={} bs=1M oflag=direct status=none",
            p(&pages),
            p(&disk.join("raw.img"))
        );
        record(
            "1 drain: dd oflag=direct (raw)",
            script.clone(),
            run(shell(&script))?,
        );

        let dest = ram.join("restore");
        let _ = fs::remove_dir_all(&dest);
        drop_caches()?;
        let cmd = ours(
            &exe,
            &[Path::new("restore-nvme"), &nvme, Path::new("cp1"), &dest],
        );
        record(
            "2 restore: kybernate NVMe → tmpfs",
            format!("dataplane-bench restore-nvme {} cp1 {}", p(&nvme), p(&dest)),
            run(cmd)?,
        );
        if r == 0 {
            ensure!(
                same_dir(&img_a, &dest)?,
                "restored image differs from the source"
            );
        }
        fs::remove_dir_all(&dest)?;
        drop_caches()?;
        let out = ram.join("pzstd-restore.img");
        let script = format!("pzstd -d -p 2 -q -c {} > {}", p(&base), p(&out));
        record(
            "2 restore: pzstd -d -p 2",
            script.clone(),
            run(shell(&script))?,
        );
        if r == 0 {
            ensure!(same_file(&pages, &out)?, "pzstd round trip differs");
        }
        fs::remove_file(&out)?;

        let cmd = ours(
            &exe,
            &[Path::new("drain-nvme"), &img_b, &nvme, Path::new("cp2")],
        );
        let s = run(cmd)?;
        if r == 0 {
            let f = figures(&s.stdout);
            let raw = f["raw_bytes"] as f64;
            second = format!(
                "Second checkpoint (4 dirty 64 KiB heap clusters): {} new chunks, {} new stored bytes = {:.2}% of the {:.0} MiB image (raw size of the new chunks: {:.2}%).",
                f["new_chunks"],
                f["stored_bytes"],
                100.0 * f["stored_bytes"] as f64 / raw,
                raw / f64::from(1u32 << 20),
                100.0 * (f["new_chunks"] * (8 << 20)) as f64 / raw,
            );
        }
        record(
            "3 second checkpoint → NVMe",
            format!("dataplane-bench drain-nvme {} {} cp2", p(&img_b), p(&nvme)),
            s,
        );
    }

    let s3root = disk.join("s3root");
    let (_server, endpoint) = start_server(&exe, &s3root)?;
    for r in 0..cfg.runs {
        let prefix = format!("run-{r}");
        let mut cmd = Command::new(&exe);
        cmd.args(["drain-s3"])
            .arg(&img_a)
            .args([&endpoint, &prefix, "cp1"]);
        record(
            "4 upload: kybernate → S3",
            format!(
                "dataplane-bench drain-s3 {} {endpoint} {prefix} cp1",
                p(&img_a)
            ),
            run(cmd)?,
        );
        let args = format!("cp {} s3://{BUCKET}/s5cmd-{r}/pages-1.img", p(&pages));
        record(
            "4 upload: s5cmd cp",
            format!("s5cmd --endpoint-url {endpoint} {args}"),
            run(s5cmd(&endpoint, &args))?,
        );

        let dest = ram.join("restore-s3");
        let _ = fs::remove_dir_all(&dest);
        let mut cmd = Command::new(&exe);
        cmd.args(["restore-s3", &endpoint, &prefix, "cp1"])
            .arg(&dest);
        record(
            "5 download: kybernate S3 → tmpfs",
            format!(
                "dataplane-bench restore-s3 {endpoint} {prefix} cp1 {}",
                p(&dest)
            ),
            run(cmd)?,
        );
        if r == 0 {
            ensure!(
                same_dir(&img_a, &dest)?,
                "S3 restore differs from the source"
            );
        }
        fs::remove_dir_all(&dest)?;
        let out = ram.join("s5cmd-restore.img");
        let args = format!("cp s3://{BUCKET}/s5cmd-{r}/pages-1.img {}", p(&out));
        record(
            "5 download: s5cmd cp",
            format!("s5cmd --endpoint-url {endpoint} {args}"),
            run(s5cmd(&endpoint, &args))?,
        );
        fs::remove_file(&out)?;
    }

    let mut md = String::new();
    writeln!(
        md,
        "Image: {} MiB pages-1.img + 76 KiB of small files, {} runs, median shown.\n",
        cfg.size_mib, cfg.runs
    )?;
    writeln!(
        md,
        "| step | median wall (s) | CPU s / GiB | peak RSS (MiB) | peak anon RSS (MiB) | command |"
    )?;
    writeln!(md, "| --- | ---: | ---: | ---: | ---: | --- |")?;
    let mut walls = BTreeMap::new();
    for (key, row) in &rows {
        let wall = median(row.samples.iter().map(|s| s.wall).collect());
        let cpu = median(row.samples.iter().map(|s| s.cpu).collect());
        let rss = row.samples.iter().map(|s| s.max_rss_kib).max().unwrap_or(0);
        let anon = row
            .samples
            .iter()
            .filter_map(|s| figures(&s.stdout).get("peak_anon_kib").copied())
            .max()
            .map_or("–".to_owned(), |k| format!("{:.0}", k as f64 / 1024.0));
        walls.insert(*key, wall.as_secs_f64());
        writeln!(
            md,
            "| {key} | {:.3} | {:.2} | {:.0} | {anon} | `{}` |",
            wall.as_secs_f64(),
            cpu.as_secs_f64() / gib,
            rss as f64 / 1024.0,
            row.command
        )?;
    }
    let ratio = |a: &str, b: &str| walls[a] / walls[b];
    writeln!(md)?;
    writeln!(
        md,
        "- drain vs pzstd|dd: {:.2}× its time (target ≤ 0.70)",
        ratio(
            "1 drain: kybernate → NVMe",
            "1 drain: pzstd -1 -p 2 | dd oflag=direct"
        )
    )?;
    writeln!(
        md,
        "- drain vs raw dd: {:.2}× its time (target ≤ 1.30)",
        ratio(
            "1 drain: kybernate → NVMe",
            "1 drain: dd oflag=direct (raw)"
        )
    )?;
    writeln!(
        md,
        "- restore vs pzstd -d: {:.2}× its time (target ≤ 0.60)",
        ratio(
            "2 restore: kybernate NVMe → tmpfs",
            "2 restore: pzstd -d -p 2"
        )
    )?;
    writeln!(
        md,
        "- upload vs s5cmd: {:.2}× its throughput of image bytes (target ≥ 1.00)",
        ratio("4 upload: s5cmd cp", "4 upload: kybernate → S3")
    )?;
    writeln!(
        md,
        "- download vs s5cmd: {:.2}× its throughput of image bytes",
        ratio("5 download: s5cmd cp", "5 download: kybernate S3 → tmpfs")
    )?;
    writeln!(md, "- {second} (target < 5%)")?;
    Ok(md)
}
