//! dipole's command line: `dipole ...` once installed (`cargo install --path xtask --bin dipole`),
//! `cargo xtask ...` inside the repository. Both binaries call [`run_cli`].

mod annotate;
mod backend;
mod bench;
mod data;
mod demo;
mod eval;
mod export;
mod flags;
mod init_model;
mod logps;
mod pairs;
mod plan;
mod report;
mod score;
mod train;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(about = "dipole: preference optimisation (DPO and relatives) on burn")]
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
    /// The memory a training config's run will need (weights, optimizer, activations; `peak: X GiB`).
    Plan(plan::PlanArgs),
    /// Write a random-initialised Hugging Face model folder of a named real shape (no download).
    InitModel(init_model::InitModelArgs),
    /// Held-out preference metrics of a model or adapter, and generations vs the reference.
    Eval(eval::EvalArgs),
    /// Human preference annotation: serve a page where annotators judge pairs; export majority pairs.
    #[command(subcommand)]
    Annotate(annotate::AnnotateCommand),
    /// Shell completions for this command line, on stdout (`dipole completions bash > ...`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Parses the process's arguments and runs the command; `program` is the name help and
/// completions show (`dipole` or `cargo xtask`).
pub fn run_cli(program: &'static str) -> Result<()> {
    dipole_train::alloc::keep_freed_memory();
    let matches = Cli::command().name(program).bin_name(program).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
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
        Command::InitModel(args) => init_model::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Annotate(command) => annotate::run(command),
        Command::Completions { shell } => {
            // into a buffer first: clap_complete panics on a write error (a closed pipe, say)
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), program, &mut script);
            match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(()),
            }
        }
    }
}
