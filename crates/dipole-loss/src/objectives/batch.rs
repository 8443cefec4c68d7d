//! The per-pair quantities several objectives read, computed once per batch.

use burn::tensor::{Tensor, backend::Backend};

use super::math::{cap_exp, length_normalised, softplus};
use super::{FDivergence, PairInputs};

/// One batch of pairs as the objectives see it. All tensors are `[B]`.
pub(super) struct PairBatch<B: Backend> {
    pub chosen_logps: Tensor<B, 1>,
    pub rejected_logps: Tensor<B, 1>,
    /// Zeros in reference-free training.
    pub ref_chosen_logps: Tensor<B, 1>,
    pub ref_rejected_logps: Tensor<B, 1>,
    /// Policy minus reference log-probs.
    pub chosen_logratios: Tensor<B, 1>,
    pub rejected_logratios: Tensor<B, 1>,
    /// The preference logit Δ under the configured f-divergence.
    pub delta: Tensor<B, 1>,
    pub chosen_lengths: Tensor<B, 1>,
    pub rejected_lengths: Tensor<B, 1>,
    /// Policy log-probs per completion token.
    pub chosen_avg_logps: Tensor<B, 1>,
    pub rejected_avg_logps: Tensor<B, 1>,
}

impl<B: Backend> PairBatch<B> {
    /// `alpha_coef` is TRL's `f_alpha_divergence_coef`, read by the α-divergence only.
    pub fn new(inputs: &PairInputs<B>, divergence: FDivergence, alpha_coef: f64) -> Self {
        let zeros = || inputs.chosen_logps.zeros_like();
        let ref_chosen_logps = inputs.ref_chosen_logps.clone().unwrap_or_else(zeros);
        let ref_rejected_logps = inputs.ref_rejected_logps.clone().unwrap_or_else(zeros);
        let (chosen_logps, rejected_logps) = (inputs.chosen_logps.clone(), inputs.rejected_logps.clone());
        let chosen_logratios = chosen_logps.clone() - ref_chosen_logps.clone();
        let rejected_logratios = rejected_logps.clone() - ref_rejected_logps.clone();
        // policy margin minus reference margin, TRL's order of subtraction (it rounds differently)
        let reverse_kl_logit = || (chosen_logps.clone() - rejected_logps.clone()) - (ref_chosen_logps.clone() - ref_rejected_logps.clone());
        let delta = preference_logit(divergence, alpha_coef, chosen_logratios.clone(), rejected_logratios.clone(), reverse_kl_logit);
        let (chosen_lengths, rejected_lengths) = (inputs.chosen_lengths.clone(), inputs.rejected_lengths.clone());
        Self {
            chosen_avg_logps: length_normalised(chosen_logps.clone(), chosen_lengths.clone()),
            rejected_avg_logps: length_normalised(rejected_logps.clone(), rejected_lengths.clone()),
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            chosen_logratios,
            rejected_logratios,
            delta,
            chosen_lengths,
            rejected_lengths,
        }
    }

    /// The batch size B.
    pub fn pairs(&self) -> usize {
        self.chosen_logps.dims()[0]
    }

    /// The length-normalised log-ratio margin that IPO and `sigmoid_norm` compare.
    pub fn per_token_margin(&self) -> Tensor<B, 1> {
        length_normalised(self.chosen_logratios.clone(), self.chosen_lengths.clone())
            - length_normalised(self.rejected_logratios.clone(), self.rejected_lengths.clone())
    }

    /// Token-mean NLL of the chosen completions over the whole batch, `[1]`.
    pub fn chosen_nll(&self) -> Tensor<B, 1> {
        length_normalised(self.chosen_logps.clone().sum().neg(), self.chosen_lengths.clone().sum())
    }
}

/// Δ for TRL's `f_divergence_type`: f'(u_w) − f'(u_l), u the policy/reference probability ratio.
fn preference_logit<B: Backend>(
    divergence: FDivergence,
    alpha_coef: f64,
    chosen_logratios: Tensor<B, 1>,
    rejected_logratios: Tensor<B, 1>,
    reverse_kl_logit: impl FnOnce() -> Tensor<B, 1>,
) -> Tensor<B, 1> {
    match divergence {
        FDivergence::ReverseKl => reverse_kl_logit(),
        // f(u) = -log u: f'(u_w) - f'(u_l) = 1/u_l - 1/u_w.
        FDivergence::ForwardKl => cap_exp(rejected_logratios.neg()) - cap_exp(chosen_logratios.neg()),
        FDivergence::JsDivergence => reverse_kl_logit() - (softplus(chosen_logratios) - softplus(rejected_logratios)),
        FDivergence::AlphaDivergence => {
            let a = alpha_coef;
            (cap_exp(rejected_logratios.mul_scalar(-a)) - cap_exp(chosen_logratios.mul_scalar(-a))).div_scalar(a)
        }
    }
}
