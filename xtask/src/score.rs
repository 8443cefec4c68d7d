//! `cargo xtask score`: run objectives over a preference file in dataset order and write each batch's
//! loss and TRL-named metrics plus each pair's log-probs (JSON). Flags and output are stable.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use burn::tensor::ElementConversion;
use burn::tensor::backend::Backend;
use clap::Args;
use dipole_data::PreferenceBatch;
use dipole_loss::{LossType, ObjectiveConfig, ObjectiveState};
use dipole_train::{StepContext, objective_on_batch, pair_logps};

use crate::pairs::{Loaded, ModelAndPairs};

#[derive(Args, Debug)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub input: ModelAndPairs,
    /// One or more loss types, comma separated (TRL's names).
    #[arg(long, default_value = "sigmoid", value_delimiter = ',')]
    pub loss: Vec<String>,
    #[arg(long, value_delimiter = ',')]
    pub loss_weights: Vec<f64>,
    #[arg(long, default_value_t = 0.1, value_parser = crate::flags::positive)]
    pub beta: f64,
    #[arg(long, default_value_t = 0.0, value_parser = crate::flags::non_negative)]
    pub label_smoothing: f64,
    #[arg(long, value_parser = crate::flags::unit)]
    pub ld_alpha: Option<f64>,
    #[arg(long)]
    pub use_weighting: bool,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: ScoreArgs) -> Result<()> {
    crate::with_backend!(args.input.backend, run_on(&args))
}

fn run_on<B: Backend>(device: &B::Device, args: &ScoreArgs) -> Result<()> {
    let loss_type = args.loss.iter().map(|l| LossType::parse(l)).collect::<Result<Vec<_>, _>>().map_err(|e| anyhow!("--loss: {e}"))?;
    let config = ObjectiveConfig {
        loss_type,
        loss_weights: args.loss_weights.clone(),
        beta: args.beta,
        label_smoothing: args.label_smoothing,
        ld_alpha: args.ld_alpha,
        use_weighting: args.use_weighting,
        ..Default::default()
    };
    config.validate().map_err(|e| anyhow!("{e}"))?;
    if config.loss_type.iter().any(|t| t.unpaired()) {
        return Err(anyhow!("--loss kto / apo_zero_unpaired: score works on preference pairs; KTO runs through `cargo xtask train` (unpaired rows, or pairs split into desirable and undesirable rows)"));
    }
    let Loaded { tokenizer, prepared, policy, reference } = args.input.load::<B>(device)?;
    if reference.is_none() && !config.reference_free() {
        return Err(anyhow!("--ref is required for loss types that compare with a reference"));
    }
    let pad = tokenizer.pad_id();
    let ld = config.ld_alpha;
    let mut state = ObjectiveState::default();
    let mut batches = Vec::new();
    let mut examples = Vec::new();
    for chunk in prepared.pairs.chunks(args.input.batch_size()) {
        let batch = PreferenceBatch::new(chunk, pad);
        let ref_pairs = reference.as_ref().map(|r| {
            let lp = pair_logps(r, chunk, chunk.len(), pad, device);
            lp.iter().map(|p| (p.chosen as f32, p.rejected as f32)).collect::<Vec<_>>()
        });
        if ld.is_some() && ref_pairs.is_some() {
            return Err(anyhow!("--ld-alpha with a reference is computed by the trainer; score supports it reference-free only"));
        }
        let out = objective_on_batch(&policy, ref_pairs.clone(), &batch, StepContext { objective: &config, state: &mut state, shards: dipole_train::batch_shards::<B>(0, chunk.len(), device) }, device);
        let loss: f64 = out.loss.clone().into_scalar().elem::<f64>();
        batches.push(serde_json::json!({"indices": batch.indices, "loss": loss, "metrics": out.metrics}));
        for (k, (pc, pr)) in out.policy_logps.iter().enumerate() {
            let (rc, rr) = ref_pairs.as_ref().map(|r| (Some(r[k].0), Some(r[k].1))).unwrap_or((None, None));
            examples.push(serde_json::json!({
                "index": batch.indices[k],
                "policy_chosen_logps": pc,
                "policy_rejected_logps": pr,
                "ref_chosen_logps": rc,
                "ref_rejected_logps": rr,
            }));
        }
    }
    let out = serde_json::json!({"batches": batches, "examples": examples, "dropped_indices": prepared.dropped});
    std::fs::write(&args.out, serde_json::to_string_pretty(&out)?).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("scored {} pairs in {} batches; wrote {}", examples.len(), batches.len(), args.out.display());
    Ok(())
}
