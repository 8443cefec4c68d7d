//! Tensor helpers the objectives share.

use burn::tensor::activation::log_sigmoid;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData, backend::Backend};

/// Label-smoothed logistic loss −(1−ε)·log σ(βx) − ε·log σ(−βx): DPO's −log σ(βx) when the
/// preference labels are flipped with probability ε.
pub(super) fn smoothed_sigmoid_loss<B: Backend>(x: Tensor<B, 1>, beta: f64, label_smoothing: f64) -> Tensor<B, 1> {
    log_sigmoid(x.clone().mul_scalar(beta)).neg().mul_scalar(1.0 - label_smoothing) - log_sigmoid(x.mul_scalar(-beta)).mul_scalar(label_smoothing)
}

/// `total / lengths`, the per-token mean of a sum over tokens; an empty completion counts as one
/// token so that it gives 0 rather than NaN.
pub(crate) fn length_normalised<B: Backend, const D: usize>(total: Tensor<B, D>, lengths: Tensor<B, D>) -> Tensor<B, D> {
    total / lengths.clamp_min(1.0)
}

/// softplus(x) = log(1 + eˣ) = -log σ(-x), via the stable log-sigmoid.
pub(super) fn softplus<B: Backend>(x: Tensor<B, 1>) -> Tensor<B, 1> {
    log_sigmoid(x.neg()).neg()
}

/// `exp` with the argument capped below f32 overflow (TRL's `cap_exp`).
pub(super) fn cap_exp<B: Backend>(x: Tensor<B, 1>) -> Tensor<B, 1> {
    x.clamp_max(f32::MAX.ln() as f64).exp()
}

/// Sorts a small host vector and rebuilds the tensor; gradient flows through `select`.
pub(super) fn sort_1d<B: Backend>(x: Tensor<B, 1>) -> Tensor<B, 1> {
    let values: Vec<f32> = x.clone().detach().into_data().convert::<f32>().to_vec().expect("f32");
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let idx: Vec<i64> = order.iter().map(|&i| i as i64).collect();
    let device = x.device();
    let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [values.len()]), &device);
    x.select(0, idx)
}

/// The value of a one-element tensor, for metrics.
pub(super) fn host_scalar<B: Backend>(x: Tensor<B, 1>) -> f64 {
    x.detach().into_scalar().elem::<f64>()
}

/// The mean of a tensor, for metrics.
pub(super) fn host_mean<B: Backend>(x: Tensor<B, 1>) -> f64 {
    x.detach().mean().into_scalar().elem::<f64>()
}
