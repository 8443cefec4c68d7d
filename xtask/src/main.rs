//! `cargo xtask ...`: dipole's command line.

mod backend;
mod bench;
mod data;
mod demo;
mod eval;
mod export;
mod flags;
mod logps;
mod pairs;
mod report;
mod score;
mod train;

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
    /// Train (SFT or DPO-family, LoRA or full) from a TOML config.
    Train(train::TrainArgs),
    /// `train` with `train.stage = "sft"`.
    Sft(train::TrainArgs),
    /// Objectives and TRL's metrics over a preference file, batch by batch (JSON).
    Score(score::ScoreArgs),
    /// Check, describe, convert and build preference datasets.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// DPO step throughput and memory on the benchmark shape (see benches/ and the README).
    Bench(bench::BenchArgs),
    /// Held-out preference metrics of a model or adapter, and generations vs the reference.
    Eval(eval::EvalArgs),
}

fn main() -> Result<()> {
    dipole_train::alloc::keep_freed_memory();
    let cli = Cli::parse();
    // the libraries' notes (resumes, skipped rows, cache reuse) as plain lines on stderr
    tracing_subscriber::fmt().with_writer(std::io::stderr).without_time().with_target(false).with_level(false).init();
    if let Some(fused) = dipole_kernels::fused_from_env()? {
        dipole_kernels::set_fused(fused);
    }
    match cli.command {
        Command::Logps(args) => logps::run(args),
        Command::Export(args) => export::run(args),
        Command::Train(args) => train::run(args, None),
        Command::Sft(args) => train::run(args, Some(dipole_train::Stage::Sft)),
        Command::Score(args) => score::run(args),
        Command::Data(command) => data::run(command),
        Command::Bench(args) => bench::run(args),
        Command::Eval(args) => eval::run(args),
    }
}
