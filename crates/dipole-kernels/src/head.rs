//! The LM head and the log-probs of labels as one op that never holds the `[positions, vocab]`
//! logits. Positions are taken in blocks and the vocabulary in chunks; each tile's logits
//! `hidden @ W[:, chunk]` are made, folded into running per-position statistics (an online
//! log-sum-exp, the rescaling FlashAttention uses for its softmax) and dropped. The backward pass
//! makes each tile again and turns it into its share of `d hidden` and `d W` (the recompute of
//! Liger's fused linear cross-entropy), so the memory of the whole stage is one tile.
//!
//! The op is written once over a backend's own tensor ops, so it runs the same on every backend; as
//! a custom autodiff op it keeps only the inputs and one log-sum-exp per position for the backward
//! pass. On burn's CPU backend the per-tile statistics and gradient are a vectorized kernel.

use std::sync::Arc;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::Flex;
use burn::tensor::{DType, Int, IndexingUpdateOp, Tensor, TensorData, TensorPrimitive, backend::Backend};

use crate::logps::{exponentials, position_gradient};
use crate::simd::{lane_dot, lane_max_all, lane_sum};
use crate::{cast, fused_enabled, in_parallel, rows_per_task};

/// How the head walks its input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeadOptions {
    /// The dtype the head's matmuls run in (mixed precision); `None`: the hidden states' dtype.
    /// Statistics and gradients are f32 either way.
    pub compute_dtype: Option<DType>,
    /// The most logits held at once: positions per block × vocabulary chunk.
    pub tile_elements: usize,
    /// The widest vocabulary chunk (positions per block follow from `tile_elements`).
    pub vocab_chunk: usize,
}

impl Default for HeadOptions {
    fn default() -> Self {
        HeadOptions { compute_dtype: None, tile_elements: DEFAULT_TILE_ELEMENTS, vocab_chunk: DEFAULT_VOCAB_CHUNK }
    }
}

/// 8 Mi logits (32 MiB in f32): large enough that both sides of every tile's matmul stay in the
/// hundreds (a thin tile would spend its time packing operands), small next to one layer's
/// activations.
pub const DEFAULT_TILE_ELEMENTS: usize = 1 << 23;

/// 4096 tokens: with the default tile, blocks of 2048 positions.
pub const DEFAULT_VOCAB_CHUNK: usize = 4096;

/// Per-position results, each `[positions]`. Only `logps` carries gradients (to the hidden states
/// and the weight); the rest are the statistics TRL's metrics and WPO's weights need.
#[derive(Clone, Debug)]
pub struct HeadLogps<B: Backend> {
    /// `log p(label)`.
    pub logps: Tensor<B, 1>,
    /// Predictive entropy `−Σ p log p`.
    pub entropy: Tensor<B, 1>,
    /// The mean logit over the vocabulary.
    pub logit_mean: Tensor<B, 1>,
    /// `log Σ_v p(v)²`.
    pub log_sum_sq: Tensor<B, 1>,
    /// The most likely token (the first one on ties).
    pub argmax: Tensor<B, 1, Int>,
}

/// Log-probs of `labels` `[positions]` under `hidden` `[positions, hidden] @ weight` `[hidden,
/// vocab]` (burn's linear layout), with the statistics of [`HeadLogps`].
///
/// On `Autodiff<Flex>` (either checkpointing strategy), on CUDA and wgpu under autodiff (with the
/// crate's `cuda` / `wgpu` features), and on every backend without autodiff, at most one tile of
/// logits exists at a time. On any other autodiff backend the same tiles are recorded on the tape,
/// which keeps all of them for the backward pass.
///
/// # Panics
/// If the shapes disagree or a label is outside the vocabulary.
pub fn head_logps<B: Backend>(hidden: Tensor<B, 2>, weight: Tensor<B, 2>, labels: Tensor<B, 1, Int>, options: HeadOptions) -> HeadLogps<B> {
    let ([positions, width], [rows, vocab]) = (hidden.dims(), weight.dims());
    assert_eq!(width, rows, "hidden states [{positions}, {width}] for a head weight [{rows}, {vocab}]");
    assert_eq!(labels.dims(), [positions], "labels for hidden states [{positions}, {width}]");
    assert!(options.tile_elements > 0 && options.vocab_chunk > 0, "tile_elements and vocab_chunk must be positive: {options:?}");
    let (hidden, weight, labels) = match on_autodiff((hidden, weight, labels), options) {
        Ok(out) => return out,
        Err(args) => args,
    };
    let out = forward(&Inputs::new(hidden, weight, labels), options);
    out.scores
}

/// The op's tensors: hidden states, weight, labels.
type Args<B> = (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 1, Int>);

/// Tries the custom autodiff op on the autodiff backends this build knows.
fn on_autodiff<B: Backend>(args: Args<B>, options: HeadOptions) -> Result<HeadLogps<B>, Args<B>> {
    let args = crate::on_autodiff!(args, (I, C, A) => Args<A>, |(h, w, l)| head_autodiff::<I, C>(h, w, l, options));
    Err(args)
}

/// The op's inputs on one backend, labels also on the host when the CPU kernel will read them.
#[derive(Clone, Debug)]
struct Inputs<I: Backend> {
    hidden: Tensor<I, 2>,
    weight: Tensor<I, 2>,
    /// `[positions, 1]`
    labels: Tensor<I, 2, Int>,
    host_labels: Option<Arc<[usize]>>,
}

impl<I: Backend> Inputs<I> {
    fn new(hidden: Tensor<I, 2>, weight: Tensor<I, 2>, labels: Tensor<I, 1, Int>) -> Self {
        let vocab = weight.dims()[1];
        let host_labels = uses_kernel::<I>().then(|| {
            let values: Vec<i64> = labels.clone().into_data().convert::<i64>().to_vec().expect("integer labels");
            values.into_iter().enumerate().map(|(p, v)| checked_label(v, p, vocab)).collect()
        });
        Inputs { hidden, weight, labels: labels.unsqueeze_dim(1), host_labels }
    }

    fn positions(&self) -> usize {
        self.hidden.dims()[0]
    }

    fn vocab(&self) -> usize {
        self.weight.dims()[1]
    }
}

fn checked_label(label: i64, position: usize, vocab: usize) -> usize {
    match usize::try_from(label) {
        Ok(l) if l < vocab => l,
        _ => panic!("label {label} at position {position} is outside the vocabulary of {vocab}"),
    }
}

/// Whether tiles of backend `I` go to the CPU kernel.
fn uses_kernel<I: Backend>() -> bool {
    std::any::TypeId::of::<I>() == std::any::TypeId::of::<Flex>() && fused_enabled()
}

/// How positions and vocabulary are tiled.
#[derive(Clone, Copy, Debug)]
struct Tiling {
    block: usize,
    chunk: usize,
}

impl Tiling {
    fn new(positions: usize, vocab: usize, options: HeadOptions) -> Self {
        let chunk = vocab.min(options.vocab_chunk).min(options.tile_elements).max(1);
        let block = (options.tile_elements / chunk).clamp(1, positions.max(1));
        Tiling { block, chunk }
    }

    fn blocks(self, positions: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
        (0..positions).step_by(self.block).map(move |p| p..(p + self.block).min(positions))
    }

    fn chunks(self, vocab: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
        (0..vocab).step_by(self.chunk).map(move |v| v..(v + self.chunk).min(vocab))
    }
}

/// The forward pass's results and each position's log-sum-exp `[positions]` for the backward pass.
struct Forward<I: Backend> {
    scores: HeadLogps<I>,
    lse: Tensor<I, 1>,
}

/// A block's hidden states in the matmuls' dtype.
fn block_hidden<I: Backend>(inputs: &Inputs<I>, block: std::ops::Range<usize>, options: HeadOptions) -> Tensor<I, 2> {
    let width = inputs.hidden.dims()[1];
    in_dtype(inputs.hidden.clone().slice([block, 0..width]), options.compute_dtype)
}

/// `x` in `dtype` when one is given.
fn in_dtype<I: Backend, const D: usize>(x: Tensor<I, D>, dtype: Option<DType>) -> Tensor<I, D> {
    match dtype {
        Some(d) if x.dtype() != d => x.cast(d),
        _ => x,
    }
}

/// `weight[:, chunk]` in the matmuls' dtype (the hidden states' without mixed precision: a frozen
/// weight stored in bf16 is cast tile by tile).
fn weight_chunk<I: Backend>(inputs: &Inputs<I>, chunk: std::ops::Range<usize>, options: HeadOptions) -> Tensor<I, 2> {
    let width = inputs.weight.dims()[0];
    in_dtype(inputs.weight.clone().slice([0..width, chunk]), Some(options.compute_dtype.unwrap_or(inputs.hidden.dtype())))
}

/// One tile's f32 logits `[block, chunk]`.
fn tile_logits<I: Backend>(hidden: &Tensor<I, 2>, weight: Tensor<I, 2>) -> Tensor<I, 2> {
    let logits = hidden.clone().matmul(weight);
    if logits.dtype() == DType::F32 { logits } else { logits.cast(DType::F32) }
}

fn forward<I: Backend>(inputs: &Inputs<I>, options: HeadOptions) -> Forward<I> {
    let (positions, vocab) = (inputs.positions(), inputs.vocab());
    let tiling = Tiling::new(positions, vocab, options);
    let mut blocks = Vec::new();
    for block in tiling.blocks(positions) {
        let hidden = block_hidden(inputs, block.clone(), options);
        let mut running: Option<Running<I>> = None;
        for chunk in tiling.chunks(vocab) {
            let logits = tile_logits(&hidden, weight_chunk(inputs, chunk.clone(), options));
            let stats = tile_stats(logits, inputs, block.clone(), chunk.start);
            running = Some(match running {
                None => stats,
                Some(r) => r.merge(stats),
            });
        }
        blocks.push(running.expect("a vocabulary of at least one token").finish(vocab));
    }
    let column = |f: fn(&Finished<I>) -> Tensor<I, 2>| Tensor::cat(blocks.iter().map(f).collect(), 0).squeeze_dim::<1>(1);
    let argmax = Tensor::cat(blocks.iter().map(|b| b.argmax.clone()).collect(), 0).squeeze_dim::<1>(1);
    Forward {
        scores: HeadLogps {
            logps: column(|b| b.logps.clone()),
            entropy: column(|b| b.entropy.clone()),
            logit_mean: column(|b| b.logit_mean.clone()),
            log_sum_sq: column(|b| b.log_sum_sq.clone()),
            argmax,
        },
        lse: column(|b| b.lse.clone()),
    }
}

/// Running statistics of a block's positions over the chunks seen so far, each `[block, 1]`; the
/// sums are of `e = exp(logit − max)`.
struct Running<I: Backend> {
    max: Tensor<I, 2>,
    /// `Σ e`
    sum: Tensor<I, 2>,
    /// `Σ e · logit`
    dot: Tensor<I, 2>,
    /// `Σ e²`
    sum_sq: Tensor<I, 2>,
    /// `Σ logit`
    total: Tensor<I, 2>,
    /// The label's logit (0 until its chunk is seen).
    picked: Tensor<I, 2>,
    argmax: Tensor<I, 2, Int>,
}

/// A block's results, each `[block, 1]`.
struct Finished<I: Backend> {
    logps: Tensor<I, 2>,
    entropy: Tensor<I, 2>,
    logit_mean: Tensor<I, 2>,
    log_sum_sq: Tensor<I, 2>,
    lse: Tensor<I, 2>,
    argmax: Tensor<I, 2, Int>,
}

impl<I: Backend> Running<I> {
    /// Both sets of sums rescaled to the larger maximum and added.
    fn merge(self, next: Running<I>) -> Running<I> {
        // the earlier chunk wins ties, as an argmax over the whole vocabulary would
        let argmax = self.argmax.mask_where(next.max.clone().greater(self.max.clone()), next.argmax);
        let max = self.max.clone().max_pair(next.max.clone());
        let (a, b) = ((self.max - max.clone()).exp(), (next.max - max.clone()).exp());
        let (a2, b2) = (a.clone() * a.clone(), b.clone() * b.clone());
        Running {
            sum: self.sum * a.clone() + next.sum * b.clone(),
            dot: self.dot * a + next.dot * b,
            sum_sq: self.sum_sq * a2 + next.sum_sq * b2,
            total: self.total + next.total,
            picked: self.picked + next.picked,
            argmax,
            max,
        }
    }

    fn finish(self, vocab: usize) -> Finished<I> {
        let log_sum = self.sum.clone().log();
        let lse = log_sum.clone() + self.max;
        Finished {
            logps: self.picked - lse.clone(),
            entropy: lse.clone() - self.dot / self.sum,
            logit_mean: self.total.div_scalar(vocab as f64),
            log_sum_sq: self.sum_sq.log() - log_sum.mul_scalar(2.0),
            lse,
            argmax: self.argmax,
        }
    }
}

/// The statistics of one tile's `logits` `[block, chunk]` whose first column is token `offset`.
fn tile_stats<I: Backend>(logits: Tensor<I, 2>, inputs: &Inputs<I>, block: std::ops::Range<usize>, offset: usize) -> Running<I> {
    match cast::<_, Tensor<Flex, 2>>(logits) {
        Ok(logits) if inputs.host_labels.is_some() => {
            let labels = &inputs.host_labels.as_ref().expect("host labels")[block];
            crate::back(kernel_tile_stats(logits, labels, offset))
        }
        Ok(logits) => ops_tile_stats(crate::back(logits), inputs.labels.clone().slice([block, 0..1]), offset),
        Err(logits) => ops_tile_stats(logits, inputs.labels.clone().slice([block, 0..1]), offset),
    }
}

/// [`tile_stats`] in tensor ops.
fn ops_tile_stats<I: Backend>(logits: Tensor<I, 2>, labels: Tensor<I, 2, Int>, offset: usize) -> Running<I> {
    let [_, chunk] = logits.dims();
    let max = logits.clone().detach().max_dim(1);
    let e = (logits.clone() - max.clone()).exp();
    let plain = logits.clone().detach();
    let local = labels.sub_scalar(offset as i64);
    let inside = local.clone().greater_equal_elem(0).bool_and(local.clone().lower_elem(chunk as i64));
    let index = local.clamp(0, chunk as i64 - 1);
    let picked = logits.gather(1, index).mask_fill(inside.bool_not(), 0.0);
    Running {
        sum: e.clone().sum_dim(1),
        dot: (e.clone().detach() * plain.clone()).sum_dim(1),
        sum_sq: (e.clone().detach() * e.detach()).sum_dim(1),
        total: plain.clone().sum_dim(1),
        picked,
        argmax: plain.argmax(1).add_scalar(offset as i64),
        max,
    }
}

/// [`tile_stats`] on the CPU: one pass for the maximum, one for the exponentials, then their sums.
fn kernel_tile_stats(logits: Tensor<Flex, 2>, labels: &[usize], offset: usize) -> Running<Flex> {
    let [block, chunk] = logits.dims();
    let logits = crate::contiguous(logits.into_primitive().tensor());
    let x = crate::f32s(&logits);
    let mut columns = vec![[0f32; 6]; block];
    let mut argmax = vec![0i64; block];
    let per_task = rows_per_task(chunk);
    in_parallel(columns.chunks_mut(per_task).zip(argmax.chunks_mut(per_task)).enumerate(), |(task, (columns, argmax))| {
        let mut scratch = vec![0f32; chunk];
        for (i, (out, best)) in columns.iter_mut().zip(argmax.iter_mut()).enumerate() {
            let p = task * per_task + i;
            let row = &x[p * chunk..(p + 1) * chunk];
            let max = lane_max_all(row);
            exponentials(row, max, &mut scratch);
            let label = labels[p].wrapping_sub(offset);
            let picked = if label < chunk { row[label] } else { 0.0 };
            *out = [max, lane_sum(&scratch), lane_dot(&scratch, row), lane_dot(&scratch, &scratch), lane_sum(row), picked];
            *best = (offset + row.iter().position(|&v| v == max).unwrap_or(0)) as i64;
        }
    });
    let device = Default::default();
    let column = |k: usize| Tensor::<Flex, 2>::from_data(TensorData::new(columns.iter().map(|c| c[k]).collect::<Vec<f32>>(), [block, 1]), &device);
    Running {
        max: column(0),
        sum: column(1),
        dot: column(2),
        sum_sq: column(3),
        total: column(4),
        picked: column(5),
        argmax: Tensor::from_data(TensorData::new(argmax, [block, 1]), &device),
    }
}

/// `d logp / d logits` of one tile `[block, chunk]` (first column token `offset`) scaled by the
/// incoming gradient `grad` `[block, 1]`: `grad · (onehot(label) − softmax)`.
fn tile_grad<I: Backend>(logits: Tensor<I, 2>, lse: Tensor<I, 2>, grad: Tensor<I, 2>, inputs: &Inputs<I>, block: std::ops::Range<usize>, offset: usize) -> Tensor<I, 2> {
    let labels = || inputs.labels.clone().slice([block.clone(), 0..1]);
    match cast::<_, (Tensor<Flex, 2>, Tensor<Flex, 2>, Tensor<Flex, 2>)>((logits, lse, grad)) {
        Ok((logits, lse, grad)) if inputs.host_labels.is_some() => {
            let host = &inputs.host_labels.as_ref().expect("host labels")[block.clone()];
            crate::back(kernel_tile_grad(logits, lse, grad, host, offset))
        }
        Ok((logits, lse, grad)) => ops_tile_grad(crate::back(logits), crate::back(lse), crate::back(grad), labels(), offset),
        Err((logits, lse, grad)) => ops_tile_grad(logits, lse, grad, labels(), offset),
    }
}

fn ops_tile_grad<I: Backend>(logits: Tensor<I, 2>, lse: Tensor<I, 2>, grad: Tensor<I, 2>, labels: Tensor<I, 2, Int>, offset: usize) -> Tensor<I, 2> {
    let [_, chunk] = logits.dims();
    let local = labels.sub_scalar(offset as i64);
    let inside = local.clone().greater_equal_elem(0).bool_and(local.clone().lower_elem(chunk as i64));
    let index = local.clamp(0, chunk as i64 - 1);
    let softmax = (logits - lse).exp() * grad.clone().neg();
    softmax.scatter(1, index, grad.mask_fill(inside.bool_not(), 0.0), IndexingUpdateOp::Add)
}

fn kernel_tile_grad(logits: Tensor<Flex, 2>, lse: Tensor<Flex, 2>, grad: Tensor<Flex, 2>, labels: &[usize], offset: usize) -> Tensor<Flex, 2> {
    let [block, chunk] = logits.dims();
    let host = |t: Tensor<Flex, 2>| -> Vec<f32> { t.into_data().convert::<f32>().to_vec().expect("f32") };
    let (lse, grad) = (host(lse), host(grad));
    let logits = crate::contiguous(logits.into_primitive().tensor());
    let x = crate::f32s(&logits);
    let mut out = vec![0f32; block * chunk];
    crate::for_each_row(&mut out, chunk, |p, row| {
        position_gradient(&x[p * chunk..(p + 1) * chunk], lse[p], grad[p], row);
        let label = labels[p].wrapping_sub(offset);
        if label < chunk {
            row[label] += grad[p];
        }
    });
    Tensor::from_data(TensorData::new(out, [block, chunk]), &Default::default())
}

/// `(d hidden, d weight)` for the incoming gradient `grad` `[positions]` of the log-probs, each
/// only when asked for, in the inputs' dtypes.
fn backward<I: Backend>(inputs: &Inputs<I>, lse: Tensor<I, 1>, grad: Tensor<I, 1>, options: HeadOptions, wanted: [bool; 2]) -> [Option<Tensor<I, 2>>; 2] {
    let (positions, vocab) = (inputs.positions(), inputs.vocab());
    let tiling = Tiling::new(positions, vocab, options);
    let f32 = |t: Tensor<I, 2>| if t.dtype() == DType::F32 { t } else { t.cast(DType::F32) };
    let add = |acc: Option<Tensor<I, 2>>, part: Tensor<I, 2>| Some(match acc {
        Some(acc) => acc + part,
        None => part,
    });
    let mut d_hidden = Vec::new();
    let mut d_weight: Vec<Option<Tensor<I, 2>>> = tiling.chunks(vocab).map(|_| None).collect();
    for block in tiling.blocks(positions) {
        let hidden = block_hidden(inputs, block.clone(), options);
        let lse = lse.clone().slice(block.clone()).unsqueeze_dim::<2>(1);
        let grad = grad.clone().slice(block.clone()).unsqueeze_dim::<2>(1);
        let mut dh = None;
        for (k, chunk) in tiling.chunks(vocab).enumerate() {
            let weight = weight_chunk(inputs, chunk.clone(), options);
            let logits = tile_logits(&hidden, weight.clone());
            let d = in_dtype(tile_grad(logits, lse.clone(), grad.clone(), inputs, block.clone(), chunk.start), options.compute_dtype);
            if wanted[0] {
                dh = add(dh, f32(d.clone().matmul(weight.transpose())));
            }
            if wanted[1] {
                d_weight[k] = add(d_weight[k].take(), f32(hidden.clone().transpose().matmul(d)));
            }
        }
        d_hidden.extend(dh);
    }
    let like = |t: Tensor<I, 2>, reference: &Tensor<I, 2>| if t.dtype() == reference.dtype() { t } else { t.cast(reference.dtype()) };
    let d_hidden = wanted[0].then(|| like(Tensor::cat(d_hidden, 0), &inputs.hidden));
    let d_weight = wanted[1].then(|| like(Tensor::cat(d_weight.into_iter().map(|d| d.expect("every chunk's gradient")).collect(), 1), &inputs.weight));
    [d_hidden, d_weight]
}

/// Backward step: the state is the op's inputs and each position's log-sum-exp.
#[derive(Debug)]
struct HeadBackward;

#[derive(Clone, Debug)]
struct HeadState<I: Backend> {
    inputs: Inputs<I>,
    lse: Tensor<I, 1>,
    options: HeadOptions,
}

impl<I: Backend> Backward<I, 2> for HeadBackward {
    type State = HeadState<I>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [hidden_node, weight_node] = ops.parents;
        let grad = Tensor::<I, 1>::from_primitive(TensorPrimitive::Float(grads.consume::<I>(&ops.node)));
        let HeadState { inputs, lse, options } = ops.state;
        let [d_hidden, d_weight] = backward(&inputs, lse, grad, options, [hidden_node.is_some(), weight_node.is_some()]);
        for (node, d) in [(hidden_node, d_hidden), (weight_node, d_weight)] {
            if let (Some(node), Some(d)) = (node, d) {
                grads.register::<I>(node.id, d.into_primitive().tensor());
            }
        }
    }
}

fn head_autodiff<I: Backend, C: CheckpointStrategy>(hidden: Tensor<Autodiff<I, C>, 2>, weight: Tensor<Autodiff<I, C>, 2>, labels: Tensor<Autodiff<I, C>, 1, Int>, options: HeadOptions) -> HeadLogps<Autodiff<I, C>> {
    let (hidden, weight) = (hidden.into_primitive().tensor(), weight.into_primitive().tensor());
    let float = |t: I::FloatTensorPrimitive| Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(t));
    let inputs = Inputs::new(float(hidden.primitive.clone()), float(weight.primitive.clone()), labels.inner());
    let Forward { scores, lse } = forward(&inputs, options);
    let logps = scores.logps.into_primitive().tensor();
    let logps = match HeadBackward.prepare::<C>([hidden.node.clone(), weight.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(HeadState { inputs, lse, options }, logps),
        OpsKind::UnTracked(prep) => prep.finish(logps),
    };
    HeadLogps {
        logps: Tensor::from_primitive(TensorPrimitive::Float(logps)),
        entropy: Tensor::from_inner(scores.entropy),
        logit_mean: Tensor::from_inner(scores.logit_mean),
        log_sum_sq: Tensor::from_inner(scores.log_sum_sq),
        argmax: Tensor::from_inner(scores.argmax),
    }
}
