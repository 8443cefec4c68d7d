//! The DPO family as TRL 1.16 computes it: every `loss_type` a small pure function of per-pair
//! log-probs, combined with `loss_weights` (MPO), under an f-divergence, optional WPO weights and
//! LD-DPO length handling. All tensors are `[B]` (one value per pair).

use burn::tensor::activation::{log_sigmoid, sigmoid};
use burn::tensor::{Tensor, backend::Backend};
use serde::{Deserialize, Serialize};

/// TRL's `loss_type` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// DPO (Rafailov et al. 2023, arXiv:2305.18290): -log σ(β·Δ).
    Sigmoid,
    /// SLiC (Zhao et al. 2023, arXiv:2305.10425): max(0, 1 - β·Δ).
    Hinge,
    /// IPO (Azar et al. 2023, arXiv:2310.12036): (Δ/len - 1/(2β))², log-ratios length-averaged.
    Ipo,
    /// EXO (Ji et al. 2024, arXiv:2402.00856), pairwise form with ε = label_smoothing.
    ExoPair,
    /// NCA (Chen et al. 2024, arXiv:2402.05369), pairwise form.
    NcaPair,
    /// Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409): unbiased under label noise ε.
    Robust,
    /// BCO (Jung et al. 2024, arXiv:2404.04656), pairwise form with a running reward mean δ.
    BcoPair,
    /// SPPO (Wu et al. 2024, arXiv:2405.00675), hard-label form.
    SppoHard,
    /// AOT (Melnyk et al. 2024, arXiv:2406.05882): sorted paired log-ratio margins.
    Aot,
    /// AOT on unpaired data: chosen and rejected log-ratios sorted independently.
    AotUnpaired,
    /// APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266).
    ApoZero,
    /// APO-down (same paper).
    ApoDown,
    /// DiscoPOP (Chris Lu et al. 2024, arXiv:2406.08414): log-ratio-modulated logistic/exponential mix.
    Discopop,
    /// Negative log-likelihood of the chosen completions (token mean).
    Sft,
    /// DPO on length-averaged log-ratios.
    SigmoidNorm,
    /// The original KTO-pair loss (removed from TRL in 0.9.6), kept for users of the seed list.
    KtoPair,
    /// SimPO (Meng et al. 2024, arXiv:2405.14734), reference-free: -log σ(β(avg_w − avg_l) − γ)
    /// on length-averaged log-probs, margin γ = `simpo_gamma`.
    Simpo,
    /// CPO (Xu et al. 2024, arXiv:2401.08417), reference-free: -log σ(β(logp_w − logp_l)) plus
    /// `cpo_alpha` × the chosen NLL.
    Cpo,
    /// ORPO (Hong et al. 2024, arXiv:2403.07691), reference-free: chosen NLL − β·log σ(log-odds ratio)
    /// on length-averaged log-probs.
    Orpo,
    /// KTO (Ethayarajh et al. 2024, arXiv:2402.01306) on unpaired rows: desirable 1 − σ(β(r − z)),
    /// undesirable 1 − σ(β(z − r)), r the log-ratio and z the batch KL estimate (see [`kto_loss`]).
    Kto,
    /// APO-zero on unpaired rows (D'Oosterlinck et al. 2024, arXiv:2408.06266): KTO's form with z = 0.
    ApoZeroUnpaired,
}

impl LossType {
    pub const ALL: [LossType; 21] = [
        LossType::Sigmoid,
        LossType::Hinge,
        LossType::Ipo,
        LossType::ExoPair,
        LossType::NcaPair,
        LossType::Robust,
        LossType::BcoPair,
        LossType::SppoHard,
        LossType::Aot,
        LossType::AotUnpaired,
        LossType::ApoZero,
        LossType::ApoDown,
        LossType::Discopop,
        LossType::Sft,
        LossType::SigmoidNorm,
        LossType::KtoPair,
        LossType::Simpo,
        LossType::Cpo,
        LossType::Orpo,
        LossType::Kto,
        LossType::ApoZeroUnpaired,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LossType::Sigmoid => "sigmoid",
            LossType::Hinge => "hinge",
            LossType::Ipo => "ipo",
            LossType::ExoPair => "exo_pair",
            LossType::NcaPair => "nca_pair",
            LossType::Robust => "robust",
            LossType::BcoPair => "bco_pair",
            LossType::SppoHard => "sppo_hard",
            LossType::Aot => "aot",
            LossType::AotUnpaired => "aot_unpaired",
            LossType::ApoZero => "apo_zero",
            LossType::ApoDown => "apo_down",
            LossType::Discopop => "discopop",
            LossType::Sft => "sft",
            LossType::SigmoidNorm => "sigmoid_norm",
            LossType::KtoPair => "kto_pair",
            LossType::Simpo => "simpo",
            LossType::Cpo => "cpo",
            LossType::Orpo => "orpo",
            LossType::Kto => "kto",
            LossType::ApoZeroUnpaired => "apo_zero_unpaired",
        }
    }

    /// Objectives that compare the policy with itself only (no reference log-probs needed).
    pub fn reference_free(self) -> bool {
        matches!(self, LossType::Sft | LossType::Simpo | LossType::Cpo | LossType::Orpo)
    }

    /// Objectives over unpaired `{prompt, completion, label}` rows (KTO's data).
    pub fn unpaired(self) -> bool {
        matches!(self, LossType::Kto | LossType::ApoZeroUnpaired)
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        Self::ALL.iter().copied().find(|t| t.name() == s).ok_or_else(|| {
            let names: Vec<_> = Self::ALL.iter().map(|t| t.name()).collect();
            format!("unknown loss type {s:?}; expected one of {}", names.join(", "))
        })
    }
}

/// CPO's preference term (TRL's `CPOConfig.loss_type`). `ipo`, `simpo` and `alphapo` compare
/// length-averaged log-probs; `alphapo` is SimPO on AlphaPO rewards without the NLL term.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CpoVariant {
    #[default]
    Sigmoid,
    Hinge,
    Ipo,
    Simpo,
    Alphapo,
}

/// How the policy/reference log-ratios become the preference logit (TRL's `f_divergence_type`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FDivergence {
    #[default]
    ReverseKl,
    ForwardKl,
    JsDivergence,
    AlphaDivergence,
}

/// Hyper-parameters of the preference objective; names follow TRL's `DPOConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectiveConfig {
    pub loss_type: Vec<LossType>,
    /// One weight per loss type (all 1 when empty).
    pub loss_weights: Vec<f64>,
    pub beta: f64,
    pub label_smoothing: f64,
    pub f_divergence_type: FDivergence,
    pub f_alpha_divergence_coef: f64,
    /// WPO: weight each pair by its length-normalised policy probability.
    pub use_weighting: bool,
    /// LD-DPO: weight of the log-probs beyond the shorter completion's length.
    pub ld_alpha: Option<f64>,
    pub discopop_tau: f64,
    /// RPO: add `rpo_alpha` × the chosen completions' NLL.
    pub rpo_alpha: Option<f64>,
    /// SimPO's target margin γ.
    pub simpo_gamma: f64,
    /// CPO's weight of the chosen NLL.
    pub cpo_alpha: f64,
    /// CPO's preference term.
    pub cpo_loss_type: CpoVariant,
    /// AlphaPO's α (TRL's `alpha`): rewards `(1 − p^(−α)) / α` instead of `log p` when non-zero.
    pub alphapo_alpha: f64,
    /// KTO's weights of the desirable and undesirable rows' losses.
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        Self {
            loss_type: vec![LossType::Sigmoid],
            loss_weights: Vec::new(),
            beta: 0.1,
            label_smoothing: 0.0,
            f_divergence_type: FDivergence::ReverseKl,
            f_alpha_divergence_coef: 0.5,
            use_weighting: false,
            ld_alpha: None,
            discopop_tau: 0.05,
            rpo_alpha: None,
            simpo_gamma: 0.5,
            cpo_alpha: 1.0,
            cpo_loss_type: CpoVariant::Sigmoid,
            alphapo_alpha: 0.0,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
        }
    }
}

impl ObjectiveConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.loss_type.is_empty() {
            return Err("loss_type is empty".into());
        }
        if self.loss_type.iter().any(|t| t.unpaired()) && self.loss_type.len() > 1 {
            return Err(format!(
                "loss_type {:?}: kto and apo_zero_unpaired train on unpaired rows and cannot be combined with other types",
                self.loss_type.iter().map(|t| t.name()).collect::<Vec<_>>()
            ));
        }
        if !(self.desirable_weight >= 0.0 && self.undesirable_weight >= 0.0) {
            return Err(format!(
                "desirable_weight and undesirable_weight must be >= 0, got {} and {}",
                self.desirable_weight, self.undesirable_weight
            ));
        }
        if !self.loss_weights.is_empty() && self.loss_weights.len() != self.loss_type.len() {
            return Err(format!(
                "loss_weights has {} entries but loss_type has {}",
                self.loss_weights.len(),
                self.loss_type.len()
            ));
        }
        if self.beta.is_nan() || self.beta <= 0.0 {
            return Err(format!("beta must be positive, got {}", self.beta));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(format!("label_smoothing must be in [0, 0.5), got {}", self.label_smoothing));
        }
        if let Some(a) = self.ld_alpha
            && !(0.0..=1.0).contains(&a) {
                return Err(format!("ld_alpha must be in [0, 1], got {a}"));
            }
        if let Some(w) = self.loss_weights.iter().find(|w| !(**w >= 0.0 && w.is_finite())) {
            return Err(format!("loss_weights must be finite and >= 0, got {w}"));
        }
        // a NaN fails each check, as it should
        let checks = [
            ("beta", self.beta, self.beta.is_finite(), "finite"),
            ("rpo_alpha", self.rpo_alpha.unwrap_or(0.0), self.rpo_alpha.is_none_or(|a| a >= 0.0 && a.is_finite()), ">= 0"),
            ("cpo_alpha", self.cpo_alpha, self.cpo_alpha >= 0.0 && self.cpo_alpha.is_finite(), ">= 0"),
            ("simpo_gamma", self.simpo_gamma, self.simpo_gamma.is_finite(), "finite"),
            ("discopop_tau", self.discopop_tau, self.discopop_tau > 0.0 && self.discopop_tau.is_finite(), "> 0"),
            ("f_alpha_divergence_coef", self.f_alpha_divergence_coef, self.f_alpha_divergence_coef.is_finite(), "finite"),
            ("alphapo_alpha", self.alphapo_alpha, self.alphapo_alpha.is_finite(), "finite"),
            ("desirable_weight", self.desirable_weight, self.desirable_weight.is_finite(), "finite"),
            ("undesirable_weight", self.undesirable_weight, self.undesirable_weight.is_finite(), "finite"),
        ];
        for (key, value, ok, expected) in checks {
            if !ok {
                return Err(format!("{key} must be {expected}, got {value}"));
            }
        }
        Ok(())
    }

    /// True when no loss type needs reference log-probs.
    pub fn reference_free(&self) -> bool {
        self.loss_type.iter().all(|t| t.reference_free())
    }

    fn weight(&self, i: usize) -> f64 {
        self.loss_weights.get(i).copied().unwrap_or(1.0)
    }
}

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

/// KTO's outputs for a batch of unpaired rows.
pub struct KtoOutput<B: Backend> {
    /// Scalar `[1]`: the mean over rows of the weighted row losses.
    pub loss: Tensor<B, 1>,
    /// `β·(logp − ref_logp)` per row, detached.
    pub rewards: Tensor<B, 1>,
    /// The KL estimate used (0 for `apo_zero_unpaired`).
    pub kl: f64,
}

/// KTO (`loss_type = ["kto"]`) or unpaired APO-zero on rows with `desirable` flags. `kl` is the
/// batch estimate mean(policy − reference log-probs of mismatched prompt/completion pairs), which
/// is clamped at 0 here and carries no gradient.
pub fn kto_loss<B: Backend>(
    config: &ObjectiveConfig,
    logps: Tensor<B, 1>,
    ref_logps: Tensor<B, 1>,
    desirable: &[bool],
    kl: f64,
) -> KtoOutput<B> {
    let device = logps.device();
    let kl = match config.loss_type.first() {
        Some(LossType::ApoZeroUnpaired) => 0.0,
        _ => kl.max(0.0),
    };
    let n = desirable.len();
    let signs: Vec<f32> = desirable.iter().map(|&d| if d { 1.0 } else { -1.0 }).collect();
    let weights: Vec<f32> = desirable
        .iter()
        .map(|&d| if d { config.desirable_weight as f32 } else { config.undesirable_weight as f32 })
        .collect();
    let signs = Tensor::<B, 1>::from_data(burn::tensor::TensorData::new(signs, [n]), &device);
    let weights = Tensor::<B, 1>::from_data(burn::tensor::TensorData::new(weights, [n]), &device);
    let logratios = logps - ref_logps;
    let margin = (logratios.clone().sub_scalar(kl) * signs).mul_scalar(config.beta);
    let losses = sigmoid(margin).neg().add_scalar(1.0) * weights;
    KtoOutput {
        loss: losses.mean(),
        rewards: logratios.mul_scalar(config.beta).detach(),
        kl,
    }
}

/// softplus(x) = log(1 + eˣ) = -log σ(-x), via the stable log-sigmoid.
fn softplus<B: Backend>(x: Tensor<B, 1>) -> Tensor<B, 1> {
    log_sigmoid(x.neg()).neg()
}

/// `exp` with the argument capped below f32 overflow (TRL's `cap_exp`).
fn cap_exp<B: Backend>(x: Tensor<B, 1>) -> Tensor<B, 1> {
    x.clamp_max(f32::MAX.ln() as f64).exp()
}

/// Sorts a small host vector and rebuilds the tensor; gradient flows through `select`.
fn sort_1d<B: Backend>(x: Tensor<B, 1>) -> Tensor<B, 1> {
    let values: Vec<f32> = x.clone().detach().into_data().convert::<f32>().to_vec().expect("f32");
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let idx: Vec<i64> = order.iter().map(|&i| i as i64).collect();
    let device = x.device();
    let idx = Tensor::<B, 1, burn::tensor::Int>::from_data(burn::tensor::TensorData::new(idx, [values.len()]), &device);
    x.select(0, idx)
}

/// Computes the combined objective for one batch. `training` lets stateful objectives (BCO's
/// running reward mean) learn from the batch; evaluation leaves the state unchanged.
pub fn preference_loss<B: Backend>(
    config: &ObjectiveConfig,
    inputs: &PairInputs<B>,
    state: &mut ObjectiveState,
    training: bool,
) -> ObjectiveOutput<B> {
    let beta = config.beta;
    let ls = config.label_smoothing;
    let zeros = || inputs.chosen_logps.zeros_like();
    let ref_c = inputs.ref_chosen_logps.clone().unwrap_or_else(zeros);
    let ref_r = inputs.ref_rejected_logps.clone().unwrap_or_else(zeros);
    let (pc, pr) = (inputs.chosen_logps.clone(), inputs.rejected_logps.clone());
    let chosen_logratios = pc.clone() - ref_c.clone();
    let rejected_logratios = pr.clone() - ref_r.clone();

    // The preference logit Δ under the chosen f-divergence.
    let delta = match config.f_divergence_type {
        FDivergence::AlphaDivergence => {
            let a = config.f_alpha_divergence_coef;
            (cap_exp(rejected_logratios.clone().mul_scalar(-a)) - cap_exp(chosen_logratios.clone().mul_scalar(-a))).div_scalar(a)
        }
        FDivergence::ReverseKl | FDivergence::ForwardKl | FDivergence::JsDivergence => {
            let logits = (pc.clone() - pr.clone()) - (ref_c.clone() - ref_r.clone());
            match config.f_divergence_type {
                FDivergence::JsDivergence => {
                    logits - (softplus(chosen_logratios.clone()) - softplus(rejected_logratios.clone()))
                }
                // f(u) = -log u: f'(u_w) - f'(u_l) = 1/u_l - 1/u_w.
                FDivergence::ForwardKl => cap_exp(rejected_logratios.clone().neg()) - cap_exp(chosen_logratios.clone().neg()),
                _ => logits,
            }
        }
    };

    let (lc, lr) = (inputs.chosen_lengths.clone(), inputs.rejected_lengths.clone());
    let avg_c = pc.clone() / lc.clone().clamp_min(1.0);
    let avg_r = pr.clone() / lr.clone().clamp_min(1.0);
    // token-mean NLL of the chosen completions over the batch
    let chosen_nll = || pc.clone().sum().neg() / lc.clone().sum().clamp_min(1.0);
    let mut extra = Vec::new();
    let mut cpo_rewards: Option<(Tensor<B, 1>, Tensor<B, 1>)> = None;
    let mut loss = Tensor::<B, 1>::zeros([1], &pc.device());
    for (i, &kind) in config.loss_type.iter().enumerate() {
        let per_pair = match kind {
            LossType::Sigmoid => log_sigmoid(delta.clone().mul_scalar(beta)).neg(),
            LossType::Robust => (log_sigmoid(delta.clone().mul_scalar(beta)).neg().mul_scalar(1.0 - ls)
                + log_sigmoid(delta.clone().mul_scalar(-beta)).mul_scalar(ls))
            .div_scalar(1.0 - 2.0 * ls),
            LossType::ExoPair => {
                let eps = if ls == 0.0 { 1e-3 } else { ls };
                let x = delta.clone().mul_scalar(beta);
                sigmoid(x.clone()) * (log_sigmoid(x.clone()).sub_scalar((1.0 - eps).ln()))
                    + sigmoid(x.clone().neg()) * (log_sigmoid(x.neg()).sub_scalar(eps.ln()))
            }
            LossType::Hinge => delta.clone().mul_scalar(-beta).add_scalar(1.0).clamp_min(0.0),
            LossType::Ipo => {
                let d = chosen_logratios.clone() / lc.clone().clamp_min(1.0) - rejected_logratios.clone() / lr.clone().clamp_min(1.0);
                d.sub_scalar(1.0 / (2.0 * beta)).powi_scalar(2)
            }
            LossType::BcoPair => {
                let cr = chosen_logratios.clone().mul_scalar(beta);
                let rr = rejected_logratios.clone().mul_scalar(beta);
                if training {
                    let batch_mean: f64 = Tensor::cat(vec![cr.clone().detach(), rr.clone().detach()], 0)
                        .mean()
                        .into_scalar()
                        .elem_f64();
                    // TRL's RunningMoments fed one scalar (the batch's mean reward) per step.
                    let total = state.bco_count + 1.0;
                    state.bco_mean += (batch_mean - state.bco_mean) / total;
                    state.bco_count = total;
                }
                let d = state.bco_mean;
                log_sigmoid(cr.sub_scalar(d)).neg() - log_sigmoid(rr.sub_scalar(d).neg())
            }
            LossType::SppoHard => {
                chosen_logratios.clone().sub_scalar(0.5 / beta).powi_scalar(2)
                    + rejected_logratios.clone().add_scalar(0.5 / beta).powi_scalar(2)
            }
            LossType::NcaPair => {
                let cr = chosen_logratios.clone().mul_scalar(beta);
                let rr = rejected_logratios.clone().mul_scalar(beta);
                log_sigmoid(cr.clone()).neg() - log_sigmoid(cr.neg()).mul_scalar(0.5) - log_sigmoid(rr.neg()).mul_scalar(0.5)
            }
            LossType::AotUnpaired => {
                let d = sort_1d(chosen_logratios.clone()) - sort_1d(rejected_logratios.clone());
                log_sigmoid(d.clone().mul_scalar(beta)).neg().mul_scalar(1.0 - ls) - log_sigmoid(d.mul_scalar(-beta)).mul_scalar(ls)
            }
            LossType::Aot => {
                let d = sort_1d(pc.clone() - pr.clone()) - sort_1d(ref_c.clone() - ref_r.clone());
                log_sigmoid(d.clone().mul_scalar(beta)).neg().mul_scalar(1.0 - ls) - log_sigmoid(d.mul_scalar(-beta)).mul_scalar(ls)
            }
            LossType::ApoZero => {
                sigmoid(chosen_logratios.clone().mul_scalar(beta)).neg().add_scalar(1.0)
                    + sigmoid(rejected_logratios.clone().mul_scalar(beta))
            }
            LossType::ApoDown => {
                sigmoid(chosen_logratios.clone().mul_scalar(beta))
                    + sigmoid(delta.clone().mul_scalar(beta)).neg().add_scalar(1.0)
            }
            LossType::Discopop => {
                let logits = delta.clone().mul_scalar(beta);
                let modulation = sigmoid(logits.clone().div_scalar(config.discopop_tau));
                log_sigmoid(logits.clone()).neg() * modulation.clone().neg().add_scalar(1.0) + logits.neg().exp() * modulation
            }
            LossType::Sft => {
                let nll = pc.clone().sum().neg() / lc.clone().sum().clamp_min(1.0);
                nll.expand([pc.dims()[0]])
            }
            LossType::SigmoidNorm => {
                let d = chosen_logratios.clone() / lc.clone().clamp_min(1.0) - rejected_logratios.clone() / lr.clone().clamp_min(1.0);
                log_sigmoid(d.mul_scalar(beta)).neg()
            }
            LossType::KtoPair => kto_pair(chosen_logratios.clone(), rejected_logratios.clone(), beta),
            LossType::Kto | LossType::ApoZeroUnpaired => {
                panic!("{} trains on unpaired rows: use kto_loss (the trainer does)", kind.name())
            }
            LossType::Simpo => {
                let logits = (avg_c.clone() - avg_r.clone()).sub_scalar(config.simpo_gamma / beta);
                log_sigmoid(logits.clone().mul_scalar(beta)).neg().mul_scalar(1.0 - ls) - log_sigmoid(logits.mul_scalar(-beta)).mul_scalar(ls)
            }
            LossType::Cpo => {
                let variant = config.cpo_loss_type;
                let (c, r) = match variant {
                    CpoVariant::Ipo | CpoVariant::Simpo | CpoVariant::Alphapo => (avg_c.clone(), avg_r.clone()),
                    CpoVariant::Sigmoid | CpoVariant::Hinge => (pc.clone(), pr.clone()),
                };
                let a = config.alphapo_alpha;
                let reward = |x: Tensor<B, 1>| if a != 0.0 { x.mul_scalar(-a).exp().neg().add_scalar(1.0).div_scalar(a) } else { x };
                if matches!(variant, CpoVariant::Ipo | CpoVariant::Simpo | CpoVariant::Alphapo) {
                    // TRL's CPO logs the length-averaged log-probs these variants compare
                    let scalar = |t: &Tensor<B, 1>| -> f64 { t.clone().detach().mean().into_scalar().elem_f64() };
                    extra.push(("logps/chosen".to_string(), scalar(&c)));
                    extra.push(("logps/rejected".to_string(), scalar(&r)));
                }
                let (rc, rr) = (reward(c), reward(r));
                cpo_rewards = Some((rc.clone(), rr.clone()));
                let x = rc - rr;
                let smoothed = |x: Tensor<B, 1>| {
                    log_sigmoid(x.clone().mul_scalar(beta)).neg().mul_scalar(1.0 - ls) - log_sigmoid(x.mul_scalar(-beta)).mul_scalar(ls)
                };
                let pref = match variant {
                    CpoVariant::Sigmoid => smoothed(x),
                    CpoVariant::Hinge => x.mul_scalar(-beta).add_scalar(1.0).clamp_min(0.0),
                    CpoVariant::Ipo => x.sub_scalar(1.0 / (2.0 * beta)).powi_scalar(2),
                    CpoVariant::Simpo | CpoVariant::Alphapo => smoothed(x.sub_scalar(config.simpo_gamma / beta)),
                };
                let nll_weight = if variant == CpoVariant::Alphapo { 0.0 } else { config.cpo_alpha };
                if nll_weight != 0.0 {
                    let nll = chosen_nll();
                    extra.push(("nll_loss".to_string(), nll.clone().detach().into_scalar().elem_f64()));
                    pref + nll.mul_scalar(nll_weight).expand([pc.dims()[0]])
                } else {
                    pref
                }
            }
            LossType::Orpo => {
                // log odds(p) = log p - log(1 - p), p the length-averaged sequence probability
                let log1m = |x: Tensor<B, 1>| x.exp().neg().add_scalar(1.0).clamp_min(1e-30).log();
                let log_odds = (avg_c.clone() - avg_r.clone()) - (log1m(avg_c.clone()) - log1m(avg_r.clone()));
                let ratio = log_sigmoid(log_odds.clone());
                let nll = chosen_nll();
                let scalar = |t: Tensor<B, 1>| -> f64 { t.detach().mean().into_scalar().elem_f64() };
                extra.push(("log_odds_ratio".to_string(), scalar(ratio.clone())));
                extra.push(("log_odds_chosen".to_string(), scalar(log_odds)));
                extra.push(("nll_loss".to_string(), scalar(nll.clone())));
                nll.expand([pc.dims()[0]]) - ratio.mul_scalar(beta)
            }
        };
        let per_pair = match (&inputs.weights, config.use_weighting) {
            (Some(w), true) => per_pair * w.clone().detach(),
            (None, true) => panic!("use_weighting is set but no WPO weights were computed for the batch"),
            _ => per_pair,
        };
        loss = loss + per_pair.mean().mul_scalar(config.weight(i));
    }
    if let Some(alpha) = config.rpo_alpha {
        let nll = (pc.clone().neg() / lc.clone().clamp_min(1.0)).mean();
        loss = loss + nll.mul_scalar(alpha);
    }
    let averaged = matches!(config.loss_type.first(), Some(LossType::Simpo | LossType::Orpo));
    let (rc, rr) = match cpo_rewards {
        Some(rewards) if config.loss_type.first() == Some(&LossType::Cpo) => rewards,
        _ if averaged => (avg_c, avg_r),
        _ => (chosen_logratios, rejected_logratios),
    };
    ObjectiveOutput {
        loss,
        chosen_rewards: rc.mul_scalar(beta).detach(),
        rejected_rewards: rr.mul_scalar(beta).detach(),
        extra,
    }
}

/// KTO-pair (Ethayarajh et al. 2024, arXiv:2402.01306, as in TRL < 0.9.6): each side compared to
/// the clamped batch-mean log-ratio of the other side; chosen and rejected losses concatenated.
pub fn kto_pair<B: Backend>(chosen_logratios: Tensor<B, 1>, rejected_logratios: Tensor<B, 1>, beta: f64) -> Tensor<B, 1> {
    let chosen_kl = chosen_logratios.clone().mean().clamp_min(0.0).detach();
    let rejected_kl = rejected_logratios.clone().mean().clamp_min(0.0).detach();
    let n = chosen_logratios.dims()[0];
    let chosen_losses = sigmoid((chosen_logratios - rejected_kl.expand([n])).mul_scalar(beta)).neg().add_scalar(1.0);
    let rejected_losses = sigmoid((chosen_kl.expand([n]) - rejected_logratios).mul_scalar(beta)).neg().add_scalar(1.0);
    Tensor::cat(vec![chosen_losses, rejected_losses], 0)
}

trait ElemF64 {
    fn elem_f64(self) -> f64;
}

impl<E: burn::tensor::ElementConversion> ElemF64 for E {
    fn elem_f64(self) -> f64 {
        self.elem::<f64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    fn t(v: &[f32]) -> Tensor<Flex, 1> {
        Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &Default::default())
    }

    fn inputs(pc: &[f32], pr: &[f32], lc: &[f32], lr: &[f32]) -> PairInputs<Flex> {
        PairInputs {
            chosen_logps: t(pc),
            rejected_logps: t(pr),
            ref_chosen_logps: None,
            ref_rejected_logps: None,
            chosen_lengths: t(lc),
            rejected_lengths: t(lr),
            weights: None,
        }
    }

    fn run(kind: LossType, i: &PairInputs<Flex>) -> (f64, ObjectiveOutput<Flex>) {
        let config = ObjectiveConfig { loss_type: vec![kind], beta: 2.0, ..Default::default() };
        let out = preference_loss(&config, i, &mut ObjectiveState::default(), false);
        (out.loss.clone().into_scalar() as f64, out)
    }

    fn ls(x: f64) -> f64 {
        -(1.0 + (-x).exp()).ln()
    }

    #[test]
    fn simpo_matches_its_formula() {
        let i = inputs(&[-4.0], &[-9.0], &[2.0], &[3.0]);
        let (loss, out) = run(LossType::Simpo, &i);
        // avg -2 vs -3; β = 2, γ = 0.5: -log σ(2·(1 − 0.25))
        assert!((loss - -ls(2.0 * (1.0 - 0.25))).abs() < 1e-6, "{loss}");
        let rc: f32 = out.chosen_rewards.into_scalar();
        assert!((rc - -4.0).abs() < 1e-6, "rewards are β·avg logp: {rc}");
    }

    #[test]
    fn cpo_adds_the_chosen_nll() {
        let i = inputs(&[-4.0, -2.0], &[-5.0, -6.0], &[2.0, 2.0], &[1.0, 1.0]);
        let (loss, _) = run(LossType::Cpo, &i);
        let pref = (-ls(2.0) - ls(8.0)) / 2.0;
        let nll = 6.0 / 4.0;
        assert!((loss - (pref + nll)).abs() < 1e-6, "{loss} vs {}", pref + nll);
    }

    #[test]
    fn kto_matches_hand_computed_values() {
        let device = Default::default();
        let t = |v: &[f32]| Tensor::<Flex, 1>::from_data(TensorData::new(v.to_vec(), [v.len()]), &device);
        let config = ObjectiveConfig { loss_type: vec![LossType::Kto], beta: 0.5, desirable_weight: 1.0, undesirable_weight: 2.0, ..Default::default() };
        // log-ratios 2 (desirable) and 1 (undesirable), KL 0.4
        let out = kto_loss(&config, t(&[-1.0, -3.0]), t(&[-3.0, -4.0]), &[true, false], 0.4);
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let want = ((1.0 - sig(0.5 * (2.0 - 0.4))) + 2.0 * (1.0 - sig(0.5 * (0.4 - 1.0)))) / 2.0;
        let got = out.loss.into_scalar() as f64;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        let rewards: Vec<f32> = out.rewards.into_data().to_vec().unwrap();
        assert_eq!(rewards, vec![1.0, 0.5]);
        // a negative KL estimate is clamped at 0; apo_zero_unpaired ignores it
        assert_eq!(kto_loss(&config, t(&[-1.0]), t(&[-1.0]), &[true], -3.0).kl, 0.0);
        let apo = ObjectiveConfig { loss_type: vec![LossType::ApoZeroUnpaired], beta: 0.5, ..Default::default() };
        let out = kto_loss(&apo, t(&[-1.0, -3.0]), t(&[-3.0, -4.0]), &[true, false], 0.4);
        let want = ((1.0 - sig(1.0)) + sig(0.5)) / 2.0;
        assert!((out.loss.into_scalar() as f64 - want).abs() < 1e-6);
        let err = ObjectiveConfig { loss_type: vec![LossType::Kto, LossType::Sigmoid], ..Default::default() }.validate().unwrap_err();
        assert!(err.contains("cannot be combined"), "{err}");
    }

    #[test]
    fn cpo_variants_match_their_formulas() {
        // sums -4 vs -6 over lengths 2 and 3: averages -2 vs -2; β = 2 (see `run`)
        let i = inputs(&[-4.0], &[-6.0], &[2.0], &[3.0]);
        let with = |variant: CpoVariant, cpo_alpha: f64, alpha: f64| {
            let config = ObjectiveConfig { loss_type: vec![LossType::Cpo], beta: 2.0, cpo_loss_type: variant, cpo_alpha, alphapo_alpha: alpha, ..Default::default() };
            let out = preference_loss(&config, &i, &mut ObjectiveState::default(), true);
            let rc: f32 = out.chosen_rewards.clone().into_scalar();
            (out.loss.into_scalar() as f64, rc as f64)
        };
        let (hinge, rc) = with(CpoVariant::Hinge, 0.0, 0.0);
        assert!((hinge - 0.0).abs() < 1e-6 && (rc - -8.0).abs() < 1e-5, "relu(1 - 2·2) = 0: {hinge}, rewards β·sum: {rc}");
        let (ipo, rc) = with(CpoVariant::Ipo, 0.0, 0.0);
        assert!((ipo - 0.0625).abs() < 1e-6 && (rc - -4.0).abs() < 1e-5, "(0 - 1/4)²: {ipo}; rewards β·avg: {rc}");
        let (simpo, _) = with(CpoVariant::Simpo, 0.0, 0.0);
        assert!((simpo - -ls(2.0 * (0.0 - 0.25))).abs() < 1e-6, "{simpo}");
        let config = ObjectiveConfig { loss_type: vec![LossType::Cpo], beta: 2.0, cpo_loss_type: CpoVariant::Ipo, ..Default::default() };
        let out = preference_loss(&config, &i, &mut ObjectiveState::default(), true);
        let logged = |key: &str| out.extra.iter().find(|(k, _)| k == key).map(|(_, v)| *v);
        assert_eq!((logged("logps/chosen"), logged("logps/rejected")), (Some(-2.0), Some(-2.0)), "averaged variants log averages");
        let (nll, _) = with(CpoVariant::Ipo, 1.0, 0.0);
        assert!((nll - (0.0625 + 2.0)).abs() < 1e-5, "token-mean chosen NLL 4/2 added: {nll}");
        // AlphaPO: r = (1 − exp(−α·avg)) / α on averages -2 and -1 (lengths 2 and 2)
        let j = inputs(&[-4.0], &[-2.0], &[2.0], &[2.0]);
        let config = ObjectiveConfig { loss_type: vec![LossType::Cpo], beta: 2.0, cpo_loss_type: CpoVariant::Alphapo, alphapo_alpha: 0.5, ..Default::default() };
        let out = preference_loss(&config, &j, &mut ObjectiveState::default(), true);
        let r = |x: f64| (1.0 - (-0.5 * x).exp()) / 0.5;
        let want = -ls(2.0 * (r(-2.0) - r(-1.0) - 0.25));
        let got = out.loss.into_scalar() as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want} (no NLL term for alphapo)");
    }

    #[test]
    fn orpo_matches_its_formula_and_logs_its_metrics() {
        let i = inputs(&[-1.0], &[-4.0], &[2.0], &[2.0]);
        let (loss, out) = run(LossType::Orpo, &i);
        let (ac, ar) = (-0.5f64, -2.0f64);
        let odds = |a: f64| a - (1.0 - a.exp()).ln();
        let log_odds = odds(ac) - odds(ar);
        let want = 0.5 - 2.0 * ls(log_odds);
        assert!((loss - want).abs() < 1e-5, "{loss} vs {want}");
        let names: Vec<&str> = out.extra.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, vec!["log_odds_ratio", "log_odds_chosen", "nll_loss"]);
    }

    #[test]
    fn reference_free_types() {
        assert!(ObjectiveConfig { loss_type: vec![LossType::Simpo, LossType::Sft], ..Default::default() }.reference_free());
        assert!(!ObjectiveConfig::default().reference_free());
    }
}
