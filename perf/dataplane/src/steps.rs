//! The data plane's side of each measured step, run in a child process of the suite, and the
//! local S3 server both clients upload to.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use kybernate_dataplane::{CheckpointName, ChunkConfig, NvmeTier, S3Config, S3Tier, Secret, Tier};

use crate::measure::AnonPeak;

/// Access key of the bench server.
pub const ACCESS_KEY: &str = "AKIABENCH";
/// Secret key of the bench server.
pub const SECRET_KEY: &str = "bench-secret";
/// Bucket of the bench server.
pub const BUCKET: &str = "bench";

fn name(s: &str) -> Result<CheckpointName> {
    CheckpointName::new(s).context("checkpoint name")
}

/// Stores `image` into the NVMe tier at `root`; prints `key=value` figures.
pub fn drain_nvme(image: &Path, root: &Path, cp: &str) -> Result<()> {
    let peak = AnonPeak::start();
    let tier = NvmeTier::open(root, ChunkConfig::default())?;
    let (report, stats) = tier.store_with_stats(&name(cp)?, image)?;
    println!(
        "raw_bytes={} stored_bytes={} zero_bytes={} dedup_bytes={} new_chunks={} peak_anon_kib={}",
        report.raw_bytes,
        report.stored_bytes,
        stats.zero_bytes,
        stats.dedup_bytes,
        stats.new_chunks,
        peak.finish()
    );
    Ok(())
}

/// Restores `cp` from the NVMe tier at `root` into `dest`.
pub fn restore_nvme(root: &Path, cp: &str, dest: &Path) -> Result<()> {
    let peak = AnonPeak::start();
    let tier = NvmeTier::open(root, ChunkConfig::default())?;
    std::fs::create_dir_all(dest)?;
    let report = tier.load(&name(cp)?, dest)?;
    println!("bytes={} peak_anon_kib={}", report.bytes, peak.finish());
    Ok(())
}

/// Client settings for the bench server at `endpoint` under `prefix`.
pub fn s3_config(endpoint: &str, prefix: &str) -> S3Config {
    S3Config {
        endpoint: endpoint.into(),
        bucket: BUCKET.into(),
        prefix: prefix.into(),
        force_path_style: true,
        access_key_id: ACCESS_KEY.into(),
        secret_access_key: Secret::new(SECRET_KEY),
        ..S3Config::default()
    }
}

/// Stores `image` into the S3 tier.
pub fn drain_s3(image: &Path, endpoint: &str, prefix: &str, cp: &str) -> Result<()> {
    let peak = AnonPeak::start();
    let tier = S3Tier::connect(s3_config(endpoint, prefix), ChunkConfig::default())?;
    let (report, stats) = tier.store_with_stats(&name(cp)?, image)?;
    println!(
        "raw_bytes={} stored_bytes={} new_chunks={} peak_anon_kib={}",
        report.raw_bytes,
        report.stored_bytes,
        stats.new_chunks,
        peak.finish()
    );
    Ok(())
}

/// Restores `cp` from the S3 tier into `dest`.
pub fn restore_s3(endpoint: &str, prefix: &str, cp: &str, dest: &Path) -> Result<()> {
    let peak = AnonPeak::start();
    let tier = S3Tier::connect(s3_config(endpoint, prefix), ChunkConfig::default())?;
    std::fs::create_dir_all(dest)?;
    let report = tier.load(&name(cp)?, dest)?;
    println!("bytes={} peak_anon_kib={}", report.bytes, peak.finish());
    Ok(())
}

/// Serves S3 (s3s-fs) over loopback at `addr` from `root` until killed; prints `ready ADDR`.
pub fn serve_s3(root: &Path, addr: &str) -> Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder;
    std::fs::create_dir_all(root.join(BUCKET))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let fs =
            s3s_fs::FileSystem::new(root).map_err(|e| anyhow::anyhow!("s3s-fs root: {e:?}"))?;
        let mut builder = s3s::service::S3ServiceBuilder::new(fs);
        builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = Arc::new(builder.build());
        let listener = tokio::net::TcpListener::bind(addr).await?;
        println!("ready {}", listener.local_addr()?);
        loop {
            let (socket, _) = listener.accept().await?;
            let service = (*service).clone();
            tokio::spawn(async move {
                let _ = Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    })
}
