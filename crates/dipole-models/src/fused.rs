//! Fused CPU kernels for the two elementwise chains of a decoder layer: attention's masked softmax
//! and the SwiGLU MLP's `silu(gate) * up`. As burn tensor ops each is six to eight passes over the
//! tensor forward and as many backward, each pass allocating its output and calling libm's scalar
//! `expf`; on burn's CPU backend (`Flex`, with or without autodiff) each runs here as one pass
//! forward and one backward with a vectorized `exp`, and keeps fewer tensors for the backward pass.
//! Other backends and non-f32 tensors take the tensor-op form ([`masked_softmax_ops`],
//! [`silu_mul_ops`]), which the tests also check the kernels against. Inference and training run
//! the same kernel, so a frozen reference equal to the policy gives bit-identical log-probs.

use std::any::Any;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::activation::silu;
use burn::tensor::{Bool, DType, Tensor, TensorData, TensorPrimitive, backend::Backend};

use crate::rope::Rotary;

/// Softmax over the last axis of `scores` `[batch, heads, q, k]` (f32) with keys hidden where `mask`
/// `[batch, heads or 1, q, k]` is true; a row with every key hidden gives zeros (not 0/0).
pub fn masked_softmax<B: Backend>(scores: Tensor<B, 4>, mask: Tensor<B, 4, Bool>) -> Tensor<B, 4> {
    let [b, h, q, k] = scores.dims();
    let [mb, mh, mq, mk] = mask.dims();
    assert!(mb == b && (mh == h || mh == 1) && mq == q && mk == k, "attention mask [{mb}, {mh}, {mq}, {mk}] for scores [{b}, {h}, {q}, {k}]");
    if scores.dtype() != DType::F32 {
        return masked_softmax_ops(scores, mask);
    }
    let args = match cast::<_, (Tensor<Flex, 4>, Tensor<Flex, 4, Bool>)>((scores, mask)) {
        Ok((scores, mask)) => return back(Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(softmax_forward(scores.into_primitive().tensor(), mask.into_primitive(), h)))),
        Err(args) => args,
    };
    let args = match cast::<_, (Tensor<Autodiff<Flex>, 4>, Tensor<Autodiff<Flex>, 4, Bool>)>(args) {
        Ok((scores, mask)) => return back(softmax_autodiff(scores, mask)),
        Err(args) => args,
    };
    match cast::<_, (Tensor<Autodiff<Flex, BalancedCheckpointing>, 4>, Tensor<Autodiff<Flex, BalancedCheckpointing>, 4, Bool>)>(args) {
        Ok((scores, mask)) => back(softmax_autodiff(scores, mask)),
        Err((scores, mask)) => masked_softmax_ops(scores, mask),
    }
}

/// `silu(gate) * up`, SwiGLU's gated activation.
pub fn silu_mul<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    assert_eq!(gate.dims(), up.dims(), "SwiGLU gate and up projections differ in shape");
    if gate.dtype() != DType::F32 || up.dtype() != DType::F32 {
        return silu_mul_ops(gate, up);
    }
    let args = match cast::<_, (Tensor<Flex, D>, Tensor<Flex, D>)>((gate, up)) {
        Ok((gate, up)) => return back(Tensor::<Flex, D>::from_primitive(TensorPrimitive::Float(silu_mul_forward(gate.into_primitive().tensor(), up.into_primitive().tensor())))),
        Err(args) => args,
    };
    let args = match cast::<_, (Tensor<Autodiff<Flex>, D>, Tensor<Autodiff<Flex>, D>)>(args) {
        Ok((gate, up)) => return back(silu_mul_autodiff(gate, up)),
        Err(args) => args,
    };
    match cast::<_, (Tensor<Autodiff<Flex, BalancedCheckpointing>, D>, Tensor<Autodiff<Flex, BalancedCheckpointing>, D>)>(args) {
        Ok((gate, up)) => back(silu_mul_autodiff(gate, up)),
        Err((gate, up)) => silu_mul_ops(gate, up),
    }
}

/// Projection output `x` `[batch, len, heads * head_dim]` as heads `[batch, heads, len, head_dim]`,
/// each head rotated by `rotary` (RoPE) if given: what attention needs of a q, k or v projection.
/// On the CPU backend one pass writes the heads contiguously, where the tensor-op form copies the
/// transposed view element by element before rotating it (and its gradient back the same way).
pub fn split_heads<B: Backend>(x: Tensor<B, 3>, heads: usize, rotary: Option<&Rotary<B>>) -> Tensor<B, 4> {
    let [_, _, width] = x.dims();
    assert!(heads > 0 && width % heads == 0, "{width} features do not split into {heads} heads");
    let tables_f32 = rotary.is_none_or(|r| r.cos.dtype() == DType::F32 && r.signed_sin.dtype() == DType::F32);
    if x.dtype() != DType::F32 || !tables_f32 {
        return split_heads_ops(x, heads, rotary);
    }
    let tables = |r: &Rotary<B>| (r.cos.clone(), r.signed_sin.clone());
    let args = match cast::<_, (Tensor<Flex, 3>, Option<(Tensor<Flex, 2>, Tensor<Flex, 2>)>)>((x, rotary.map(tables))) {
        Ok((x, tables)) => {
            let tables = tables.map(|(c, s)| (c.into_primitive().tensor(), s.into_primitive().tensor()));
            return back(Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(rows_to_heads(x.into_primitive().tensor(), heads, tables.as_ref()))));
        }
        Err(args) => args,
    };
    let args = match cast::<_, (Tensor<Autodiff<Flex>, 3>, Option<(Tensor<Autodiff<Flex>, 2>, Tensor<Autodiff<Flex>, 2>)>)>(args) {
        Ok((x, tables)) => return back(split_heads_autodiff(x, heads, tables)),
        Err(args) => args,
    };
    type Balanced = Autodiff<Flex, BalancedCheckpointing>;
    match cast::<_, (Tensor<Balanced, 3>, Option<(Tensor<Balanced, 2>, Tensor<Balanced, 2>)>)>(args) {
        Ok((x, tables)) => back(split_heads_autodiff(x, heads, tables)),
        Err((x, _)) => split_heads_ops(x, heads, rotary),
    }
}

/// Attention's output heads `[batch, heads, len, head_dim]` back as rows `[batch, len, heads * head_dim]`
/// for the output projection (the inverse of [`split_heads`] without rotation).
pub fn merge_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    if x.dtype() != DType::F32 {
        return merge_heads_ops(x);
    }
    let x = match cast::<_, Tensor<Flex, 4>>(x) {
        Ok(x) => return back(Tensor::<Flex, 3>::from_primitive(TensorPrimitive::Float(heads_to_rows(x.into_primitive().tensor(), None)))),
        Err(x) => x,
    };
    let x = match cast::<_, Tensor<Autodiff<Flex>, 4>>(x) {
        Ok(x) => return back(merge_heads_autodiff(x)),
        Err(x) => x,
    };
    match cast::<_, Tensor<Autodiff<Flex, BalancedCheckpointing>, 4>>(x) {
        Ok(x) => back(merge_heads_autodiff(x)),
        Err(x) => merge_heads_ops(x),
    }
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

/// [`masked_softmax`] as burn tensor ops, for every backend.
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

/// [`silu_mul`] as burn tensor ops, for every backend.
pub fn silu_mul_ops<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    silu(gate) * up
}

/// `value` as a `U` if it is one (the kernels' backends are concrete types, the model's generic).
fn cast<T: 'static, U: 'static>(value: T) -> Result<U, T> {
    let boxed: Box<dyn Any> = Box::new(value);
    match boxed.downcast::<U>() {
        Ok(u) => Ok(*u),
        Err(boxed) => Err(*boxed.downcast::<T>().expect("the value's own type")),
    }
}

/// A kernel's result back as the caller's type (which [`cast`] found it to be).
fn back<T: 'static, U: 'static>(value: T) -> U {
    cast(value).unwrap_or_else(|_| unreachable!("the kernel returns the type it was given"))
}

/// Backward step of [`masked_softmax`]: the state is the forward's output.
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
    let heads = scores.dims()[1];
    let scores = scores.into_primitive().tensor();
    let probs = softmax_forward(scores.primitive.clone(), mask.into_primitive(), heads);
    let out = match MaskedSoftmaxBackward.prepare::<C>([scores.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(probs.clone(), probs),
        OpsKind::UnTracked(prep) => prep.finish(probs),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Backward step of [`silu_mul`]: the state is the forward's inputs (gate, up).
#[derive(Debug)]
struct SiluMulBackward;

impl Backward<Flex, 2> for SiluMulBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let [gate_node, up_node] = ops.parents;
        if gate_node.is_none() && up_node.is_none() {
            return;
        }
        let (gate, up) = ops.state;
        let (d_gate, d_up) = silu_mul_backward(gate, up, grad);
        if let Some(node) = gate_node {
            grads.register::<Flex>(node.id, d_gate);
        }
        if let Some(node) = up_node {
            grads.register::<Flex>(node.id, d_up);
        }
    }
}

fn silu_mul_autodiff<C: CheckpointStrategy, const D: usize>(gate: Tensor<Autodiff<Flex, C>, D>, up: Tensor<Autodiff<Flex, C>, D>) -> Tensor<Autodiff<Flex, C>, D> {
    let (gate, up) = (gate.into_primitive().tensor(), up.into_primitive().tensor());
    let out = silu_mul_forward(gate.primitive.clone(), up.primitive.clone());
    let out = match SiluMulBackward.prepare::<C>([gate.node.clone(), up.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((gate.primitive, up.primitive), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Backward step of [`split_heads`]: the state is the head count and the RoPE tables.
#[derive(Debug)]
struct SplitHeadsBackward;

impl Backward<Flex, 1> for SplitHeadsBackward {
    type State = Option<(FlexTensor, FlexTensor)>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let tables = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| heads_to_rows(grad, tables.as_ref()));
    }
}

fn split_heads_autodiff<C: CheckpointStrategy>(x: Tensor<Autodiff<Flex, C>, 3>, heads: usize, tables: Option<(Tensor<Autodiff<Flex, C>, 2>, Tensor<Autodiff<Flex, C>, 2>)>) -> Tensor<Autodiff<Flex, C>, 4> {
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

/// Backward step of [`merge_heads`]: the state is the head count.
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

// The Flex kernels: contiguous f32 slices in, a new tensor out, split over the current rayon pool.

fn dims(t: &FlexTensor) -> Vec<usize> {
    t.layout().shape().as_slice().to_vec()
}

fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.is_contiguous() { t } else { t.to_contiguous() }
}

fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a contiguous f32 tensor")
}

fn tensor(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// Elements per parallel task: enough that a task's work outweighs handing it to a thread.
const TASK_ELEMENTS: usize = 1 << 15;

/// Runs `f` on each of `parts` (chunks of the outputs), in parallel on the current rayon pool.
fn in_parallel<T: Send>(parts: impl Iterator<Item = T>, f: impl Fn(T) + Sync) {
    if rayon_core::current_num_threads() == 1 {
        parts.for_each(f);
        return;
    }
    let (f, parts): (_, Vec<T>) = (&f, parts.collect());
    rayon_core::scope(|scope| {
        for part in parts {
            scope.spawn(move |_| f(part));
        }
    });
}

/// Rows per parallel task for rows `len` long.
fn rows_per_task(len: usize) -> usize {
    (TASK_ELEMENTS / len.max(1)).max(1)
}

fn softmax_forward(scores: FlexTensor, mask: FlexTensor, heads: usize) -> FlexTensor {
    let (scores, mask) = (contiguous(scores), contiguous(mask));
    let shape = dims(&scores);
    let [_, h, q, k] = shape[..] else { unreachable!("4-d scores") };
    let mask_heads = dims(&mask)[1];
    debug_assert_eq!(h, heads);
    let (start, end) = mask.layout().contiguous_offsets().expect("contiguous mask");
    let hidden = &mask.storage::<u8>()[start..end];
    let values = f32s(&scores);
    let mut out = vec![0f32; values.len()];
    let per_task = rows_per_task(k);
    in_parallel(out.chunks_mut(per_task * k).enumerate(), |(task, chunk)| {
        for (i, row) in chunk.chunks_mut(k).enumerate() {
            let r = task * per_task + i;
            // row r is (batch, head, query) = (r / (h q), r / q % h, r % q); the mask row drops the head when shared
            let (b, head, query) = (r / (h * q), r / q % h, r % q);
            let m = ((b * mask_heads + if mask_heads == 1 { 0 } else { head }) * q + query) * k;
            softmax_row(&values[r * k..(r + 1) * k], &hidden[m..m + k], row);
        }
    });
    tensor(out, shape)
}

fn softmax_backward(probs: FlexTensor, grad: FlexTensor) -> FlexTensor {
    let grad = contiguous(grad);
    let shape = dims(&probs);
    let k = *shape.last().expect("4-d probabilities");
    let (p, g) = (f32s(&probs), f32s(&grad));
    assert_eq!(p.len(), g.len(), "softmax gradient shape {:?} for output {shape:?}", dims(&grad));
    let mut out = vec![0f32; p.len()];
    let per_task = rows_per_task(k) * k;
    in_parallel(out.chunks_mut(per_task).enumerate(), |(task, chunk)| {
        let offset = task * per_task;
        for (i, row) in chunk.chunks_mut(k).enumerate() {
            let at = offset + i * k;
            softmax_backward_row(&p[at..at + k], &g[at..at + k], row);
        }
    });
    tensor(out, shape)
}

fn silu_mul_forward(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
    let (gate, up) = (contiguous(gate), contiguous(up));
    let shape = dims(&gate);
    let (g, u) = (f32s(&gate), f32s(&up));
    let mut out = vec![0f32; g.len()];
    in_parallel(out.chunks_mut(TASK_ELEMENTS).enumerate(), |(task, chunk)| {
        let at = task * TASK_ELEMENTS;
        silu_mul_chunk(&g[at..at + chunk.len()], &u[at..at + chunk.len()], chunk);
    });
    tensor(out, shape)
}

fn silu_mul_backward(gate: FlexTensor, up: FlexTensor, grad: FlexTensor) -> (FlexTensor, FlexTensor) {
    let grad = contiguous(grad);
    let shape = dims(&gate);
    let (g, u, dy) = (f32s(&gate), f32s(&up), f32s(&grad));
    assert_eq!(g.len(), dy.len(), "SwiGLU gradient shape {:?} for output {shape:?}", dims(&grad));
    let (mut d_gate, mut d_up) = (vec![0f32; g.len()], vec![0f32; g.len()]);
    let parts = d_gate.chunks_mut(TASK_ELEMENTS).zip(d_up.chunks_mut(TASK_ELEMENTS)).enumerate();
    in_parallel(parts, |(task, (d_gate, d_up))| {
        let (at, n) = (task * TASK_ELEMENTS, d_gate.len());
        silu_mul_backward_chunk(&g[at..at + n], &u[at..at + n], &dy[at..at + n], d_gate, d_up);
    });
    (tensor(d_gate, shape.clone()), tensor(d_up, shape))
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
/// `v * cos + swap_halves(v) * signed_sin` if `tables` are given (rotate-half RoPE; see [`Rotary`]).
fn rows_to_heads(x: FlexTensor, heads: usize, tables: Option<&(FlexTensor, FlexTensor)>) -> FlexTensor {
    let x = contiguous(x);
    let [batch, len, width] = dims(&x)[..] else { unreachable!("3-d rows") };
    let d = width / heads;
    let tables = tables.map(|t| Tables::new(t, batch, len * d));
    let src = f32s(&x);
    let mut out = vec![0f32; src.len()];
    in_parallel(out.chunks_mut(len * d).enumerate(), |(bh, block)| {
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
    let per_task = rows_per_task(width);
    in_parallel(out.chunks_mut(per_task * width).enumerate(), |(task, chunk)| {
        for (i, row) in chunk.chunks_mut(width).enumerate() {
            let r = task * per_task + i;
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

/// Defines `$name(args)`, which runs `$kernel::<FMA>(args)` compiled for AVX2 and FMA where the
/// CPU has them (x86-64 builds target the baseline without them), and for the build's target
/// otherwise (with FMA on aarch64, where it always exists).
macro_rules! simd_dispatch {
    ($(fn $name:ident = $kernel:ident($($arg:ident: $ty:ty),* $(,)?);)*) => {$(
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn wide($($arg: $ty),*) {
                    $kernel::<true>($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `wide` is compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            $kernel::<{ cfg!(target_arch = "aarch64") }>($($arg),*)
        }
    )*};
}

simd_dispatch! {
    fn softmax_row = softmax_row_kernel(scores: &[f32], hidden: &[u8], out: &mut [f32]);
    fn softmax_backward_row = softmax_backward_row_kernel(probs: &[f32], grad: &[f32], out: &mut [f32]);
    fn silu_mul_chunk = silu_mul_kernel(gate: &[f32], up: &[f32], out: &mut [f32]);
    fn silu_mul_backward_chunk = silu_mul_backward_kernel(gate: &[f32], up: &[f32], grad: &[f32], d_gate: &mut [f32], d_up: &mut [f32]);
}

/// Partial sums kept apart so that reductions vectorize (float addition is not associative, so the
/// compiler will not reorder a plain sum); the order is fixed, so results are deterministic.
const LANES: usize = 8;

#[inline(always)]
fn lane_max(values: &[f32], hidden: &[u8]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let (chunks, rest) = (values.chunks_exact(LANES), values.len() / LANES * LANES);
    for (v, h) in chunks.zip(hidden.chunks_exact(LANES)) {
        for l in 0..LANES {
            let x = if h[l] == 0 { v[l] } else { f32::NEG_INFINITY };
            lanes[l] = if x > lanes[l] { x } else { lanes[l] };
        }
    }
    for (l, (&x, &h)) in values[rest..].iter().zip(&hidden[rest..]).enumerate() {
        if h == 0 && x > lanes[l] {
            lanes[l] = x;
        }
    }
    lanes.into_iter().fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a })
}

#[inline(always)]
fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let rest = a.len() / LANES * LANES;
    for (x, y) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for l in 0..LANES {
            lanes[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in a[rest..].iter().zip(&b[rest..]).enumerate() {
        lanes[l] += x * y;
    }
    lanes.into_iter().sum()
}

#[inline(always)]
fn lane_sum(values: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let rest = values.len() / LANES * LANES;
    for v in values.chunks_exact(LANES) {
        for l in 0..LANES {
            lanes[l] += v[l];
        }
    }
    for (l, x) in values[rest..].iter().enumerate() {
        lanes[l] += x;
    }
    lanes.into_iter().sum()
}

#[inline(always)]
fn softmax_row_kernel<const FMA: bool>(scores: &[f32], hidden: &[u8], out: &mut [f32]) {
    let max = lane_max(scores, hidden);
    if max == f32::NEG_INFINITY {
        out.fill(0.0);
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

#[inline(always)]
fn sigmoid<const FMA: bool>(x: f32) -> f32 {
    1.0 / (1.0 + exp::<FMA>(-x))
}

#[inline(always)]
fn silu_mul_kernel<const FMA: bool>(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g * sigmoid::<FMA>(g) * u;
    }
}

/// d/dg [g σ(g) u] = u σ(g) (1 + g (1 − σ(g))), d/du = g σ(g).
#[inline(always)]
fn silu_mul_backward_kernel<const FMA: bool>(gate: &[f32], up: &[f32], grad: &[f32], d_gate: &mut [f32], d_up: &mut [f32]) {
    for ((((dg, du), &g), &u), &dy) in d_gate.iter_mut().zip(d_up.iter_mut()).zip(gate).zip(up).zip(grad) {
        let s = sigmoid::<FMA>(g);
        *du = dy * (g * s);
        *dg = dy * u * (s * (1.0 + g * (1.0 - s)));
    }
}

#[inline(always)]
fn mul_add<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    // without hardware FMA `f32::mul_add` is a libm call, and it would keep the loops scalar
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `e^x` in f32 within 2 ulp of the exact value, branch-free so that loops over it vectorize:
/// `x = n ln2 + r` with `|r| <= ln2 / 2`, `e^r` by its Taylor series to degree 7 (truncation
/// error below 6e-9), scaled by `2^n` through the exponent bits. Results below f32's smallest normal
/// (x < -87.34) flush to 0, x > 88 gives infinity; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp<const FMA: bool>(x: f32) -> f32 {
    const LOWEST: f32 = -87.336_54; // ln of the smallest normal f32: 2^n stays a normal number
    const HIGHEST: f32 = 88.0; // keeps n <= 127 (e^88 is within 2x of f32's largest)
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer, kept in the low bits
    const LN2_HI: f32 = 0.693_359_4; // ln 2 split so that n * LN2_HI is exact for |n| <= 127
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(LOWEST, HIGHEST);
    let shifted = mul_add::<FMA>(xc, std::f32::consts::LOG2_E, ROUND);
    let n = shifted - ROUND;
    let r = mul_add::<FMA>(n, -LN2_LO, mul_add::<FMA>(n, -LN2_HI, xc));
    let mut p = 1.0 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = mul_add::<FMA>(p, r, c);
    }
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let scale = f32::from_bits(((n_bits + 127) << 23) as u32);
    let e = p * scale;
    if x < LOWEST {
        0.0
    } else if x > HIGHEST {
        f32::INFINITY
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Tolerance;

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
    fn exp_is_within_two_ulp_of_the_exact_value() {
        fn check(exp: fn(f32) -> f32, name: &str) {
            let mut worst = 0f64;
            for i in 0..=400_000 {
                let x = -87.0 + 175.0 * i as f32 / 400_000.0;
                let (got, exact) = (exp(x) as f64, (x as f64).exp());
                let nearest = exact as f32;
                let ulp = (f32::from_bits(nearest.to_bits() + 1) - nearest) as f64;
                let ulps = (got - exact).abs() / ulp;
                worst = worst.max(ulps);
            }
            assert!(worst <= 2.0, "{name}: worst error {worst} ulp");
            assert_eq!(exp(0.0), 1.0, "{name}: e^0");
            assert_eq!(exp(f32::NEG_INFINITY), 0.0, "{name}: e^-inf");
            assert_eq!(exp(-100.0), 0.0, "{name}: underflow");
            assert_eq!(exp(f32::INFINITY), f32::INFINITY, "{name}: e^inf");
            assert_eq!(exp(89.0), f32::INFINITY, "{name}: overflow");
            assert!(exp(f32::NAN).is_nan(), "{name}: NaN");
        }
        check(exp::<false>, "separate multiply and add");
        check(exp::<true>, "fused multiply-add");
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
    fn other_dtypes_take_the_tensor_ops() {
        let gate = values::<Flex, 2>([3, 40], 2.0, 0.5).cast(DType::F16);
        let up = values::<Flex, 2>([3, 40], 2.0, 0.9).cast(DType::F16);
        let out = silu_mul(gate.clone(), up.clone());
        assert_eq!(out.dtype(), DType::F16);
        assert_eq!(out.into_data(), silu_mul_ops(gate, up).into_data());
    }
}
