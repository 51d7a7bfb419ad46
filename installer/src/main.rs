//! `kybernate-installer`: the DaemonSet's init container. See the library for the logic.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = kybernate_installer::cli::Args::parse();
    match kybernate_installer::cli::run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kybernate-installer: error: {e}");
            ExitCode::FAILURE
        }
    }
}
