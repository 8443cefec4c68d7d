//! `cargo xtask logps`: TRL-tokenised pairs and their summed completion log-probs, one JSON line per
//! kept record. External checks run this on other checkpoints: its flags and output are stable.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use clap::{Args, ValueEnum};
use dipole_data::{LengthOptions, Tokenizer, TruncationMode, load_pairs};
use dipole_models::CausalLm;
use dipole_train::pair_logps;

use crate::backend::BackendKind;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Truncation {
    KeepStart,
    KeepEnd,
}

#[derive(Args, Debug)]
pub struct LogpsArgs {
    /// Hugging Face model folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Preference records (JSONL), standard or conversational.
    #[arg(long)]
    pub data: PathBuf,
    /// Maximum prompt + completion tokens; records whose prompt alone reaches it are dropped.
    #[arg(long, default_value_t = 1024, value_parser = crate::flags::at_least_one)]
    pub max_length: usize,
    #[arg(long, value_enum, default_value_t = Truncation::KeepStart)]
    pub truncation: Truncation,
    /// Cut prompts to their last N tokens first (older TRL; off by default).
    #[arg(long, value_parser = crate::flags::at_least_one)]
    pub max_prompt_length: Option<usize>,
    /// Pairs per forward pass (results do not depend on it).
    #[arg(long, default_value_t = 4, value_parser = crate::flags::at_least_one)]
    pub batch_size: usize,
    /// Output JSONL file.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
}

pub fn run(args: LogpsArgs) -> Result<()> {
    crate::with_backend!(args.backend, run_on(&args))
}

fn run_on<B: Backend>(device: &B::Device, args: &LogpsArgs) -> Result<()> {
    let tokenizer = Tokenizer::from_dir(&args.model)?;
    let lengths = LengthOptions {
        max_length: Some(args.max_length),
        truncation: match args.truncation {
            Truncation::KeepStart => TruncationMode::KeepStart,
            Truncation::KeepEnd => TruncationMode::KeepEnd,
        },
        max_prompt_length: args.max_prompt_length,
    };
    let prepared = load_pairs(&args.data, &tokenizer, lengths)?;
    let (model, report) = CausalLm::<B>::load(&args.model, device)?;
    dipole_train::memory::check_pairs_fit::<B>(device, &model.config, &prepared.pairs, args.batch_size, "--max-length").map_err(anyhow::Error::msg)?;
    for name in &report.ignored {
        eprintln!("note: {} is not used by the model", name);
    }
    let started = std::time::Instant::now();
    let logps = pair_logps(&model, &prepared.pairs, args.batch_size, tokenizer.pad_id(), device);
    let file = std::fs::File::create(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut out = std::io::BufWriter::new(file);
    for lp in &logps {
        let t = &prepared.tokenized[lp.index];
        let line = serde_json::json!({
            "index": lp.index,
            "prompt_ids": t.prompt_ids,
            "chosen_ids": t.chosen_ids,
            "rejected_ids": t.rejected_ids,
            "chosen_logps": lp.chosen,
            "rejected_logps": lp.rejected,
        });
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    eprintln!(
        "{} records: {} scored, {} dropped (prompt >= max_length {}): {:?}; {:.2}s on {:?}; wrote {}",
        prepared.tokenized.len(),
        logps.len(),
        prepared.dropped.len(),
        args.max_length,
        prepared.dropped,
        started.elapsed().as_secs_f64(),
        args.backend,
        args.out.display()
    );
    Ok(())
}
