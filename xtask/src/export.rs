//! `cargo xtask export`: merge a PEFT adapter into its base model and write a Hugging Face folder.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use burn::backend::Flex;
use clap::Args;
use dipole_models::{CausalLm, ExportDtype};

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
    /// Storage dtype of the written weights: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Largest shard in bytes before the weights are split with an index (HF default: 5 GB).
    #[arg(long, default_value_t = 5_000_000_000, value_parser = crate::flags::at_least_one)]
    pub max_shard_size: usize,
}

pub fn run(args: ExportArgs) -> Result<()> {
    let dtype = ExportDtype::parse(&args.dtype)
        .ok_or_else(|| anyhow!("--dtype {:?}: expected f32, bf16 or f16", args.dtype))?;
    let device = Default::default();
    let (mut model, _) = CausalLm::<Flex>::load(&args.model, &device)?;
    if let Some(adapter) = &args.adapter {
        let config = model
            .load_adapter(adapter)
            .with_context(|| format!("loading adapter {}", adapter.display()))?;
        eprintln!("merging adapter r={} alpha={} into {}", config.r, config.lora_alpha, args.model.display());
    }
    let model = model.into_merged();
    model.save_hf(&args.out, dtype, args.max_shard_size, Some(&args.model))?;
    eprintln!("wrote {} ({:?})", args.out.display(), dtype);
    Ok(())
}
