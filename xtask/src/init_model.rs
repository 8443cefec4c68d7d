//! `cargo xtask init-model`: a random-initialised Hugging Face model folder of a named real shape
//! (sharded safetensors with their index, `config.json`, a byte-level tokenizer whose ids fit the
//! vocabulary), written tensor by tensor, so that big-model runs can be reproduced without
//! downloading weights.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use clap::Args;
use dipole_data::byte_tokenizer::{BOS_ID, EOS_ID};
use dipole_models::{ExportDtype, ModelConfig, write_random_init};

use crate::bench::SHAPES;

#[derive(Args, Debug)]
pub struct InitModelArgs {
    /// The shape (a config.json in xtask/shapes/): bench-17m, smollm2-135m, qwen2.5-0.5b,
    /// llama-3.2-1b, mistral-7b.
    #[arg(long)]
    pub shape: String,
    /// Storage dtype of the weights: f32, bf16 or f16.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Seed of the initialisation (`CausalLm::init` with this seed gives the same weights).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder (must not exist, or be empty).
    #[arg(long)]
    pub out: PathBuf,
    /// Largest shard in bytes (HF's default: 5 GB).
    #[arg(long, default_value_t = 5_000_000_000, value_parser = crate::flags::at_least_one)]
    pub max_shard_size: usize,
}

/// The shape's config with the byte tokenizer's special ids and `dtype` written in.
pub fn init_config(shape: &str, dtype: ExportDtype) -> Result<ModelConfig> {
    let (_, json) = SHAPES
        .iter()
        .find(|(n, _)| *n == shape)
        .ok_or_else(|| anyhow!("--shape: unknown {shape:?}; expected {}", SHAPES.map(|(n, _)| n).join(", ")))?;
    let mut raw: serde_json::Value = serde_json::from_str(json)?;
    raw["bos_token_id"] = BOS_ID.into();
    raw["eos_token_id"] = EOS_ID.into();
    raw["torch_dtype"] = dtype.hf_name().into();
    Ok(ModelConfig::from_json_str(&raw.to_string(), std::path::Path::new(&format!("xtask/shapes/{shape}.json")))?)
}

pub fn run(args: InitModelArgs) -> Result<()> {
    let dtype = ExportDtype::parse(&args.dtype).ok_or_else(|| anyhow!("--dtype {:?}: expected f32, bf16 or f16", args.dtype))?;
    let config = init_config(&args.shape, dtype)?;
    if args.out.exists() && std::fs::read_dir(&args.out).with_context(|| format!("--out {}", args.out.display()))?.next().is_some() {
        return Err(anyhow!("--out {}: exists and is not empty", args.out.display()));
    }
    let started = std::time::Instant::now();
    let params: usize = config.hf_tensors().iter().map(|(spec, _)| spec.shape.iter().product::<usize>()).sum();
    eprintln!("{}: {:.2} B parameters, {:.1} GB in {}", args.shape, params as f64 / 1e9, (params * dtype.bytes()) as f64 / 1e9, args.dtype);
    write_random_init(&config, args.seed, dtype, args.max_shard_size, &args.out)?;
    dipole_data::write_byte_tokenizer(&args.out, config.vocab_size)?;
    println!("wrote {} in {:.0} s", args.out.display(), started.elapsed().as_secs_f64());
    Ok(())
}
