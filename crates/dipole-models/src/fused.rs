//! Attention's masked softmax and head layout, and SwiGLU's gated activation, as the model runs
//! them: on burn's CPU backend the fused kernels of `dipole_kernels` (one pass forward and one
//! backward each, a vectorized `exp`), elsewhere (and for non-f32 tensors) the tensor-op forms
//! below, which the tests check the kernels against. Inference and training run the same code, so
//! a frozen reference equal to the policy gives bit-identical log-probs.

use burn::tensor::activation::silu;
use burn::tensor::{Bool, Tensor, backend::Backend};
use dipole_kernels::{attention, swiglu};

use crate::rope::Rotary;

/// Softmax over the last axis of `scores` `[batch, heads, q, k]` (f32) with keys hidden where `mask`
/// `[batch, heads or 1, q, k]` is true; a row with every key hidden gives zeros (not 0/0).
pub fn masked_softmax<B: Backend>(scores: Tensor<B, 4>, mask: Tensor<B, 4, Bool>) -> Tensor<B, 4> {
    attention::try_masked_softmax(scores, mask).unwrap_or_else(|(scores, mask)| masked_softmax_ops(scores, mask))
}

/// `silu(gate) * up`, SwiGLU's gated activation.
pub fn silu_mul<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    swiglu::try_silu_mul(gate, up).unwrap_or_else(|(gate, up)| silu_mul_ops(gate, up))
}

/// Projection output `x` `[batch, len, heads * head_dim]` as heads `[batch, heads, len, head_dim]`,
/// each head rotated by `rotary` (RoPE) if given: what attention needs of a q, k or v projection.
/// The kernel writes the heads contiguously in one pass, where the tensor-op form copies the
/// transposed view element by element before rotating it (and its gradient back the same way).
pub fn split_heads<B: Backend>(x: Tensor<B, 3>, heads: usize, rotary: Option<&Rotary<B>>) -> Tensor<B, 4> {
    let tables = rotary.map(|r| (r.cos.clone(), r.signed_sin.clone()));
    attention::try_split_heads(x, heads, tables).unwrap_or_else(|(x, _)| split_heads_ops(x, heads, rotary))
}

/// Attention's output heads `[batch, heads, len, head_dim]` back as rows `[batch, len, heads * head_dim]`
/// for the output projection (the inverse of [`split_heads`] without rotation).
pub fn merge_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    attention::try_merge_heads(x).unwrap_or_else(merge_heads_ops)
}

/// [`split_heads`] as burn tensor ops, for every backend.
pub fn split_heads_ops<B: Backend>(x: Tensor<B, 3>, heads: usize, rotary: Option<&Rotary<B>>) -> Tensor<B, 4> {
    let [batch, len, width] = x.dims();
    let x = x.reshape([batch, len, heads, width / heads]).swap_dims(1, 2);
    match rotary {
        Some(rotary) => rotary.apply(x),
        None => x,
    }
}

/// [`merge_heads`] as burn tensor ops, for every backend.
pub fn merge_heads_ops<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [batch, heads, len, d] = x.dims();
    x.swap_dims(1, 2).reshape([batch, len, heads * d])
}

pub use dipole_kernels::attention::masked_softmax_ops;

/// [`silu_mul`] as burn tensor ops, for every backend.
pub fn silu_mul_ops<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    silu(gate) * up
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{DType, TensorData, Tolerance};

    type Ad = Autodiff<Flex>;
    type AdBalanced = Autodiff<Flex, BalancedCheckpointing>;

    /// Deterministic values spread over about ±`scale`.
    fn values<B: Backend, const D: usize>(shape: [usize; D], scale: f32, seed: f32) -> Tensor<B, D> {
        let n = shape.iter().product::<usize>();
        let v: Vec<f32> = (0..n).map(|i| scale * ((i as f32 * 0.731 + seed).sin() + 0.5 * (i as f32 * 0.137 + 2.0 * seed).cos())).collect();
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    /// Causal mask with a few extra hidden keys, per head (`heads` > 1) or shared, and a fully hidden
    /// row at query 0 of batch 1 (a padding query).
    fn mask<B: Backend>(batch: usize, heads: usize, q: usize, k: usize) -> Tensor<B, 4, Bool> {
        let mut hidden = Vec::new();
        for b in 0..batch {
            for h in 0..heads {
                for i in 0..q {
                    for j in 0..k {
                        hidden.push(j > i + (k - q) || (j + h) % 7 == 3 || (b == 1 && i == 0));
                    }
                }
            }
        }
        Tensor::from_data(TensorData::new(hidden, [batch, heads, q, k]), &Default::default())
    }

    fn assert_close<B: Backend, const D: usize>(actual: Tensor<B, D>, expected: Tensor<B, D>, what: &str) {
        let (actual, expected) = (actual.into_data(), expected.into_data());
        assert_eq!(actual.shape, expected.shape, "{what}: shape");
        actual.assert_approx_eq::<f32>(&expected, Tolerance::absolute(2e-6).set_relative(2e-6));
    }

    #[test]
    fn masked_softmax_matches_the_tensor_ops_with_per_head_and_shared_masks() {
        // 19 keys: rows are not a multiple of the vector width
        for mask_heads in [3, 1] {
            let scores = values::<Flex, 4>([2, 3, 11, 19], 6.0, 0.3);
            let fused = masked_softmax(scores.clone(), mask(2, mask_heads, 11, 19));
            assert_close(fused.clone(), masked_softmax_ops(scores, mask(2, mask_heads, 11, 19)), "probabilities");
            // the fully hidden row is zeros, not NaN
            let hidden_row = fused.clone().slice([1..2, 0..3, 0..1, 0..19]).into_data().to_vec::<f32>().unwrap();
            assert!(hidden_row.iter().all(|&p| p == 0.0), "{hidden_row:?}");
            let visible_rows = fused.sum_dim(3).slice([0..1, 0..3, 0..11, 0..1]).into_data().to_vec::<f32>().unwrap();
            assert!(visible_rows.iter().all(|&s| (s - 1.0).abs() < 1e-6), "{visible_rows:?}");
        }
    }

    #[test]
    fn a_row_of_nan_scores_stays_nan_as_in_the_tensor_ops() {
        let mut values = vec![0.5f32; 2 * 4];
        values[..4].fill(f32::NAN);
        let scores = Tensor::<Flex, 4>::from_data(TensorData::new(values, [1, 1, 2, 4]), &Default::default());
        let mask = Tensor::<Flex, 4, Bool>::from_data(TensorData::new(vec![false; 8], [1, 1, 2, 4]), &Default::default());
        let probs = masked_softmax(scores, mask).into_data().to_vec::<f32>().unwrap();
        assert!(probs[..4].iter().all(|p| p.is_nan()), "{probs:?}");
        assert_eq!(probs[4..], [0.25; 4]);
    }

    #[test]
    fn masked_softmax_reads_non_contiguous_scores() {
        let scores = values::<Flex, 4>([2, 3, 19, 11], 4.0, 1.1).swap_dims(2, 3);
        assert_close(masked_softmax(scores.clone(), mask(2, 3, 11, 19)), masked_softmax_ops(scores, mask(2, 3, 11, 19)), "probabilities");
    }

    fn softmax_gradient<B: burn::tensor::backend::AutodiffBackend>(fused: bool) -> (Tensor<B::InnerBackend, 4>, Tensor<B::InnerBackend, 4>) {
        let scores = values::<B, 4>([2, 3, 11, 19], 5.0, 0.7).require_grad();
        let weights = values::<B, 4>([2, 3, 11, 19], 1.0, 2.9);
        let mask = mask::<B>(2, 3, 11, 19);
        let probs = if fused { masked_softmax(scores.clone(), mask) } else { masked_softmax_ops(scores.clone(), mask) };
        let grads = (probs.clone() * weights).sum().backward();
        (probs.inner(), scores.grad(&grads).expect("scores' gradient"))
    }

    #[test]
    fn masked_softmax_gradient_matches_the_tensor_ops() {
        let (probs, grad) = softmax_gradient::<Ad>(true);
        let (expected_probs, expected_grad) = softmax_gradient::<Ad>(false);
        assert_close(probs.clone(), expected_probs, "probabilities");
        assert_close(grad.clone(), expected_grad, "gradient");
        // hidden keys get no gradient
        let hidden = mask::<Flex>(2, 3, 11, 19).into_data().to_vec::<bool>().unwrap();
        let grad = grad.into_data().to_vec::<f32>().unwrap();
        assert!(hidden.iter().zip(&grad).all(|(&h, &g)| !h || g == 0.0));
        // inference and training run the same kernel: bit-identical outputs
        let plain = masked_softmax(values::<Flex, 4>([2, 3, 11, 19], 5.0, 0.7), mask(2, 3, 11, 19));
        assert_eq!(plain.into_data(), probs.into_data());
        // and so does training with gradient checkpointing
        let (probs, grad_balanced) = softmax_gradient::<AdBalanced>(true);
        assert_eq!(grad_balanced.into_data().to_vec::<f32>().unwrap(), grad);
        assert_close(probs, softmax_gradient::<Ad>(false).0, "probabilities");
    }

    fn silu_mul_gradients<B: burn::tensor::backend::AutodiffBackend>(fused: bool) -> [Tensor<B::InnerBackend, 3>; 3] {
        // gates out to ±120: sigmoid saturates (e^-x overflows to infinity) without NaN
        let gate = values::<B, 3>([2, 7, 37], 80.0, 0.2).require_grad();
        let up = values::<B, 3>([2, 7, 37], 3.0, 1.3).require_grad();
        let weights = values::<B, 3>([2, 7, 37], 1.0, 0.4);
        let out = if fused { silu_mul(gate.clone(), up.clone()) } else { silu_mul_ops(gate.clone(), up.clone()) };
        let grads = (out.clone() * weights).sum().backward();
        [out.inner(), gate.grad(&grads).expect("gate's gradient"), up.grad(&grads).expect("up's gradient")]
    }

    #[test]
    fn silu_mul_and_its_gradients_match_the_tensor_ops() {
        let [out, d_gate, d_up] = silu_mul_gradients::<Ad>(true);
        let [expected_out, expected_d_gate, expected_d_up] = silu_mul_gradients::<Ad>(false);
        for t in [&out, &d_gate, &d_up] {
            assert!(t.clone().into_data().to_vec::<f32>().unwrap().iter().all(|v| v.is_finite()));
        }
        assert_close(out.clone(), expected_out, "silu(gate) * up");
        assert_close(d_gate.clone(), expected_d_gate, "gate gradient");
        assert_close(d_up, expected_d_up, "up gradient");
        let plain = silu_mul(values::<Flex, 3>([2, 7, 37], 80.0, 0.2), values::<Flex, 3>([2, 7, 37], 3.0, 1.3));
        assert_eq!(plain.into_data(), out.into_data());
        let [_, d_gate_balanced, _] = silu_mul_gradients::<AdBalanced>(true);
        assert_eq!(d_gate_balanced.into_data(), d_gate.into_data());
    }

    #[test]
    fn only_the_inputs_that_need_a_gradient_get_one() {
        let gate = values::<Ad, 2>([3, 40], 2.0, 0.5).require_grad();
        let up = values::<Ad, 2>([3, 40], 2.0, 0.9);
        let grads = silu_mul(gate.clone(), up.clone()).sum().backward();
        assert!(gate.grad(&grads).is_some());
        assert!(up.grad(&grads).is_none());
    }

    /// Rotary tables `[rows, len * d]` with values like cos/sin (the kernels do not care which).
    fn rotary<B: Backend>(rows: usize, len: usize, d: usize) -> Rotary<B> {
        Rotary { cos: values::<B, 2>([rows, len * d], 1.0, 0.9), signed_sin: values::<B, 2>([rows, len * d], 1.0, 1.7) }
    }

    fn heads_round_trip<B: burn::tensor::backend::AutodiffBackend>(fused: bool, table_rows: Option<usize>) -> [Tensor<B::InnerBackend, 3>; 2] {
        let (batch, len, heads, d) = (2, 5, 3, 8);
        let x = values::<B, 3>([batch, len, heads * d], 2.0, 0.1).require_grad();
        let rotary = table_rows.map(|rows| rotary::<B>(rows, len, d));
        let weights = values::<B, 4>([batch, heads, len, d], 1.0, 0.6);
        let split = if fused { split_heads(x.clone(), heads, rotary.as_ref()) } else { split_heads_ops(x.clone(), heads, rotary.as_ref()) };
        // something that mixes heads and positions before merging them back
        let mixed = split * weights.clone() + weights.swap_dims(2, 3).matmul(values::<B, 4>([batch, heads, len, len], 1.0, 0.2)).swap_dims(2, 3);
        let merged = if fused { merge_heads(mixed) } else { merge_heads_ops(mixed) };
        let grads = (merged.clone() * values::<B, 3>([batch, len, heads * d], 1.0, 3.3)).sum().backward();
        [merged.inner(), x.grad(&grads).expect("x's gradient")]
    }

    #[test]
    fn split_and_merge_heads_with_and_without_rope_match_the_tensor_ops() {
        // tables shared by the batch, one per batch row, none (values)
        for table_rows in [Some(1), Some(2), None] {
            let [out, grad] = heads_round_trip::<Ad>(true, table_rows);
            let [expected_out, expected_grad] = heads_round_trip::<Ad>(false, table_rows);
            // same products and sums as the tensor ops: equal to the bit
            assert_eq!(out.clone().into_data(), expected_out.into_data(), "{table_rows:?}: output");
            assert_close(grad.clone(), expected_grad, &format!("{table_rows:?}: gradient"));
            let [_, grad_balanced] = heads_round_trip::<AdBalanced>(true, table_rows);
            assert_eq!(grad_balanced.into_data(), grad.into_data(), "{table_rows:?}: checkpointed gradient");
        }
        let x = values::<Flex, 3>([2, 5, 24], 2.0, 0.1);
        let rotary = rotary::<Flex>(2, 5, 8);
        assert_eq!(split_heads(x.clone(), 3, Some(&rotary)).into_data(), split_heads_ops(x.clone(), 3, Some(&rotary)).into_data());
        let heads = values::<Flex, 4>([2, 3, 5, 8], 1.0, 0.4);
        assert_eq!(merge_heads(heads.clone()).into_data(), merge_heads_ops(heads).into_data());
    }

    #[test]
    #[should_panic(expected = "RoPE tables [3, 40] for a batch of 2 rows of 40")]
    fn rope_tables_for_another_batch_are_an_error() {
        split_heads(values::<Flex, 3>([2, 5, 24], 2.0, 0.1), 3, Some(&rotary::<Flex>(3, 5, 8)));
    }

    #[test]
    fn empty_inputs_give_empty_outputs() {
        let device = Default::default();
        let scores = Tensor::<Flex, 4>::zeros([1, 2, 3, 0], &device);
        let mask = Tensor::<Flex, 4, Bool>::from_data(TensorData::new(Vec::<bool>::new(), [1, 2, 3, 0]), &device);
        assert_eq!(masked_softmax(scores, mask).dims(), [1, 2, 3, 0]);
        let rows = Tensor::<Flex, 3>::zeros([2, 0, 24], &device);
        let heads = split_heads(rows, 3, None);
        assert_eq!(heads.dims(), [2, 3, 0, 8]);
        assert_eq!(merge_heads(heads).dims(), [2, 0, 24]);
    }

    #[test]
    fn other_dtypes_take_the_tensor_ops() {
        let gate = values::<Flex, 2>([3, 40], 2.0, 0.5).cast(DType::F16);
        let up = values::<Flex, 2>([3, 40], 2.0, 0.9).cast(DType::F16);
        let out = silu_mul(gate.clone(), up.clone());
        assert_eq!(out.dtype(), DType::F16);
        assert_eq!(out.into_data(), silu_mul_ops(gate, up).into_data());
    }
}
