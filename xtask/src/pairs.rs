//! What `score` and `eval` share: a policy (model folder, optionally + PEFT adapter), its reference,
//! and a preference file tokenised for them.

use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use clap::Args;
use dipole_data::{LengthOptions, PreparedPairs, Tokenizer, load_pairs};
use dipole_lora::AdapterMode;
use dipole_models::CausalLm;

use crate::backend::BackendKind;

#[derive(Args, Debug)]
pub struct ModelAndPairs {
    /// Model folder (the policy, or the base its adapter applies to).
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter: the policy is model + adapter (and, without --ref, the reference the bare model).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Reference model folder.
    #[arg(long = "ref")]
    pub reference: Option<PathBuf>,
    /// Preference pairs (JSONL, JSON or Parquet; standard or conversational).
    #[arg(long)]
    pub data: PathBuf,
    /// Maximum prompt + completion tokens (default 1024, or `data.max_length` of `eval --config`).
    #[arg(long, value_parser = crate::flags::at_least_one)]
    pub max_length: Option<usize>,
    /// Pairs per batch (default 4, or `train.batch_size` of `eval --config`).
    #[arg(long, value_parser = crate::flags::at_least_one)]
    pub batch_size: Option<usize>,
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
}

pub struct Loaded<B: Backend> {
    pub tokenizer: Tokenizer,
    pub prepared: PreparedPairs,
    pub policy: CausalLm<B>,
    /// `--ref`, else the bare model under an `--adapter`; `None` when neither is given.
    pub reference: Option<CausalLm<B>>,
}

impl ModelAndPairs {
    pub fn max_length(&self) -> usize {
        self.max_length.unwrap_or(1024)
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size.unwrap_or(4)
    }

    /// Tokenises the pairs as TRL does (keep-start truncation to `max_length`) and loads the models.
    pub fn load<B: Backend>(&self, device: &B::Device) -> Result<Loaded<B>> {
        let tokenizer = Tokenizer::from_dir(&self.model)?;
        let lengths = LengthOptions { max_length: Some(self.max_length()), ..Default::default() };
        let prepared = load_pairs(&self.data, &tokenizer, lengths)?;
        let (mut policy, _) = CausalLm::<B>::load(&self.model, device)?;
        dipole_train::memory::check_pairs_fit::<B>(device, &policy.config, &prepared.pairs, self.batch_size(), "--max-length").map_err(anyhow::Error::msg)?;
        if let Some(adapter) = &self.adapter {
            policy.load_adapter(adapter).with_context(|| format!("--adapter {}", adapter.display()))?;
        }
        let reference = match (&self.reference, &self.adapter) {
            (Some(dir), _) => Some(CausalLm::<B>::load(dir, device).with_context(|| format!("--ref {}", dir.display()))?.0),
            (None, Some(_)) => {
                let mut base = policy.clone();
                base.set_adapter_mode(AdapterMode::Disabled);
                Some(base)
            }
            (None, None) => None,
        };
        Ok(Loaded { tokenizer, prepared, policy, reference })
    }
}
