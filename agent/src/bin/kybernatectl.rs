//! `kybernatectl`: talks to the node agent's socket.

use clap::Parser;

fn main() {
    let cli = kybernate_agent::cli::Cli::parse();
    if let Err(e) = kybernate_agent::cli::run(cli) {
        eprintln!("kybernatectl: {e:#}");
        std::process::exit(1);
    }
}
