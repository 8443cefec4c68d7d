//! `cargo xtask export`: merge a PEFT adapter into its base model and write a Hugging Face folder.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use clap::Args;
use dipole_models::{ExportDtype, merge_checkpoint};

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Base model folder (Hugging Face format).
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors) to merge in.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Storage dtype of the written weights: auto (the base's), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Largest shard in bytes before the weights are split with an index (HF default: 5 GB).
    #[arg(long, default_value_t = 5_000_000_000, value_parser = crate::flags::at_least_one)]
    pub max_shard_size: usize,
}

pub fn run(args: ExportArgs) -> Result<()> {
    let dtype = match args.dtype.as_str() {
        "auto" => None,
        name => Some(ExportDtype::parse(name).ok_or_else(|| anyhow!("--dtype {name:?}: expected auto, f32, bf16 or f16"))?),
    };
    if let Some(adapter) = &args.adapter {
        eprintln!("merging {} into {}", adapter.display(), args.model.display());
    }
    let written = merge_checkpoint(&args.model, args.adapter.as_deref(), &args.out, dtype, args.max_shard_size)
        .with_context(|| format!("exporting {}", args.model.display()))?;
    eprintln!("wrote {} ({written:?})", args.out.display());
    Ok(())
}
