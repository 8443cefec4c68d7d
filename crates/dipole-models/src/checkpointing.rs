//! Per-decoder-layer activation recompute (HF's gradient checkpointing): the forward pass keeps
//! only each decoder layer's input, outside the autodiff graph; the backward pass runs each layer
//! again on its kept input, last layer first, and back-propagates through that one layer before
//! the next. A step's activations are then one `[rows, T, hidden]` tensor per layer plus one
//! layer's full set, for one more forward pass of the decoder.
//!
//! burn's backward pass cannot run another backward pass inside one of its steps (its graph lock
//! is held), so the recompute is not an op on the loss's graph: the loss's graph starts at the
//! last layer's output (a leaf), and [`LayerTape::backward`] carries its gradient down the layers.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, Distribution, IndexingUpdateOp, Int, Tensor};

use crate::adapters::trainable_values;
use crate::llama::{CausalLm, Rotations};

/// Rows that go through the layers together: their token ids, RoPE rotations and each layer's
/// attention mask.
#[derive(Clone)]
pub(crate) struct Rows<B: Backend> {
    pub ids: Tensor<B, 2, Int>,
    pub rotary: Rotations<B>,
    pub masks: Vec<Tensor<B, 4, Bool>>,
}

/// One forward pass through the decoder: one set of rows, or (`prefixed`) prefix sharing's
/// prefixes `[P, Ls]` and then every row's suffix `[2P, Lr]`, which attends after its pair's
/// prefix keys and values in every layer.
#[derive(Clone)]
pub(crate) struct Pass<B: Backend> {
    pub streams: Vec<Rows<B>>,
    pub prefixed: bool,
}

impl<B: Backend> Pass<B> {
    pub fn whole(rows: Rows<B>) -> Self {
        Pass { streams: vec![rows], prefixed: false }
    }

    /// Bytes of one layer's f32 attention probabilities over every stream, at `heads` heads.
    fn probability_bytes(&self, heads: usize) -> usize {
        self.streams.iter().map(|rows| rows.masks.first().map_or(0, |m| {
            let [b, _, q, k] = m.dims();
            b * heads * q * k * 4
        })).sum()
    }
}

/// Under per-layer recompute only one layer's graph exists at a time, so its attention keeps its
/// probabilities for the backward pass (faster than making them again) up to this size, even with
/// `attention_recompute` on.
pub const KEPT_PROBABILITIES: usize = 1 << 30;

/// `t` outside every autodiff graph and not tracked: ops on it record nothing.
pub(crate) fn untracked<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    t.detach().set_require_grad(false)
}

/// What a checkpointed forward pass keeps for its backward pass: each layer's inputs (one per
/// stream), the pass's rows, and the last layer's outputs, which are the leaves the loss's graph
/// starts from. Made by the `*_checkpointed` forward passes of [`CausalLm`]; consumed by
/// [`backward`](Self::backward) with the model that made it.
pub struct LayerTape<B: Backend> {
    pass: Pass<B>,
    inputs: Vec<Vec<Tensor<B, 3>>>,
    outputs: Vec<Tensor<B, 3>>,
    /// One seed per layer, set before the layer runs and again before it reruns, so that LoRA
    /// dropout draws the same masks both times; `None` without dropout.
    seeds: Option<Vec<u64>>,
    /// Whether attention recomputes its probabilities in the rerun layers' backward passes (see
    /// [`KEPT_PROBABILITIES`]); the first run takes the same form, so both give the same values.
    recompute_attention: bool,
}

impl<B: Backend> CausalLm<B> {
    /// `pass` through the model with only the layers' inputs kept (see [`LayerTape`]).
    pub(crate) fn decode_checkpointed(&self, pass: Pass<B>) -> (Vec<Tensor<B, 3>>, LayerTape<B>) {
        let seeds = self.has_dropout().then(|| {
            let device = pass.streams[0].ids.device();
            let drawn = Tensor::<B, 1, Int>::random([self.layers.len()], Distribution::Uniform(0.0, i32::MAX as f64), &device);
            drawn.into_data().convert::<i64>().to_vec::<i64>().expect("i64 seeds").into_iter().map(|s| s as u64).collect()
        });
        let recompute_attention = self.attention_recompute && pass.probability_bytes(self.config.num_attention_heads) > KEPT_PROBABILITIES;
        let mut tape = LayerTape { pass: pass.clone(), inputs: Vec::with_capacity(self.layers.len()), outputs: Vec::new(), seeds, recompute_attention };
        let hidden = self.decode(&pass, None, Some(&mut tape));
        (hidden, tape)
    }

    fn has_dropout(&self) -> bool {
        self.linears().iter().any(|(_, linear)| linear.adapter.as_ref().is_some_and(|a| a.dropout > 0.0))
    }
}

impl<B: Backend> LayerTape<B> {
    /// Keeps layer `i`'s inputs and runs the layer on them untracked.
    pub(crate) fn record_layer(&mut self, model: &CausalLm<B>, i: usize, xs: Vec<Tensor<B, 3>>) -> Vec<Tensor<B, 3>> {
        let xs: Vec<Tensor<B, 3>> = xs.into_iter().map(untracked).collect();
        self.inputs.push(xs.clone());
        let frozen = model.layers[i].clone().no_grad();
        self.seeded(i, &xs[0].device(), || frozen.forward_pass(i, xs, &self.pass, None, self.recompute_attention))
    }

    /// The last layer's outputs as leaves for the loss's graph.
    pub(crate) fn record_outputs(&mut self, xs: Vec<Tensor<B, 3>>) -> Vec<Tensor<B, 3>> {
        self.outputs = xs.into_iter().map(|x| x.require_grad()).collect();
        self.outputs.clone()
    }

    /// Runs layer `layer`'s forward pass `run` from its seed, when the model has dropout. The
    /// backend's generator is one per process and parallel shards each run layers: the seed and
    /// the draws that follow it are made under one lock, so no other shard's draws come between.
    fn seeded<R>(&self, layer: usize, device: &B::Device, run: impl FnOnce() -> R) -> R {
        let Some(seeds) = &self.seeds else { return run() };
        let _stream = SEEDED_DRAWS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        B::seed(device, seeds[layer]);
        run()
    }
}

/// Held while a layer of a tape with dropout draws its masks (see [`LayerTape::seeded`]).
static SEEDED_DRAWS: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl<B: AutodiffBackend> LayerTape<B> {
    /// The gradients of `model`'s trainable parameters for the loss whose backward pass gave
    /// `grads` (see [`backward_into`](Self::backward_into)).
    pub fn backward(self, model: &CausalLm<B>, grads: B::Gradients) -> GradientsParams {
        let mut params = GradientsParams::new();
        self.backward_into(model, grads, &mut params);
        params
    }

    /// Gives `sink` the gradients of `model`'s trainable parameters for the loss whose backward
    /// pass gave `grads`: each layer's as soon as it is made, last layer first, from the layer run
    /// again on its kept inputs; then those the loss's graph reached (final norm, LM head) with the
    /// embeddings' (a tied embedding's two parts added first). `model` is the one that made the tape.
    pub fn backward_into(mut self, model: &CausalLm<B>, mut grads: B::Gradients, sink: &mut impl GradientSink<B>) {
        let mut upstream: Vec<Option<Tensor<B::InnerBackend, 3>>> = self.outputs.iter().map(|y| y.grad_remove(&mut grads)).collect();
        let mut top = GradientsParams::new();
        give_gradients(model, &mut grads, &mut top);
        drop(grads);

        let embeddings_train = model.embed_tokens.val().is_require_grad();
        // below the lowest trainable layer (embeddings frozen) nothing needs a gradient
        let lowest = if embeddings_train { 0 } else { model.layers.iter().position(|layer| trainable_values(layer) > 0).unwrap_or(model.layers.len()) };
        for i in (lowest..model.layers.len()).rev() {
            let inputs = self.inputs.pop().expect("one input per layer");
            let wants_input = i > lowest || embeddings_train;
            let xs: Vec<Tensor<B, 3>> = inputs.into_iter().map(|x| if wants_input { x.require_grad() } else { x }).collect();
            let ys = self.seeded(i, &xs[0].device(), || model.layers[i].forward_pass(i, xs.clone(), &self.pass, None, self.recompute_attention));
            // no gradient reaches this layer's outputs, so none reaches those below or the embeddings
            let Some(loss) = surrogate(ys, &upstream) else {
                upstream.clear();
                break;
            };
            let mut layer_grads = loss.backward();
            give_gradients(&model.layers[i], &mut layer_grads, sink);
            upstream = xs.iter().map(|x| if wants_input { x.grad(&layer_grads) } else { None }).collect();
        }
        if embeddings_train {
            add_lookup_gradient(model, &self.pass, &upstream, &mut top);
        }
        move_gradients(model, &mut top, sink);
    }
}

/// Adds the embedding lookup's gradient into `grads`: each position's upstream gradient to its
/// token's row, onto the LM head's part of a tied table. The lookup's own backward pass would make a
/// dense table-sized gradient and then their sum, two more vocabulary-sized copies.
fn add_lookup_gradient<B: AutodiffBackend>(model: &CausalLm<B>, pass: &Pass<B>, upstream: &[Option<Tensor<B::InnerBackend, 3>>], grads: &mut GradientsParams) {
    let id = model.embed_tokens.id;
    let table = model.embed_tokens.val().inner();
    let [vocab, hidden] = table.dims();
    let mut grad = grads.remove::<B::InnerBackend, 2>(id).unwrap_or_else(|| Tensor::zeros([vocab, hidden], &table.device()));
    for (rows, g) in pass.streams.iter().zip(upstream) {
        if let Some(g) = g {
            let [r, t, h] = g.dims();
            let ids = rows.ids.clone().inner().reshape([r * t]);
            grad = grad.select_assign(0, ids, g.clone().reshape([r * t, h]), IndexingUpdateOp::Add);
        }
    }
    grads.register::<B::InnerBackend, 2>(id, grad);
}

/// `Σ_s sum(y_s ∘ g_s)` over the streams whose upstream gradient `g_s` exists: its gradient
/// with respect to anything `y` depends on is the upstream gradient carried back.
fn surrogate<B: AutodiffBackend>(ys: Vec<Tensor<B, 3>>, upstream: &[Option<Tensor<B::InnerBackend, 3>>]) -> Option<Tensor<B, 1>> {
    ys.into_iter()
        .zip(upstream)
        .filter_map(|(y, g)| g.as_ref().map(|g| (y * Tensor::from_inner(g.clone())).sum()))
        .reduce(|a, b| a + b)
}

/// Where a backward pass puts its parameters' gradients, each parameter's once per pass; a sink
/// may sum several passes' (micro-batches, or shards running side by side).
pub trait GradientSink<B: AutodiffBackend> {
    fn give<const D: usize>(&mut self, id: ParamId, grad: Tensor<B::InnerBackend, D>);
}

/// An accumulator: a gradient is added to the one already there.
impl<B: AutodiffBackend> GradientSink<B> for GradientsParams {
    fn give<const D: usize>(&mut self, id: ParamId, grad: Tensor<B::InnerBackend, D>) {
        let grad = match self.remove::<B::InnerBackend, D>(id) {
            Some(earlier) => earlier + grad,
            None => grad,
        };
        self.register::<B::InnerBackend, D>(id, grad);
    }
}

/// Moves the gradients of `module`'s parameters from an autodiff backward pass into `sink`.
pub fn give_gradients<B: AutodiffBackend, M: Module<B>>(module: &M, grads: &mut B::Gradients, sink: &mut impl GradientSink<B>) {
    struct Give<'a, B: AutodiffBackend, S> {
        grads: &'a mut B::Gradients,
        into: &'a mut S,
    }
    impl<B: AutodiffBackend, S: GradientSink<B>> ModuleVisitor<B> for Give<'_, B, S> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(grad) = param.val().grad_remove(self.grads) {
                self.into.give(param.id, grad);
            }
        }
    }
    module.visit(&mut Give::<B, _> { grads, into: sink });
}

/// Moves the gradients of `module`'s parameters from `from` into `sink`.
fn move_gradients<B: AutodiffBackend, M: Module<B>>(module: &M, from: &mut GradientsParams, sink: &mut impl GradientSink<B>) {
    struct Move<'a, S> {
        from: &'a mut GradientsParams,
        into: &'a mut S,
    }
    impl<B: AutodiffBackend, S: GradientSink<B>> ModuleVisitor<B> for Move<'_, S> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(grad) = self.from.remove::<B::InnerBackend, D>(param.id) {
                self.into.give(param.id, grad);
            }
        }
    }
    module.visit(&mut Move { from, into: sink });
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};

    type AD = Autodiff<Flex>;

    /// The rerun layers give the same gradients whether their attention keeps its probabilities
    /// (the tiny fixture's size) or makes them again (what large ones do).
    #[test]
    fn rerun_attention_in_either_form_gives_the_same_gradients() {
        let device = Default::default();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-llama");
        let (model, _) = CausalLm::<AD>::load(dir, &device).unwrap();
        let ids: Vec<Vec<u32>> = vec![vec![1, 5, 9, 12, 20, 21], vec![1, 5, 9, 30, 0, 0]];
        let lens = [6, 4];
        let gradient = |recompute: bool| {
            let (hidden, mut tape) = model.forward_hidden_pairs_checkpointed(&ids, &lens, &device);
            assert!(!tape.recompute_attention, "a tiny pass keeps its probabilities");
            tape.recompute_attention = recompute;
            // made on the host: other tests of this binary draw from the backend's generator
            let n = hidden.dims().iter().product::<usize>();
            let values: Vec<f32> = (0..n).map(|k| ((k * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let weights = Tensor::<AD, 3>::from_data(burn::tensor::TensorData::new(values, hidden.dims()), &device);
            let grads = tape.backward(&model, (hidden * weights).sum().backward());
            let q = &model.layers[0].self_attn.q_proj.weight;
            grads.get::<Flex, 2>(q.id).expect("q_proj has a gradient").into_data().to_vec::<f32>().unwrap()
        };
        let (kept, remade) = (gradient(false), gradient(true));
        let scale = kept.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = kept.iter().zip(&remade).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(scale > 0.0 && diff <= 1e-5 * scale, "gradients differ by {diff} (scale {scale})");
    }
}
