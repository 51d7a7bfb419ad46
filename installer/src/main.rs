//! `kybernate-installer`: the DaemonSet's init container. See the library for the logic.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = match kybernate_installer::cli::Args::try_parse() {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // clap's report spans several lines; a refusal is one line in the pod log.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("kybernate-installer: {first} (see --help)");
            return ExitCode::from(2);
        }
    };
    match kybernate_installer::cli::run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kybernate-installer: error: {e}");
            ExitCode::FAILURE
        }
    }
}
