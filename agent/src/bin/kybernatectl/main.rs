//! `kybernatectl`: talks to the node agent's socket.

use clap::Parser;

mod args;
mod cli;
mod demo;
mod output;
mod policy;

fn main() {
    let cli = args::Cli::parse();
    if let Err(e) = cli::run(cli) {
        eprintln!("kybernatectl: {e:#}");
        std::process::exit(1);
    }
}
