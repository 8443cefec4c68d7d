//! TRL's `loss_type` names.

use serde::{Deserialize, Serialize};
use strum::{EnumString, IntoStaticStr, VariantArray};

use super::ObjectiveError;

/// TRL's `loss_type` values; serde and strum spell them identically (snake_case).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, EnumString, IntoStaticStr, VariantArray)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
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
    /// undesirable 1 − σ(β(z − r)), r the log-ratio and z the batch KL estimate (see [`crate::kto_loss`]).
    Kto,
    /// APO-zero on unpaired rows (D'Oosterlinck et al. 2024, arXiv:2408.06266): KTO's form with z = 0.
    ApoZeroUnpaired,
}

impl LossType {
    /// Every loss type, in declaration order.
    pub const ALL: &'static [LossType] = <LossType as VariantArray>::VARIANTS;

    /// The `loss_type` name, as in TRL and the config files.
    pub fn name(self) -> &'static str {
        self.into()
    }

    /// Objectives that compare the policy with itself only (no reference log-probs needed).
    pub fn reference_free(self) -> bool {
        matches!(self, LossType::Sft | LossType::Simpo | LossType::Cpo | LossType::Orpo)
    }

    /// Objectives over unpaired `{prompt, completion, label}` rows (KTO's data).
    pub fn unpaired(self) -> bool {
        matches!(self, LossType::Kto | LossType::ApoZeroUnpaired)
    }

    pub fn parse(s: &str) -> Result<Self, ObjectiveError> {
        s.parse().map_err(|_| ObjectiveError::UnknownLossType(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::IntoDeserializer;
    use serde::de::value::{Error, StrDeserializer};

    /// The names are a stored format (configs, checkpoints, TRL's `loss_type`).
    const NAMES: [&str; 21] = [
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
        "apo_down", "discopop", "sft", "sigmoid_norm", "kto_pair", "simpo", "cpo", "orpo", "kto", "apo_zero_unpaired",
    ];

    #[test]
    fn names_round_trip_through_parse_and_serde() {
        let names: Vec<&str> = LossType::ALL.iter().map(|t| t.name()).collect();
        assert_eq!(names, NAMES);
        for &kind in LossType::ALL {
            assert_eq!(LossType::parse(kind.name()), Ok(kind));
            let de: StrDeserializer<'_, Error> = kind.name().into_deserializer();
            assert_eq!(LossType::deserialize(de), Ok(kind));
        }
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let err = LossType::parse("dpo").unwrap_err().to_string();
        assert_eq!(err, format!("unknown loss type \"dpo\"; expected one of {}", NAMES.join(", ")));
    }
}
