//! Objectives on unpaired `{prompt, completion, label}` rows (KTO's data).

use burn::tensor::activation::sigmoid;
use burn::tensor::{Tensor, TensorData, backend::Backend};

use super::{LossType, ObjectiveConfig};

/// KTO's outputs for a batch of unpaired rows.
pub struct KtoOutput<B: Backend> {
    /// Scalar `[1]`: the mean over rows of the weighted row losses.
    pub loss: Tensor<B, 1>,
    /// `β·(logp − ref_logp)` per row, detached.
    pub rewards: Tensor<B, 1>,
    /// The KL estimate used (0 for `apo_zero_unpaired`).
    pub kl: f64,
}

/// KTO's settings (TRL's `KTOConfig`).
struct Kto {
    beta: f64,
    /// False for unpaired APO-zero, which compares rewards with 0 instead of the KL estimate.
    uses_kl: bool,
    desirable_weight: f64,
    undesirable_weight: f64,
}

impl Kto {
    fn new(config: &ObjectiveConfig) -> Self {
        Self {
            beta: config.beta,
            uses_kl: config.loss_type.first() != Some(&LossType::ApoZeroUnpaired),
            desirable_weight: config.desirable_weight,
            undesirable_weight: config.undesirable_weight,
        }
    }
}

/// One value per row: `if_desirable` for desirable rows, `if_undesirable` for the others.
fn per_row<B: Backend>(desirable: &[bool], if_desirable: f32, if_undesirable: f32, device: &B::Device) -> Tensor<B, 1> {
    let values: Vec<f32> = desirable.iter().map(|&d| if d { if_desirable } else { if_undesirable }).collect();
    Tensor::from_data(TensorData::new(values, [desirable.len()]), device)
}

/// KTO (Ethayarajh et al. 2024, arXiv:2402.01306; `loss_type = ["kto"]`) or unpaired APO-zero
/// on rows with `desirable` flags. `kl` is the batch estimate mean(policy − reference log-probs of
/// mismatched prompt/completion pairs), which is clamped at 0 here and carries no gradient.
pub fn kto_loss<B: Backend>(
    config: &ObjectiveConfig,
    logps: Tensor<B, 1>,
    ref_logps: Tensor<B, 1>,
    desirable: &[bool],
    kl: f64,
) -> KtoOutput<B> {
    let kto = Kto::new(config);
    let device = logps.device();
    let kl = if kto.uses_kl { kl.max(0.0) } else { 0.0 };
    let signs = per_row::<B>(desirable, 1.0, -1.0, &device);
    let weights = per_row::<B>(desirable, kto.desirable_weight as f32, kto.undesirable_weight as f32, &device);
    let logratios = logps - ref_logps;
    // desirable rows: 1 − σ(β(r − z)); undesirable rows: 1 − σ(β(z − r))
    let margin = (logratios.clone().sub_scalar(kl) * signs).mul_scalar(kto.beta);
    let losses = sigmoid(margin).neg().add_scalar(1.0) * weights;
    KtoOutput { loss: losses.mean(), rewards: logratios.mul_scalar(kto.beta).detach(), kl }
}
