//! Attention that keeps no `[batch, heads, q, k]` probabilities for the backward pass: a custom
//! autodiff op whose state is its inputs (the queries, keys and values every layer has anyway) and
//! whose backward pass makes each chunk's scores and probabilities again from them. The forward and
//! backward passes walk (row, head) chunks of at most [`RecomputeOptions::tile_elements`] scores, so
//! beside the inputs only one chunk exists at a time. The matrix products are the backend's own (the
//! probabilities are made twice, in two passes, not in FlashAttention's tiles of keys), so the price
//! is one more `QKᵀ` and softmax per layer in the backward pass; the memory of every layer's
//! probabilities, which grows with T², is gone.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::Flex;
use burn::tensor::{Bool, DType, Tensor, TensorPrimitive, backend::Backend};

use crate::attention::{masked_softmax_ops, softmax_backward, softmax_forward};
use crate::{cast, fused_enabled};

/// How the op walks its scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecomputeOptions {
    /// The most scores made at once (rows × heads × queries × keys of one chunk).
    pub tile_elements: usize,
}

impl Default for RecomputeOptions {
    fn default() -> Self {
        RecomputeOptions { tile_elements: 1 << 23 }
    }
}

/// The op's tensors: queries (scaled by `1/sqrt(head_dim)`), keys, values `[batch, heads, len,
/// head_dim]` (keys and values already repeated per query head) and the mask `[batch, heads or 1,
/// q, k]`, true where a key is hidden.
pub type AttentionInputs<B> = (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4, Bool>);

/// `softmax(q kᵀ, hidden by mask) v` `[batch, heads, q, head_dim]`, scores and softmax in f32 and the
/// products in `q`'s dtype, as the materialised form does, with gradients for `q`, `k` and `v`. On
/// `Autodiff<Flex>` (either checkpointing strategy) and, with the crate's `cuda` / `wgpu` features,
/// those backends' autodiff; elsewhere (and without autodiff, where nothing is kept anyway) the
/// inputs come back for the materialised form.
pub fn try_recomputed_attention<B: Backend>(inputs: AttentionInputs<B>, options: RecomputeOptions) -> Result<Tensor<B, 4>, AttentionInputs<B>> {
    let (q, k, v, mask) = &inputs;
    let ([b, h, tq, d], [kb, kh, tk, kd], [mb, mh, mq, mk]) = (q.dims(), k.dims(), mask.dims());
    assert!(kb == b && kh == h && kd == d && v.dims() == k.dims(), "keys {:?} and values {:?} for queries {:?}", k.dims(), v.dims(), q.dims());
    assert!(mb == b && (mh == h || mh == 1) && mq == tq && mk == tk, "attention mask [{mb}, {mh}, {mq}, {mk}] for scores [{b}, {h}, {tq}, {tk}]");
    assert!(options.tile_elements > 0, "tile_elements must be positive");
    let args = crate::on_autodiff!(inputs, (I, C, A) => AttentionInputs<A>, |args| attention_autodiff::<I, C>(args, options));
    Err(args)
}

/// The chunks: whole rows at a time while every head of a row fits the tile, else one row's heads a
/// few at a time; each `(rows, heads)`.
fn chunks(batch: usize, heads: usize, scores_per_head: usize, tile_elements: usize) -> Vec<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    let heads_per_chunk = (tile_elements / scores_per_head.max(1)).max(1);
    if heads_per_chunk >= heads {
        let rows = (heads_per_chunk / heads).max(1);
        return (0..batch).step_by(rows).map(|r| (r..(r + rows).min(batch), 0..heads)).collect();
    }
    (0..batch).flat_map(|r| (0..heads).step_by(heads_per_chunk).map(move |h| (r..r + 1, h..(h + heads_per_chunk).min(heads)))).collect()
}

/// One chunk of a 4-d tensor; a mask with one head keeps it.
fn part<I: Backend, K: burn::tensor::BasicOps<I>>(x: &Tensor<I, 4, K>, rows: &std::ops::Range<usize>, heads: &std::ops::Range<usize>) -> Tensor<I, 4, K> {
    let [_, h, a, b] = x.dims();
    let heads = if h == 1 { 0..1 } else { heads.clone() };
    x.clone().slice([rows.clone(), heads, 0..a, 0..b])
}

fn f32<I: Backend>(x: Tensor<I, 4>) -> Tensor<I, 4> {
    if x.dtype() == DType::F32 { x } else { x.cast(DType::F32) }
}

fn like<I: Backend>(x: Tensor<I, 4>, dtype: DType) -> Tensor<I, 4> {
    if x.dtype() == dtype { x } else { x.cast(dtype) }
}

/// The probabilities of one chunk, f32.
fn probabilities<I: Backend>(q: Tensor<I, 4>, k: Tensor<I, 4>, mask: Tensor<I, 4, Bool>) -> Tensor<I, 4> {
    let scores = f32(q.matmul(k.swap_dims(2, 3)));
    if fused_enabled()
        && let Ok((scores, mask)) = cast::<_, (Tensor<Flex, 4>, Tensor<Flex, 4, Bool>)>((scores.clone(), mask.clone()))
    {
        let probs = softmax_forward(scores.into_primitive().tensor(), mask.into_primitive());
        return crate::back(Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(probs)));
    }
    masked_softmax_ops(scores, mask)
}

/// `d scores` of a softmax from its output `probs` and `d probs`: `p ∘ (dp − Σ p ∘ dp)`.
fn softmax_gradient<I: Backend>(probs: Tensor<I, 4>, grad: Tensor<I, 4>) -> Tensor<I, 4> {
    if fused_enabled()
        && let Ok((probs, grad)) = cast::<_, (Tensor<Flex, 4>, Tensor<Flex, 4>)>((probs.clone(), grad.clone()))
    {
        let d = softmax_backward(probs.into_primitive().tensor(), grad.into_primitive().tensor());
        return crate::back(Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(d)));
    }
    let dot = (probs.clone() * grad.clone()).sum_dim(3);
    (grad - dot) * probs
}

fn forward<I: Backend>(inputs: &AttentionInputs<I>, options: RecomputeOptions) -> Tensor<I, 4> {
    let (q, k, v, mask) = inputs;
    let ([b, h, tq, _], tk) = (q.dims(), k.dims()[2]);
    let mut rows_out = Vec::new();
    let mut heads_out = Vec::new();
    for (rows, heads) in chunks(b, h, tq * tk, options.tile_elements) {
        let probs = probabilities(part(q, &rows, &heads), part(k, &rows, &heads), part(mask, &rows, &heads));
        let out = like(probs, q.dtype()).matmul(part(v, &rows, &heads));
        heads_out.push(out);
        if heads.end == h {
            rows_out.push(Tensor::cat(std::mem::take(&mut heads_out), 1));
        }
    }
    Tensor::cat(rows_out, 0)
}

/// `(dq, dk, dv)` for the output's gradient `grad`.
fn backward<I: Backend>(inputs: &AttentionInputs<I>, grad: Tensor<I, 4>, options: RecomputeOptions) -> [Tensor<I, 4>; 3] {
    let (q, k, v, mask) = inputs;
    let ([b, h, tq, _], tk, dtype) = (q.dims(), k.dims()[2], q.dtype());
    let grad = like(grad, dtype);
    let mut rows_out: [Vec<Tensor<I, 4>>; 3] = Default::default();
    let mut heads_out: [Vec<Tensor<I, 4>>; 3] = Default::default();
    for (rows, heads) in chunks(b, h, tq * tk, options.tile_elements) {
        let (qc, kc, vc, dout) = (part(q, &rows, &heads), part(k, &rows, &heads), part(v, &rows, &heads), part(&grad, &rows, &heads));
        let probs = probabilities(qc.clone(), kc.clone(), part(mask, &rows, &heads));
        let dv = like(probs.clone(), dtype).swap_dims(2, 3).matmul(dout.clone());
        let dprobs = f32(dout.matmul(vc.swap_dims(2, 3)));
        let dscores = like(softmax_gradient(probs, dprobs), dtype);
        let dq = dscores.clone().matmul(kc);
        let dk = dscores.swap_dims(2, 3).matmul(qc);
        for (acc, d) in heads_out.iter_mut().zip([dq, dk, dv]) {
            acc.push(d);
        }
        if heads.end == h {
            for (rows_acc, heads_acc) in rows_out.iter_mut().zip(heads_out.iter_mut()) {
                rows_acc.push(Tensor::cat(std::mem::take(heads_acc), 1));
            }
        }
    }
    rows_out.map(|parts| Tensor::cat(parts, 0))
}

#[derive(Debug)]
struct AttentionBackward;

#[derive(Clone, Debug)]
struct AttentionState<I: Backend> {
    inputs: AttentionInputs<I>,
    options: RecomputeOptions,
}

impl<I: Backend> Backward<I, 3> for AttentionBackward {
    type State = AttentionState<I>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = Tensor::<I, 4>::from_primitive(TensorPrimitive::Float(grads.consume::<I>(&ops.node)));
        let AttentionState { inputs, options } = ops.state;
        let parts = backward(&inputs, grad, options);
        for (node, d) in ops.parents.into_iter().zip(parts) {
            if let Some(node) = node {
                grads.register::<I>(node.id, d.into_primitive().tensor());
            }
        }
    }
}

fn attention_autodiff<I: Backend, C: CheckpointStrategy>(inputs: AttentionInputs<Autodiff<I, C>>, options: RecomputeOptions) -> Tensor<Autodiff<I, C>, 4> {
    let (q, k, v, mask) = inputs;
    let (q, k, v) = (q.into_primitive().tensor(), k.into_primitive().tensor(), v.into_primitive().tensor());
    let float = |t: &I::FloatTensorPrimitive| Tensor::<I, 4>::from_primitive(TensorPrimitive::Float(t.clone()));
    let inner: AttentionInputs<I> = (float(&q.primitive), float(&k.primitive), float(&v.primitive), mask.inner());
    let out = forward(&inner, options).into_primitive().tensor();
    let out = match AttentionBackward.prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(AttentionState { inputs: inner, options }, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}
