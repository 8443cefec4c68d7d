//! Objectives that need no reference model: the policy's own log-probs, often length-averaged.

use burn::tensor::activation::log_sigmoid;
use burn::tensor::{Tensor, backend::Backend};

use super::{CpoVariant, Extra};
use super::batch::PairBatch;
use super::math::{host_mean, host_scalar, smoothed_sigmoid_loss};

/// SFT: the token-mean NLL of the chosen completions, the same for every pair.
pub(super) fn sft<B: Backend>(batch: &PairBatch<B>) -> Tensor<B, 1> {
    batch.chosen_nll().expand([batch.pairs()])
}

/// SimPO (Meng et al. 2024, arXiv:2405.14734): smoothed −log σ(β(avg_w − avg_l) − γ).
pub(super) fn simpo<B: Backend>(batch: &PairBatch<B>, beta: f64, label_smoothing: f64, gamma: f64) -> Tensor<B, 1> {
    let margins = (batch.chosen_avg_logps.clone() - batch.rejected_avg_logps.clone()).sub_scalar(gamma / beta);
    smoothed_sigmoid_loss(margins, beta, label_smoothing)
}

/// CPO's settings (TRL's `CPOConfig`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Cpo {
    pub variant: CpoVariant,
    pub beta: f64,
    pub label_smoothing: f64,
    pub simpo_gamma: f64,
    /// AlphaPO's α; 0 keeps the log-probs as rewards.
    pub alphapo_alpha: f64,
    /// Weight of the chosen NLL (0 for AlphaPO).
    pub nll_weight: f64,
}

impl Cpo {
    /// CPO (Xu et al. 2024, arXiv:2401.08417): a preference term on policy rewards plus the chosen
    /// NLL. Returns the per-pair losses and the (unscaled) rewards compared.
    pub fn loss<B: Backend>(&self, batch: &PairBatch<B>, extra: &mut Extra) -> (Tensor<B, 1>, (Tensor<B, 1>, Tensor<B, 1>)) {
        let averaged = matches!(self.variant, CpoVariant::Ipo | CpoVariant::Simpo | CpoVariant::Alphapo);
        let (chosen, rejected) = if averaged {
            // TRL's CPO logs the length-averaged log-probs these variants compare
            extra.push(("logps/chosen".to_string(), host_mean(batch.chosen_avg_logps.clone())));
            extra.push(("logps/rejected".to_string(), host_mean(batch.rejected_avg_logps.clone())));
            (batch.chosen_avg_logps.clone(), batch.rejected_avg_logps.clone())
        } else {
            (batch.chosen_logps.clone(), batch.rejected_logps.clone())
        };
        let rewards = (self.reward(chosen), self.reward(rejected));
        let preference = self.preference(rewards.0.clone() - rewards.1.clone());
        if self.nll_weight == 0.0 {
            return (preference, rewards);
        }
        let nll = batch.chosen_nll();
        extra.push(("nll_loss".to_string(), host_scalar(nll.clone())));
        (preference + nll.mul_scalar(self.nll_weight).expand([batch.pairs()]), rewards)
    }

    /// AlphaPO (2025, arXiv:2501.03884) reward (1 − e^(−α·x)) / α; x itself when α = 0.
    fn reward<B: Backend>(&self, logps: Tensor<B, 1>) -> Tensor<B, 1> {
        let a = self.alphapo_alpha;
        if a != 0.0 { logps.mul_scalar(-a).exp().neg().add_scalar(1.0).div_scalar(a) } else { logps }
    }

    /// The preference term on the reward margin `x`.
    fn preference<B: Backend>(&self, x: Tensor<B, 1>) -> Tensor<B, 1> {
        let (beta, label_smoothing) = (self.beta, self.label_smoothing);
        match self.variant {
            CpoVariant::Sigmoid => smoothed_sigmoid_loss(x, beta, label_smoothing),
            CpoVariant::Hinge => x.mul_scalar(-beta).add_scalar(1.0).clamp_min(0.0),
            CpoVariant::Ipo => x.sub_scalar(1.0 / (2.0 * beta)).powi_scalar(2),
            CpoVariant::Simpo | CpoVariant::Alphapo => smoothed_sigmoid_loss(x.sub_scalar(self.simpo_gamma / beta), beta, label_smoothing),
        }
    }
}

/// ORPO (Hong et al. 2024, arXiv:2403.07691): chosen NLL − β·log σ(log odds_w − log odds_l), odds of the per-token probability.
pub(super) fn orpo<B: Backend>(batch: &PairBatch<B>, beta: f64, extra: &mut Extra) -> Tensor<B, 1> {
    let (chosen, rejected) = (batch.chosen_avg_logps.clone(), batch.rejected_avg_logps.clone());
    // log odds(p) = log p − log(1 − p); the clamp keeps log(1 − p) finite as p → 1
    let log1m = |x: Tensor<B, 1>| x.exp().neg().add_scalar(1.0).clamp_min(1e-30).log();
    let log_odds = (chosen.clone() - rejected.clone()) - (log1m(chosen) - log1m(rejected));
    let ratio = log_sigmoid(log_odds.clone());
    let nll = batch.chosen_nll();
    extra.push(("log_odds_ratio".to_string(), host_mean(ratio.clone())));
    extra.push(("log_odds_chosen".to_string(), host_mean(log_odds)));
    extra.push(("nll_loss".to_string(), host_mean(nll.clone())));
    nll.expand([batch.pairs()]) - ratio.mul_scalar(beta)
}
