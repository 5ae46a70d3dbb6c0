//! The `linattn` command-line tool.

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "linattn",
    version,
    about = "Linear attention kernels: info, demo and generation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build and device report: archs compiled, ptxas resources per kernel, driver and GPU.
    Info,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Info => {
            print!("{}", linattn::info::report());
            Ok(())
        }
    }
}
