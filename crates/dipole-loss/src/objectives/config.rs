//! The objective's hyper-parameters (TRL's `DPOConfig` names) and their validation.

use serde::{Deserialize, Serialize};

use super::LossType;

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

/// A loss type name or objective setting that cannot be used.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ObjectiveError {
    #[error("unknown loss type {0:?}; expected one of {names}", names = loss_type_names())]
    UnknownLossType(String),
    #[error("loss_type is empty")]
    NoLossType,
    #[error("loss_type {0:?}: kto and apo_zero_unpaired train on unpaired rows and cannot be combined with other types")]
    UnpairedCombined(Vec<&'static str>),
    #[error("desirable_weight and undesirable_weight must be >= 0, got {desirable} and {undesirable}")]
    NegativeKtoWeight { desirable: f64, undesirable: f64 },
    #[error("loss_weights has {weights} entries but loss_type has {types}")]
    LossWeightsLength { weights: usize, types: usize },
    /// kto_pair's loss has one term per completion (2B), WPO weights one per pair (B).
    #[error("use_weighting (WPO) weights pairs; kto_pair's loss is per completion and cannot take it")]
    WeightingKtoPair,
    #[error("{key} must be {expected}, got {value}")]
    OutOfRange { key: &'static str, expected: &'static str, value: f64 },
}

fn loss_type_names() -> String {
    LossType::ALL.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
}

impl ObjectiveConfig {
    pub fn validate(&self) -> Result<(), ObjectiveError> {
        if self.loss_type.is_empty() {
            return Err(ObjectiveError::NoLossType);
        }
        if self.loss_type.iter().any(|t| t.unpaired()) && self.loss_type.len() > 1 {
            return Err(ObjectiveError::UnpairedCombined(self.loss_type.iter().map(|t| t.name()).collect()));
        }
        if !(self.desirable_weight >= 0.0 && self.undesirable_weight >= 0.0) {
            return Err(ObjectiveError::NegativeKtoWeight { desirable: self.desirable_weight, undesirable: self.undesirable_weight });
        }
        if !self.loss_weights.is_empty() && self.loss_weights.len() != self.loss_type.len() {
            return Err(ObjectiveError::LossWeightsLength { weights: self.loss_weights.len(), types: self.loss_type.len() });
        }
        if self.use_weighting && self.loss_type.contains(&LossType::KtoPair) {
            return Err(ObjectiveError::WeightingKtoPair);
        }
        for (key, value, ok, expected) in self.range_checks() {
            if !ok {
                return Err(ObjectiveError::OutOfRange { key, expected, value });
            }
        }
        Ok(())
    }

    /// `(key, value, valid, expected)` for each numeric setting, in the order they are reported.
    /// A NaN fails each check, as it should.
    fn range_checks(&self) -> [(&'static str, f64, bool, &'static str); 13] {
        let bad_weight = self.loss_weights.iter().copied().find(|w| !(*w >= 0.0 && w.is_finite()));
        let finite = |key: &'static str, value: f64| (key, value, value.is_finite(), "finite");
        [
            ("beta", self.beta, !(self.beta.is_nan() || self.beta <= 0.0), "positive"),
            ("label_smoothing", self.label_smoothing, (0.0..0.5).contains(&self.label_smoothing), "in [0, 0.5)"),
            ("ld_alpha", self.ld_alpha.unwrap_or(0.0), self.ld_alpha.is_none_or(|a| (0.0..=1.0).contains(&a)), "in [0, 1]"),
            ("loss_weights", bad_weight.unwrap_or(0.0), bad_weight.is_none(), "finite and >= 0"),
            finite("beta", self.beta),
            ("rpo_alpha", self.rpo_alpha.unwrap_or(0.0), self.rpo_alpha.is_none_or(|a| a >= 0.0 && a.is_finite()), ">= 0"),
            ("cpo_alpha", self.cpo_alpha, self.cpo_alpha >= 0.0 && self.cpo_alpha.is_finite(), ">= 0"),
            finite("simpo_gamma", self.simpo_gamma),
            ("discopop_tau", self.discopop_tau, self.discopop_tau > 0.0 && self.discopop_tau.is_finite(), "> 0"),
            finite("f_alpha_divergence_coef", self.f_alpha_divergence_coef),
            finite("alphapo_alpha", self.alphapo_alpha),
            finite("desirable_weight", self.desirable_weight),
            finite("undesirable_weight", self.undesirable_weight),
        ]
    }

    /// True when no loss type needs reference log-probs.
    pub fn reference_free(&self) -> bool {
        self.loss_type.iter().all(|t| t.reference_free())
    }

    /// The MPO weight of the `i`-th loss type.
    pub(super) fn weight(&self, i: usize) -> f64 {
        self.loss_weights.get(i).copied().unwrap_or(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(config: ObjectiveConfig) -> String {
        config.validate().unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_key_and_what_it_expects() {
        let base = ObjectiveConfig::default;
        assert_eq!(base().validate(), Ok(()));
        assert_eq!(error(ObjectiveConfig { loss_type: vec![], ..base() }), "loss_type is empty");
        assert_eq!(
            error(ObjectiveConfig { loss_type: vec![LossType::Kto, LossType::Sigmoid], ..base() }),
            "loss_type [\"kto\", \"sigmoid\"]: kto and apo_zero_unpaired train on unpaired rows and cannot be combined with other types"
        );
        assert_eq!(
            error(ObjectiveConfig { undesirable_weight: -1.0, ..base() }),
            "desirable_weight and undesirable_weight must be >= 0, got 1 and -1"
        );
        assert_eq!(error(ObjectiveConfig { loss_weights: vec![1.0, 2.0], ..base() }), "loss_weights has 2 entries but loss_type has 1");
        assert_eq!(error(ObjectiveConfig { beta: f64::NAN, ..base() }), "beta must be positive, got NaN");
        assert_eq!(error(ObjectiveConfig { beta: f64::INFINITY, ..base() }), "beta must be finite, got inf");
        assert_eq!(error(ObjectiveConfig { label_smoothing: 0.5, ..base() }), "label_smoothing must be in [0, 0.5), got 0.5");
        assert_eq!(error(ObjectiveConfig { ld_alpha: Some(1.5), ..base() }), "ld_alpha must be in [0, 1], got 1.5");
        assert_eq!(error(ObjectiveConfig { loss_weights: vec![f64::INFINITY], ..base() }), "loss_weights must be finite and >= 0, got inf");
        assert_eq!(error(ObjectiveConfig { rpo_alpha: Some(-1.0), ..base() }), "rpo_alpha must be >= 0, got -1");
        assert_eq!(error(ObjectiveConfig { discopop_tau: 0.0, ..base() }), "discopop_tau must be > 0, got 0");
        assert_eq!(error(ObjectiveConfig { alphapo_alpha: f64::NAN, ..base() }), "alphapo_alpha must be finite, got NaN");
    }

    #[test]
    fn reference_free_types() {
        assert!(ObjectiveConfig { loss_type: vec![LossType::Simpo, LossType::Sft], ..Default::default() }.reference_free());
        assert!(!ObjectiveConfig::default().reference_free());
    }
}
