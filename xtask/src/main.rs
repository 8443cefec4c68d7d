//! `cargo xtask ...`: dipole's command line.

mod backend;
mod export;
mod logps;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "dipole: preference optimisation (DPO and relatives) on burn")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tokenise preference pairs as TRL does and write each pair's completion log-probs (JSONL).
    Logps(logps::LogpsArgs),
    /// Merge a PEFT LoRA adapter into its base model and write a Hugging Face model folder.
    Export(export::ExportArgs),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Logps(args) => logps::run(args),
        Command::Export(args) => export::run(args),
    }
}
