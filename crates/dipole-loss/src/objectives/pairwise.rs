//! Objectives on chosen/rejected pairs against a reference model. `delta` is the preference logit
//! Δ (see `PairBatch::delta`); every function returns one loss per pair (`[B]`) unless it says
//! otherwise.

use burn::tensor::activation::{log_sigmoid, sigmoid};
use burn::tensor::{Tensor, backend::Backend};

use super::ObjectiveState;
use super::batch::PairBatch;
use super::math::{host_mean, smoothed_sigmoid_loss, sort_1d};

/// DPO (Rafailov et al. 2023, arXiv:2305.18290): −log σ(βx); x = Δ, or `sigmoid_norm`'s per-token margin.
pub(super) fn dpo<B: Backend>(x: Tensor<B, 1>, beta: f64) -> Tensor<B, 1> {
    log_sigmoid(x.mul_scalar(beta)).neg()
}

/// SLiC (Zhao et al. 2023, arXiv:2305.10425): max(0, 1 − βΔ).
pub(super) fn hinge<B: Backend>(delta: Tensor<B, 1>, beta: f64) -> Tensor<B, 1> {
    delta.mul_scalar(-beta).add_scalar(1.0).clamp_min(0.0)
}

/// IPO (Azar et al. 2023, arXiv:2310.12036): (m − 1/(2β))², m the per-token log-ratio margin.
pub(super) fn ipo<B: Backend>(per_token_margin: Tensor<B, 1>, beta: f64) -> Tensor<B, 1> {
    per_token_margin.sub_scalar(1.0 / (2.0 * beta)).powi_scalar(2)
}

/// EXO (Ji et al. 2024, arXiv:2402.00856), pairwise: KL(p_θ ‖ p_ε) between σ(βΔ) and the labels smoothed by ε.
pub(super) fn exo_pair<B: Backend>(delta: Tensor<B, 1>, beta: f64, epsilon: f64) -> Tensor<B, 1> {
    let x = delta.mul_scalar(beta);
    sigmoid(x.clone()) * (log_sigmoid(x.clone()).sub_scalar((1.0 - epsilon).ln()))
        + sigmoid(x.clone().neg()) * (log_sigmoid(x.neg()).sub_scalar(epsilon.ln()))
}

/// NCA (Chen et al. 2024, arXiv:2402.05369), pairwise: −log σ(βr_w) − ½log σ(−βr_w) − ½log σ(−βr_l).
pub(super) fn nca_pair<B: Backend>(batch: &PairBatch<B>, beta: f64) -> Tensor<B, 1> {
    let chosen = batch.chosen_logratios.clone().mul_scalar(beta);
    let rejected = batch.rejected_logratios.clone().mul_scalar(beta);
    log_sigmoid(chosen.clone()).neg() - log_sigmoid(chosen.neg()).mul_scalar(0.5) - log_sigmoid(rejected.neg()).mul_scalar(0.5)
}

/// Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409): unbiased under a label-flip rate ε.
pub(super) fn robust<B: Backend>(delta: Tensor<B, 1>, beta: f64, epsilon: f64) -> Tensor<B, 1> {
    // the flipped-label term enters with a + sign (unlike label smoothing), then 1/(1 − 2ε) debiases
    (log_sigmoid(delta.clone().mul_scalar(beta)).neg().mul_scalar(1.0 - epsilon) + log_sigmoid(delta.mul_scalar(-beta)).mul_scalar(epsilon))
        .div_scalar(1.0 - 2.0 * epsilon)
}

/// BCO (Jung et al. 2024, arXiv:2404.04656), pairwise: −log σ(βr_w − δ) − log σ(−(βr_l − δ)), δ a running reward mean.
pub(super) fn bco_pair<B: Backend>(batch: &PairBatch<B>, beta: f64, state: &mut ObjectiveState, training: bool) -> Tensor<B, 1> {
    let chosen = batch.chosen_logratios.clone().mul_scalar(beta);
    let rejected = batch.rejected_logratios.clone().mul_scalar(beta);
    if training {
        let batch_mean = host_mean(Tensor::cat(vec![chosen.clone().detach(), rejected.clone().detach()], 0));
        // TRL's RunningMoments is fed one scalar (the batch's mean reward) per step.
        let total = state.bco_count + 1.0;
        state.bco_mean += (batch_mean - state.bco_mean) / total;
        state.bco_count = total;
    }
    let delta = state.bco_mean;
    log_sigmoid(chosen.sub_scalar(delta)).neg() - log_sigmoid(rejected.sub_scalar(delta).neg())
}

/// SPPO (Wu et al. 2024, arXiv:2405.00675), hard labels: (r_w − 1/(2β))² + (r_l + 1/(2β))².
pub(super) fn sppo_hard<B: Backend>(batch: &PairBatch<B>, beta: f64) -> Tensor<B, 1> {
    batch.chosen_logratios.clone().sub_scalar(0.5 / beta).powi_scalar(2) + batch.rejected_logratios.clone().add_scalar(0.5 / beta).powi_scalar(2)
}

/// AOT (Melnyk et al. 2024, arXiv:2406.05882): smoothed sigmoid of sorted policy margins minus sorted reference margins.
pub(super) fn aot<B: Backend>(batch: &PairBatch<B>, beta: f64, label_smoothing: f64) -> Tensor<B, 1> {
    let policy_margins = batch.chosen_logps.clone() - batch.rejected_logps.clone();
    let reference_margins = batch.ref_chosen_logps.clone() - batch.ref_rejected_logps.clone();
    smoothed_sigmoid_loss(sort_1d(policy_margins) - sort_1d(reference_margins), beta, label_smoothing)
}

/// AOT on unpaired data (Melnyk et al. 2024, arXiv:2406.05882): chosen and rejected log-ratios sorted independently.
pub(super) fn aot_unpaired<B: Backend>(batch: &PairBatch<B>, beta: f64, label_smoothing: f64) -> Tensor<B, 1> {
    let margins = sort_1d(batch.chosen_logratios.clone()) - sort_1d(batch.rejected_logratios.clone());
    smoothed_sigmoid_loss(margins, beta, label_smoothing)
}

/// APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266): 1 − σ(βr_w) + σ(βr_l).
pub(super) fn apo_zero<B: Backend>(batch: &PairBatch<B>, beta: f64) -> Tensor<B, 1> {
    sigmoid(batch.chosen_logratios.clone().mul_scalar(beta)).neg().add_scalar(1.0) + sigmoid(batch.rejected_logratios.clone().mul_scalar(beta))
}

/// APO-down (D'Oosterlinck et al. 2024, arXiv:2408.06266): σ(βr_w) + 1 − σ(βΔ).
pub(super) fn apo_down<B: Backend>(batch: &PairBatch<B>, beta: f64) -> Tensor<B, 1> {
    sigmoid(batch.chosen_logratios.clone().mul_scalar(beta)) + sigmoid(batch.delta.clone().mul_scalar(beta)).neg().add_scalar(1.0)
}

/// DiscoPOP (Lu et al. 2024, arXiv:2406.08414): −log σ(x)·(1 − m) + e^(−x)·m, x = βΔ, m = σ(x/τ).
pub(super) fn discopop<B: Backend>(delta: Tensor<B, 1>, beta: f64, tau: f64) -> Tensor<B, 1> {
    let logits = delta.mul_scalar(beta);
    let modulation = sigmoid(logits.clone().div_scalar(tau));
    log_sigmoid(logits.clone()).neg() * modulation.clone().neg().add_scalar(1.0) + logits.neg().exp() * modulation
}

/// KTO-pair (Ethayarajh et al. 2024, arXiv:2402.01306, as in TRL < 0.9.6): each side compared to
/// the clamped batch-mean log-ratio of the other side; chosen and rejected losses concatenated (`[2B]`).
pub fn kto_pair<B: Backend>(chosen_logratios: Tensor<B, 1>, rejected_logratios: Tensor<B, 1>, beta: f64) -> Tensor<B, 1> {
    let chosen_kl = chosen_logratios.clone().mean().clamp_min(0.0).detach();
    let rejected_kl = rejected_logratios.clone().mean().clamp_min(0.0).detach();
    let n = chosen_logratios.dims()[0];
    let chosen_losses = sigmoid((chosen_logratios - rejected_kl.expand([n])).mul_scalar(beta)).neg().add_scalar(1.0);
    let rejected_losses = sigmoid((chosen_kl.expand([n]) - rejected_logratios).mul_scalar(beta)).neg().add_scalar(1.0);
    Tensor::cat(vec![chosen_losses, rejected_losses], 0)
}
