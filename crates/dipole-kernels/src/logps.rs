//! Log-probs of labels under logits over a vocabulary, `logit[label] − logsumexp(logits)` per
//! position, and the predictive entropy `logsumexp − Σ softmax · logit`, in one pass over the
//! logits; the gradient, `g · (onehot(label) − softmax)`, in one more. The tensor-op form takes a
//! max, a shift, an `exp`, a sum, a log and a gather forward and as many passes backward, each
//! over the whole `[rows, positions, vocab]` tensor.

use std::sync::Arc;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::{DType, Int, Tensor, TensorPrimitive, backend::Backend};

use crate::simd::{exp, lane_dot, lane_max_all, lane_sum};
use crate::{contiguous, dims, f32s, for_each_row, in_parallel, on_cpu, rows_per_task, tensor};

/// Per-position log-probs `[rows, len]` of `labels` `[rows, len]` under f32 `logits`
/// `[rows, len, vocab]`, and with `entropy` each position's predictive entropy `[rows, len]`
/// (without gradient).
#[allow(clippy::type_complexity)]
pub fn try_token_logps<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>, entropy: bool) -> Result<(Tensor<B, 2>, Option<Tensor<B, 2>>), (Tensor<B, 3>, Tensor<B, 2, Int>)> {
    let [rows, len, _] = logits.dims();
    assert_eq!(labels.dims(), [rows, len], "labels for logits {:?}", logits.dims());
    if logits.dtype() != DType::F32 {
        return Err((logits, labels));
    }
    on_cpu!((logits, labels), X => (Tensor<X, 3>, Tensor<X, 2, Int>),
        flex: |(logits, labels)| {
            let out = forward(&logits.into_primitive().tensor(), &label_indices(labels.into_primitive()), entropy);
            let float = |t: FlexTensor| Tensor::<X, 2>::from_primitive(TensorPrimitive::Float(t));
            (float(out.logps), out.entropy.map(float))
        },
        autodiff: |(logits, labels)| logps_autodiff(logits, labels, entropy),
    )
}

/// What the forward pass gives: log-probs, entropies, and each position's log-sum-exp for the
/// backward pass.
struct Forward {
    logps: FlexTensor,
    entropy: Option<FlexTensor>,
    lse: Vec<f32>,
}

/// Backward step: the state is the logits, the labels and each position's log-sum-exp.
#[derive(Debug)]
struct TokenLogpsBackward;

impl Backward<Flex, 1> for TokenLogpsBackward {
    type State = (FlexTensor, Arc<[usize]>, Arc<[f32]>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (logits, labels, lse) = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| backward(&logits, &labels, &lse, grad));
    }
}

/// Per-token log-probs `[batch, len]` and, when asked for, entropies.
type LogpsAndEntropy<B> = (Tensor<B, 2>, Option<Tensor<B, 2>>);

fn logps_autodiff<C: CheckpointStrategy>(logits: Tensor<Autodiff<Flex, C>, 3>, labels: Tensor<Autodiff<Flex, C>, 2, Int>, entropy: bool) -> LogpsAndEntropy<Autodiff<Flex, C>> {
    let labels = label_indices(labels.into_primitive());
    let logits = logits.into_primitive().tensor();
    let out = forward(&logits.primitive, &labels, entropy);
    let logps = match TokenLogpsBackward.prepare::<C>([logits.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((logits.primitive, labels.into(), out.lse.into()), out.logps),
        OpsKind::UnTracked(prep) => prep.finish(out.logps),
    };
    let entropy = out.entropy.map(|e| Tensor::from_inner(Tensor::from_primitive(TensorPrimitive::Float(e))));
    (Tensor::from_primitive(TensorPrimitive::Float(logps)), entropy)
}

/// Labels as indices, row-major.
fn label_indices(labels: FlexTensor) -> Vec<usize> {
    let values: Vec<i64> = labels.into_data().convert::<i64>().to_vec().expect("integer labels");
    values.into_iter().enumerate().map(|(p, v)| usize::try_from(v).unwrap_or_else(|_| panic!("label {v} at position {p} (row-major) is negative"))).collect()
}

fn check_label(label: usize, position: usize, vocab: usize) {
    assert!(label < vocab, "label {label} at position {position} (row-major) is outside the vocabulary of {vocab}");
}

fn forward(logits: &FlexTensor, labels: &[usize], with_entropy: bool) -> Forward {
    let logits = contiguous(logits.clone());
    let shape = dims(&logits);
    let [rows, len, vocab] = shape[..] else { unreachable!("3-d logits") };
    let x = f32s(&logits);
    let positions = rows * len;
    let (mut logps, mut entropy, mut lse) = (vec![0f32; positions], vec![0f32; if with_entropy { positions } else { 0 }], vec![0f32; positions]);
    let per_task = rows_per_task(vocab);
    let entropy_parts: Box<dyn Iterator<Item = Option<&mut [f32]>>> = if with_entropy { Box::new(entropy.chunks_mut(per_task).map(Some)) } else { Box::new(std::iter::repeat_with(|| None)) };
    let parts = logps.chunks_mut(per_task).zip(lse.chunks_mut(per_task)).zip(entropy_parts).enumerate();
    in_parallel(parts, |(task, ((logps, lse), mut entropy))| {
        let mut scratch = vec![0f32; vocab];
        for i in 0..logps.len() {
            let p = task * per_task + i;
            check_label(labels[p], p, vocab);
            let row = &x[p * vocab..(p + 1) * vocab];
            let stats = position_stats(row, &mut scratch, entropy.is_some());
            lse[i] = stats.0;
            logps[i] = row[labels[p]] - stats.0;
            if let Some(entropy) = entropy.as_deref_mut() {
                entropy[i] = stats.1;
            }
        }
    });
    Forward {
        logps: tensor(logps, vec![rows, len]),
        entropy: with_entropy.then(|| tensor(entropy, vec![rows, len])),
        lse,
    }
}

fn backward(logits: &FlexTensor, labels: &[usize], lse: &[f32], grad: FlexTensor) -> FlexTensor {
    let logits = contiguous(logits.clone());
    let grad = contiguous(grad);
    let shape = dims(&logits);
    let vocab = shape[2];
    let (x, g) = (f32s(&logits), f32s(&grad));
    assert_eq!(g.len() * vocab, x.len(), "log-prob gradient {:?} for logits {shape:?}", dims(&grad));
    let mut out = vec![0f32; x.len()];
    for_each_row(&mut out, vocab, |p, row| {
        position_gradient(&x[p * vocab..(p + 1) * vocab], lse[p], g[p], row);
        row[labels[p]] += g[p];
    });
    tensor(out, shape)
}

simd_dispatch! {
    pub(crate) fn exponentials = exponentials_kernel(row: &[f32], shift: f32, out: &mut [f32]);
    pub(crate) fn position_gradient = position_gradient_kernel(row: &[f32], lse: f32, grad: f32, out: &mut [f32]);
}

/// `(logsumexp, entropy)` of one position's logits (`entropy` 0 unless asked for); `scratch` holds
/// the shifted exponentials.
fn position_stats(row: &[f32], scratch: &mut [f32], with_entropy: bool) -> (f32, f32) {
    let max = lane_max_all(row);
    exponentials(row, max, scratch);
    let sum = lane_sum(scratch);
    let lse = sum.ln() + max;
    let entropy = if with_entropy { lse - lane_dot(scratch, row) / sum } else { 0.0 };
    (lse, entropy)
}

#[inline(always)]
fn exponentials_kernel<const FMA: bool>(row: &[f32], shift: f32, out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(row) {
        *o = exp::<FMA>(x - shift);
    }
}

/// `−g · softmax` (the label's `+g` is added by the caller).
#[inline(always)]
fn position_gradient_kernel<const FMA: bool>(row: &[f32], lse: f32, grad: f32, out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(row) {
        *o = -grad * exp::<FMA>(x - lse);
    }
}
