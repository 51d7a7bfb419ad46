//! containerd-shim-kybernate-v1: see the `kybernate_shim` library.

use std::io::Write;

use kybernate_shim::config::ShimConfig;
use kybernate_shim::shim::{KybernateShim, RUNTIME_TYPE};

#[tokio::main]
async fn main() {
    if std::env::args()
        .skip(1)
        .any(|a| a == "-info" || a == "--info")
    {
        let runc = ShimConfig::from_env().unwrap_or_default().runc;
        match kybernate_shim::info::runtime_info(&runc) {
            Ok(bytes) => {
                let _ = std::io::stdout().write_all(&bytes);
                return;
            }
            Err(e) => {
                eprintln!("{RUNTIME_TYPE}: {e}");
                std::process::exit(1);
            }
        }
    }
    containerd_shim::asynchronous::run::<KybernateShim>(RUNTIME_TYPE, None).await;
}
