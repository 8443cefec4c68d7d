//! Attention: the masked softmax of the scores, and the head layout of the projections (with
//! rotate-half RoPE) and of the output.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::{Bool, DType, Tensor, TensorPrimitive, backend::Backend};

use crate::simd::{exp, lane_dot, lane_max, lane_sum};
use crate::{contiguous, dims, f32s, for_each_row, on_cpu, tensor};

/// Softmax over the last axis of f32 `scores` `[batch, heads, q, k]` with keys hidden where `mask`
/// `[batch, heads or 1, q, k]` is true; a row with every key hidden gives zeros (not 0/0).
#[allow(clippy::type_complexity)]
pub fn try_masked_softmax<B: Backend>(scores: Tensor<B, 4>, mask: Tensor<B, 4, Bool>) -> Result<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 4, Bool>)> {
    let [b, h, q, k] = scores.dims();
    let [mb, mh, mq, mk] = mask.dims();
    assert!(mb == b && (mh == h || mh == 1) && mq == q && mk == k, "attention mask [{mb}, {mh}, {mq}, {mk}] for scores [{b}, {h}, {q}, {k}]");
    if scores.dtype() != DType::F32 {
        return Err((scores, mask));
    }
    on_cpu!((scores, mask), X => (Tensor<X, 4>, Tensor<X, 4, Bool>),
        flex: |(scores, mask)| Tensor::<X, 4>::from_primitive(TensorPrimitive::Float(softmax_forward(scores.into_primitive().tensor(), mask.into_primitive()))),
        autodiff: |(scores, mask)| softmax_autodiff(scores, mask),
    )
}

/// [`try_masked_softmax`] as burn tensor ops, for every backend.
pub fn masked_softmax_ops<B: Backend>(scores: Tensor<B, 4>, mask: Tensor<B, 4, Bool>) -> Tensor<B, 4> {
    let shape = scores.shape();
    let scores = scores.mask_fill(mask.expand(shape), f32::NEG_INFINITY);
    // The shift by the row's max only keeps exp in range and cancels out of the softmax, so it is
    // detached: no gradient is taken through it (it would be zero). The clamps make a fully hidden
    // row zeros instead of 0/0.
    let max = scores.clone().detach().max_dim(3).clamp_min(f32::MIN);
    let numerator = (scores - max).exp();
    let sum = numerator.clone().sum_dim(3).clamp_min(f32::MIN_POSITIVE);
    // times the reciprocal rather than divided: the gradient of a product by a per-row factor is two
    // passes over the scores where a quotient's is five
    numerator * sum.recip()
}

/// RoPE tables `(cos, signed_sin)`, each `[rows, len * head_dim]` (rows = 1: shared by the batch),
/// `signed_sin` with rotate-half's sign folded into its first half.
pub type RopeTables<B> = (Tensor<B, 2>, Tensor<B, 2>);

/// Projection output `x` `[batch, len, heads * head_dim]` as contiguous heads
/// `[batch, heads, len, head_dim]`, each head vector `v` rotated to
/// `v * cos + swap_halves(v) * signed_sin` if `tables` are given (rotate-half RoPE), in one pass.
/// What [`try_split_heads`] hands back when its kernel does not run: its inputs, untouched.
pub type SplitInputs<B> = (Tensor<B, 3>, Option<RopeTables<B>>);

pub fn try_split_heads<B: Backend>(x: Tensor<B, 3>, heads: usize, tables: Option<RopeTables<B>>) -> Result<Tensor<B, 4>, SplitInputs<B>> {
    let [_, _, width] = x.dims();
    assert!(heads > 0 && width % heads == 0, "{width} features do not split into {heads} heads");
    let f32_tables = tables.as_ref().is_none_or(|(c, s)| c.dtype() == DType::F32 && s.dtype() == DType::F32);
    if x.dtype() != DType::F32 || !f32_tables {
        return Err((x, tables));
    }
    on_cpu!((x, tables), X => (Tensor<X, 3>, Option<RopeTables<X>>),
        flex: |(x, tables)| {
            let tables = tables.map(|(c, s)| (c.into_primitive().tensor(), s.into_primitive().tensor()));
            Tensor::<X, 4>::from_primitive(TensorPrimitive::Float(rows_to_heads(x.into_primitive().tensor(), heads, tables.as_ref())))
        },
        autodiff: |(x, tables)| split_heads_autodiff(x, heads, tables),
    )
}

/// Heads `[batch, heads, len, head_dim]` back as rows `[batch, len, heads * head_dim]` (the inverse
/// of [`try_split_heads`] without rotation), in one pass.
pub fn try_merge_heads<B: Backend>(x: Tensor<B, 4>) -> Result<Tensor<B, 3>, Tensor<B, 4>> {
    if x.dtype() != DType::F32 {
        return Err(x);
    }
    on_cpu!(x, X => Tensor<X, 4>,
        flex: |x| Tensor::<X, 3>::from_primitive(TensorPrimitive::Float(heads_to_rows(x.into_primitive().tensor(), None))),
        autodiff: |x| merge_heads_autodiff(x),
    )
}

/// Backward step of [`try_masked_softmax`]: the state is the forward's output.
#[derive(Debug)]
struct MaskedSoftmaxBackward;

impl Backward<Flex, 1> for MaskedSoftmaxBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let probs = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| softmax_backward(probs, grad));
    }
}

fn softmax_autodiff<C: CheckpointStrategy>(scores: Tensor<Autodiff<Flex, C>, 4>, mask: Tensor<Autodiff<Flex, C>, 4, Bool>) -> Tensor<Autodiff<Flex, C>, 4> {
    let scores = scores.into_primitive().tensor();
    let probs = softmax_forward(scores.primitive.clone(), mask.into_primitive());
    let out = match MaskedSoftmaxBackward.prepare::<C>([scores.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(probs.clone(), probs),
        OpsKind::UnTracked(prep) => prep.finish(probs),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Backward step of [`try_split_heads`]: the state is the RoPE tables, if any.
#[derive(Debug)]
struct SplitHeadsBackward;

impl Backward<Flex, 1> for SplitHeadsBackward {
    type State = Option<(FlexTensor, FlexTensor)>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let tables = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| heads_to_rows(grad, tables.as_ref()));
    }
}

fn split_heads_autodiff<C: CheckpointStrategy>(x: Tensor<Autodiff<Flex, C>, 3>, heads: usize, tables: Option<RopeTables<Autodiff<Flex, C>>>) -> Tensor<Autodiff<Flex, C>, 4> {
    // the tables are constants: no gradient flows to them
    let tables = tables.map(|(c, s)| (c.into_primitive().tensor().primitive, s.into_primitive().tensor().primitive));
    let x = x.into_primitive().tensor();
    let out = rows_to_heads(x.primitive.clone(), heads, tables.as_ref());
    let out = match SplitHeadsBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(tables, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Backward step of [`try_merge_heads`]: the state is the head count.
#[derive(Debug)]
struct MergeHeadsBackward;

impl Backward<Flex, 1> for MergeHeadsBackward {
    type State = usize;

    fn backward(self, ops: Ops<usize, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let heads = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| rows_to_heads(grad, heads, None));
    }
}

fn merge_heads_autodiff<C: CheckpointStrategy>(x: Tensor<Autodiff<Flex, C>, 4>) -> Tensor<Autodiff<Flex, C>, 3> {
    let heads = x.dims()[1];
    let x = x.into_primitive().tensor();
    let out = heads_to_rows(x.primitive.clone(), None);
    let out = match MergeHeadsBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(heads, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

pub(crate) fn softmax_forward(scores: FlexTensor, mask: FlexTensor) -> FlexTensor {
    let (scores, mask) = (contiguous(scores), contiguous(mask));
    let shape = dims(&scores);
    let [_, h, q, k] = shape[..] else { unreachable!("4-d scores") };
    let mask_heads = dims(&mask)[1];
    let (start, end) = mask.layout().contiguous_offsets().expect("contiguous mask");
    let hidden = &mask.storage::<u8>()[start..end];
    let values = f32s(&scores);
    let mut out = vec![0f32; values.len()];
    for_each_row(&mut out, k, |r, row| {
        // row r is (batch, head, query) = (r / (h q), r / q % h, r % q); the mask row drops the head when shared
        let (b, head, query) = (r / (h * q), r / q % h, r % q);
        let m = ((b * mask_heads + if mask_heads == 1 { 0 } else { head }) * q + query) * k;
        softmax_row(&values[r * k..(r + 1) * k], &hidden[m..m + k], row);
    });
    tensor(out, shape)
}

pub(crate) fn softmax_backward(probs: FlexTensor, grad: FlexTensor) -> FlexTensor {
    let grad = contiguous(grad);
    let shape = dims(&probs);
    let k = *shape.last().expect("4-d probabilities");
    let (p, g) = (f32s(&probs), f32s(&grad));
    assert_eq!(p.len(), g.len(), "softmax gradient shape {:?} for output {shape:?}", dims(&grad));
    let mut out = vec![0f32; p.len()];
    for_each_row(&mut out, k, |r, row| softmax_backward_row(&p[r * k..(r + 1) * k], &g[r * k..(r + 1) * k], row));
    tensor(out, shape)
}

/// RoPE tables as f32 slices `[rows, len * head_dim]` (rows = 1: shared by the batch).
struct Tables<'a> {
    cos: &'a [f32],
    signed_sin: &'a [f32],
    rows: usize,
}

impl<'a> Tables<'a> {
    fn new(tables: &'a (FlexTensor, FlexTensor), batch: usize, per_row: usize) -> Self {
        let (cos, signed_sin) = (f32s(&tables.0), f32s(&tables.1));
        let rows = dims(&tables.0)[0];
        assert!(cos.len() == rows * per_row && signed_sin.len() == cos.len() && (rows == 1 || rows == batch), "RoPE tables {:?} for a batch of {batch} rows of {per_row}", dims(&tables.0));
        Self { cos, signed_sin, rows }
    }

    /// The tables of batch row `b` at position `t`, each `d` long.
    fn at(&self, b: usize, t: usize, d: usize) -> (&'a [f32], &'a [f32]) {
        let row = if self.rows == 1 { 0 } else { b };
        let start = row * self.cos.len() / self.rows + t * d;
        (&self.cos[start..start + d], &self.signed_sin[start..start + d])
    }
}

/// `[batch, len, heads * d]` -> `[batch, heads, len, d]`, each head vector `v` replaced by
/// `v * cos + swap_halves(v) * signed_sin` if `tables` are given (rotate-half RoPE).
fn rows_to_heads(x: FlexTensor, heads: usize, tables: Option<&(FlexTensor, FlexTensor)>) -> FlexTensor {
    let x = contiguous(x);
    let [batch, len, width] = dims(&x)[..] else { unreachable!("3-d rows") };
    let d = width / heads;
    let tables = tables.map(|t| Tables::new(t, batch, len * d));
    let src = f32s(&x);
    let mut out = vec![0f32; src.len()];
    // a row of the output is one (batch, head) block of `len` vectors
    for_each_row(&mut out, len * d, |bh, block| {
        let (b, h) = (bh / heads, bh % heads);
        for (t, dst) in block.chunks_mut(d).enumerate() {
            let v = &src[(b * len + t) * width + h * d..][..d];
            match &tables {
                Some(tables) => {
                    let (cos, sin) = tables.at(b, t, d);
                    rotate(v, cos, sin, dst);
                }
                None => dst.copy_from_slice(v),
            }
        }
    });
    tensor(out, vec![batch, heads, len, d])
}

/// `[batch, heads, len, d]` -> `[batch, len, heads * d]`; with `tables`, the transpose of
/// [`rows_to_heads`]'s rotation (its gradient): `g * cos + swap_halves(g * signed_sin)`.
fn heads_to_rows(x: FlexTensor, tables: Option<&(FlexTensor, FlexTensor)>) -> FlexTensor {
    let x = contiguous(x);
    let [batch, heads, len, d] = dims(&x)[..] else { unreachable!("4-d heads") };
    let width = heads * d;
    let tables = tables.map(|t| Tables::new(t, batch, len * d));
    let src = f32s(&x);
    let mut out = vec![0f32; src.len()];
    for_each_row(&mut out, width, |r, row| {
        let (b, t) = (r / len, r % len);
        for (h, dst) in row.chunks_mut(d).enumerate() {
            let g = &src[((b * heads + h) * len + t) * d..][..d];
            match &tables {
                Some(tables) => {
                    let (cos, sin) = tables.at(b, t, d);
                    rotate_transposed(g, cos, sin, dst);
                }
                None => dst.copy_from_slice(g),
            }
        }
    });
    tensor(out, vec![batch, len, width])
}

/// `out = v * cos + swap_halves(v) * signed_sin`, as the tensor-op form computes it (a product
/// each, then their sum: no fused multiply-add, so both forms agree to the bit).
fn rotate(v: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = v.len() / 2;
    let (v1, v2) = v.split_at(half);
    let (out1, out2) = out.split_at_mut(half);
    for i in 0..half {
        out1[i] = v1[i] * cos[i] + v2[i] * sin[i];
        out2[i] = v2[i] * cos[half + i] + v1[i] * sin[half + i];
    }
}

/// The transpose of [`rotate`]: `out = g * cos + swap_halves(g * signed_sin)`.
fn rotate_transposed(g: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = g.len() / 2;
    let (g1, g2) = g.split_at(half);
    let (out1, out2) = out.split_at_mut(half);
    for i in 0..half {
        out1[i] = g1[i] * cos[i] + g2[i] * sin[half + i];
        out2[i] = g2[i] * cos[half + i] + g1[i] * sin[i];
    }
}

simd_dispatch! {
    fn softmax_row = softmax_row_kernel(scores: &[f32], hidden: &[u8], out: &mut [f32]);
    fn softmax_backward_row = softmax_backward_row_kernel(probs: &[f32], grad: &[f32], out: &mut [f32]);
}

#[inline(always)]
fn softmax_row_kernel<const FMA: bool>(scores: &[f32], hidden: &[u8], out: &mut [f32]) {
    let max = lane_max(scores, hidden);
    if max == f32::NEG_INFINITY {
        // every key hidden (zeros), or every visible score NaN (NaN, as the tensor-op form gives:
        // a diverging run must not look like a masked row)
        let nan = scores.iter().zip(hidden).any(|(s, &h)| h == 0 && s.is_nan());
        out.fill(if nan { f32::NAN } else { 0.0 });
        return;
    }
    for ((o, &s), &h) in out.iter_mut().zip(scores).zip(hidden) {
        let e = exp::<FMA>(s - max);
        *o = if h == 0 { e } else { 0.0 };
    }
    // at least 1: the max's own term is exp(0)
    let inv = 1.0 / lane_sum(out);
    for o in out.iter_mut() {
        *o *= inv;
    }
}

#[inline(always)]
fn softmax_backward_row_kernel<const FMA: bool>(probs: &[f32], grad: &[f32], out: &mut [f32]) {
    let dot = lane_dot(probs, grad);
    for ((o, &p), &g) in out.iter_mut().zip(probs).zip(grad) {
        *o = p * (g - dot);
    }
}
