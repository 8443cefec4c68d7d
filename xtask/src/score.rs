//! `cargo xtask score`: run objectives over a preference file in dataset order and write each batch's
//! loss and TRL-named metrics plus each pair's log-probs (JSON). Flags and output are stable.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use burn::tensor::ElementConversion;
use burn::tensor::backend::Backend;
use clap::Args;
use dipole_loss::{LossType, ObjectiveConfig, ObjectiveState};
use dipole_train::evaluate::evaluate_batches;
use dipole_train::{EvalReference, EvalSettings};

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
    /// LD-DPO: weight of the log-probs beyond the shorter completion's length (policy's and reference's).
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

/// The objective the flags describe, validated; unpaired loss types (KTO) are refused.
fn objective_of(args: &ScoreArgs) -> Result<ObjectiveConfig> {
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
    Ok(config)
}

/// Scores the pairs through [`dipole_train::evaluate::evaluate_batches`], the batches the trainer's
/// evaluation and `cargo xtask eval` average (reference log-probs LD-DPO weighted under
/// `--ld-alpha`, shards picked as `train.batch_shards = 0` does), writing each batch instead.
fn run_on<B: Backend>(device: &B::Device, args: &ScoreArgs) -> Result<()> {
    let config = objective_of(args)?;
    let Loaded { tokenizer, prepared, policy, reference } = args.input.load::<B>(device)?;
    if reference.is_none() && !config.reference_free() {
        return Err(anyhow!("--ref is required for loss types that compare with a reference"));
    }
    // a given reference is run (and its log-probs written) even for reference-free objectives
    let reference = reference.map_or(EvalReference::None, |model| EvalReference::Model(Box::new(model)));
    let settings = EvalSettings { objective: &config, state: ObjectiveState::default(), batch_size: args.input.batch_size(), shards: 0, pad: tokenizer.pad_id() };
    let (mut batches, mut examples) = (Vec::new(), Vec::new());
    evaluate_batches(&policy, reference, &prepared.pairs, None, settings, device, |batch, out| {
        let loss: f64 = out.loss.into_scalar().elem::<f64>();
        batches.push(serde_json::json!({"indices": batch.indices, "loss": loss, "metrics": out.metrics}));
        examples.extend(pair_logps_json(&batch.indices, &out.policy_logps, out.reference_logps.as_deref()));
    });
    let out = serde_json::json!({"batches": batches, "examples": examples, "dropped_indices": prepared.dropped});
    std::fs::write(&args.out, serde_json::to_string_pretty(&out)?).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("scored {} pairs in {} batches; wrote {}", examples.len(), batches.len(), args.out.display());
    Ok(())
}

/// One `examples` entry per pair of a batch: its policy's and reference's summed log-probs.
fn pair_logps_json(indices: &[usize], policy: &[(f32, f32)], reference: Option<&[(f32, f32)]>) -> Vec<serde_json::Value> {
    let mut out = Vec::with_capacity(policy.len());
    for (k, (pc, pr)) in policy.iter().enumerate() {
        let (rc, rr) = reference.map_or((None, None), |r| (Some(r[k].0), Some(r[k].1)));
        out.push(serde_json::json!({
            "index": indices[k],
            "policy_chosen_logps": pc,
            "policy_rejected_logps": pr,
            "ref_chosen_logps": rc,
            "ref_rejected_logps": rr,
        }));
    }
    out
}
