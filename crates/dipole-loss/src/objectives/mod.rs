//! The DPO family as TRL 1.16 computes it: each `loss_type` a small unit (`Objective` here, its
//! formula in `pairwise`, `reference_free` or `unpaired`), combined with `loss_weights` (MPO),
//! under an f-divergence, optional WPO weights and LD-DPO length handling. All tensors are `[B]`
//! (one value per pair).

mod batch;
mod config;
mod loss_type;
mod math;
mod pairwise;
mod reference_free;
mod unpaired;

use burn::tensor::{Tensor, backend::Backend};
use serde::{Deserialize, Serialize};

pub use config::{CpoVariant, FDivergence, ObjectiveConfig, ObjectiveError};
pub use loss_type::LossType;
pub(crate) use math::length_normalised;
pub use pairwise::kto_pair;
pub use unpaired::{KtoOutput, kto_loss};

use batch::PairBatch;
use reference_free::Cpo;

/// Per-pair inputs of an objective. `ref_*` are `None` for reference-free training.
#[derive(Clone, Debug)]
pub struct PairInputs<B: Backend> {
    pub chosen_logps: Tensor<B, 1>,
    pub rejected_logps: Tensor<B, 1>,
    pub ref_chosen_logps: Option<Tensor<B, 1>>,
    pub ref_rejected_logps: Option<Tensor<B, 1>>,
    /// Completion tokens per sequence (as floats).
    pub chosen_lengths: Tensor<B, 1>,
    pub rejected_lengths: Tensor<B, 1>,
    /// WPO weight per pair (see [`crate::wpo_weights`]), used when `use_weighting`.
    pub weights: Option<Tensor<B, 1>>,
}

/// State kept across batches by objectives that need it (BCO's running reward mean).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ObjectiveState {
    /// Running mean of `β·log-ratio` over every chosen and rejected completion seen (RunningMoments).
    pub bco_mean: f64,
    pub bco_count: f64,
}

/// Loss and the reward tensors TRL's metrics are computed from.
#[derive(Clone, Debug)]
pub struct ObjectiveOutput<B: Backend> {
    /// Scalar `[1]`.
    pub loss: Tensor<B, 1>,
    /// `β·(logp - ref_logp)` per pair, detached (`β·avg logp` for SimPO/ORPO, as TRL's CPO/ORPO log).
    pub chosen_rewards: Tensor<B, 1>,
    pub rejected_rewards: Tensor<B, 1>,
    /// Objective-specific metrics (ORPO's `log_odds_ratio`, `log_odds_chosen`, `nll_loss`).
    pub extra: Vec<(String, f64)>,
}

/// Metrics an objective adds to the batch's, under TRL's names.
type Extra = Vec<(String, f64)>;

/// One paired `loss_type` with the settings it reads; see [`LossType`] for the papers.
#[derive(Clone, Copy, Debug)]
enum Objective {
    Sigmoid { beta: f64 },
    Hinge { beta: f64 },
    Ipo { beta: f64 },
    ExoPair { beta: f64, epsilon: f64 },
    NcaPair { beta: f64 },
    Robust { beta: f64, epsilon: f64 },
    BcoPair { beta: f64 },
    SppoHard { beta: f64 },
    Aot { beta: f64, label_smoothing: f64 },
    AotUnpaired { beta: f64, label_smoothing: f64 },
    ApoZero { beta: f64 },
    ApoDown { beta: f64 },
    Discopop { beta: f64, tau: f64 },
    Sft,
    SigmoidNorm { beta: f64 },
    KtoPair { beta: f64 },
    Simpo { beta: f64, label_smoothing: f64, gamma: f64 },
    Cpo(Cpo),
    Orpo { beta: f64 },
}

/// An objective's contribution to the batch.
struct Term<B: Backend> {
    /// One loss per pair (`[2B]` for KTO-pair), averaged by the caller.
    per_pair: Tensor<B, 1>,
    /// The (unscaled) rewards the objective compares, when they are not the log-ratios.
    rewards: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
}

impl Objective {
    /// The unit for `kind`. Unpaired types have no per-pair form and panic: use [`kto_loss`].
    fn new(kind: LossType, config: &ObjectiveConfig) -> Self {
        let beta = config.beta;
        let label_smoothing = config.label_smoothing;
        match kind {
            LossType::Sigmoid => Objective::Sigmoid { beta },
            LossType::Hinge => Objective::Hinge { beta },
            LossType::Ipo => Objective::Ipo { beta },
            // EXO needs ε > 0 (it takes log ε); TRL falls back to 1e-3
            LossType::ExoPair => Objective::ExoPair { beta, epsilon: if label_smoothing == 0.0 { 1e-3 } else { label_smoothing } },
            LossType::NcaPair => Objective::NcaPair { beta },
            LossType::Robust => Objective::Robust { beta, epsilon: label_smoothing },
            LossType::BcoPair => Objective::BcoPair { beta },
            LossType::SppoHard => Objective::SppoHard { beta },
            LossType::Aot => Objective::Aot { beta, label_smoothing },
            LossType::AotUnpaired => Objective::AotUnpaired { beta, label_smoothing },
            LossType::ApoZero => Objective::ApoZero { beta },
            LossType::ApoDown => Objective::ApoDown { beta },
            LossType::Discopop => Objective::Discopop { beta, tau: config.discopop_tau },
            LossType::Sft => Objective::Sft,
            LossType::SigmoidNorm => Objective::SigmoidNorm { beta },
            LossType::KtoPair => Objective::KtoPair { beta },
            LossType::Simpo => Objective::Simpo { beta, label_smoothing, gamma: config.simpo_gamma },
            LossType::Cpo => Objective::Cpo(Cpo {
                variant: config.cpo_loss_type,
                beta,
                label_smoothing,
                simpo_gamma: config.simpo_gamma,
                alphapo_alpha: config.alphapo_alpha,
                nll_weight: if config.cpo_loss_type == CpoVariant::Alphapo { 0.0 } else { config.cpo_alpha },
            }),
            LossType::Orpo => Objective::Orpo { beta },
            LossType::Kto | LossType::ApoZeroUnpaired => {
                panic!("{} trains on unpaired rows: use kto_loss (the trainer does)", kind.name())
            }
        }
    }

    fn term<B: Backend>(&self, batch: &PairBatch<B>, state: &mut ObjectiveState, training: bool, extra: &mut Extra) -> Term<B> {
        let delta = || batch.delta.clone();
        let per_token_averages = || Some((batch.chosen_avg_logps.clone(), batch.rejected_avg_logps.clone()));
        let (per_pair, rewards) = match *self {
            Objective::Sigmoid { beta } => (pairwise::dpo(delta(), beta), None),
            Objective::Hinge { beta } => (pairwise::hinge(delta(), beta), None),
            Objective::Ipo { beta } => (pairwise::ipo(batch.per_token_margin(), beta), None),
            Objective::ExoPair { beta, epsilon } => (pairwise::exo_pair(delta(), beta, epsilon), None),
            Objective::NcaPair { beta } => (pairwise::nca_pair(batch, beta), None),
            Objective::Robust { beta, epsilon } => (pairwise::robust(delta(), beta, epsilon), None),
            Objective::BcoPair { beta } => (pairwise::bco_pair(batch, beta, state, training), None),
            Objective::SppoHard { beta } => (pairwise::sppo_hard(batch, beta), None),
            Objective::Aot { beta, label_smoothing } => (pairwise::aot(batch, beta, label_smoothing), None),
            Objective::AotUnpaired { beta, label_smoothing } => (pairwise::aot_unpaired(batch, beta, label_smoothing), None),
            Objective::ApoZero { beta } => (pairwise::apo_zero(batch, beta), None),
            Objective::ApoDown { beta } => (pairwise::apo_down(batch, beta), None),
            Objective::Discopop { beta, tau } => (pairwise::discopop(delta(), beta, tau), None),
            Objective::Sft => (reference_free::sft(batch), None),
            Objective::SigmoidNorm { beta } => (pairwise::dpo(batch.per_token_margin(), beta), None),
            Objective::KtoPair { beta } => {
                (pairwise::kto_pair(batch.chosen_logratios.clone(), batch.rejected_logratios.clone(), beta), None)
            }
            Objective::Simpo { beta, label_smoothing, gamma } => {
                (reference_free::simpo(batch, beta, label_smoothing, gamma), per_token_averages())
            }
            Objective::Cpo(cpo) => {
                let (per_pair, rewards) = cpo.loss(batch, extra);
                (per_pair, Some(rewards))
            }
            Objective::Orpo { beta } => (reference_free::orpo(batch, beta, extra), per_token_averages()),
        };
        Term { per_pair, rewards }
    }
}

/// Computes the combined objective for one batch. `training` lets stateful objectives (BCO's
/// running reward mean) learn from the batch; evaluation leaves the state unchanged.
pub fn preference_loss<B: Backend>(
    config: &ObjectiveConfig,
    inputs: &PairInputs<B>,
    state: &mut ObjectiveState,
    training: bool,
) -> ObjectiveOutput<B> {
    let objectives: Vec<(Objective, f64)> =
        config.loss_type.iter().enumerate().map(|(i, &kind)| (Objective::new(kind, config), config.weight(i))).collect();
    let wpo_weights = config.use_weighting.then(|| {
        inputs.weights.clone().expect("use_weighting is set but no WPO weights were computed for the batch")
    });
    let batch = PairBatch::new(inputs, config.f_divergence_type, config.f_alpha_divergence_coef);
    let mut extra = Vec::new();
    let mut first_rewards = None;
    let mut loss = Tensor::<B, 1>::zeros([1], &batch.chosen_logps.device());
    for (i, (objective, weight)) in objectives.iter().enumerate() {
        let term = objective.term(&batch, state, training, &mut extra);
        if i == 0 {
            // the first loss type decides which rewards are logged
            first_rewards = term.rewards;
        }
        let per_pair = match &wpo_weights {
            Some(w) => term.per_pair * w.clone().detach(),
            None => term.per_pair,
        };
        loss = loss + per_pair.mean().mul_scalar(*weight);
    }
    if let Some(alpha) = config.rpo_alpha {
        // RPO averages per-sequence token means, unlike SFT's batch token mean
        let nll = length_normalised(batch.chosen_logps.clone().neg(), batch.chosen_lengths.clone()).mean();
        loss = loss + nll.mul_scalar(alpha);
    }
    let (chosen, rejected) = first_rewards.unwrap_or((batch.chosen_logratios, batch.rejected_logratios));
    ObjectiveOutput {
        loss,
        chosen_rewards: chosen.mul_scalar(config.beta).detach(),
        rejected_rewards: rejected.mul_scalar(config.beta).detach(),
        extra,
    }
}

#[cfg(test)]
mod tests;
