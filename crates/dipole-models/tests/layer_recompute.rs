//! Per-layer recompute (`LayerTape`): the `*_checkpointed` forward passes give the same hidden
//! states, and the tape's backward pass the same gradient for every trainable parameter, as the
//! autodiff graph of the plain forward pass; whole rows, prefix sharing and packing, tied and
//! untied heads, a sliding window, LoRA (frozen base and embeddings) and frozen layers.

mod common;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use common::{AD, fixture};
use dipole_lora::LoraConfig;
use dipole_models::CausalLm;

type Inner = <AD as AutodiffBackend>::InnerBackend;

/// Pairs whose rows share their first tokens (prefix sharing applies) and have uneven lengths.
fn pairs() -> (Vec<Vec<u32>>, Vec<usize>) {
    let rows: Vec<Vec<u32>> = vec![vec![1, 5, 9, 12, 20, 21, 22, 23], vec![1, 7, 30, 0, 0, 0, 0, 0], vec![1, 5, 9, 12, 40, 0, 0, 0], vec![1, 7, 30, 31, 32, 33, 34, 0]];
    (rows, vec![8, 3, 5, 7])
}

/// How the rows go through the model.
#[derive(Clone, Copy, Debug)]
enum Layout {
    Whole,
    PrefixSharing,
    Packed,
}

fn set_layout<B: Backend>(model: &mut CausalLm<B>, layout: Layout) {
    (model.prefix_sharing, model.padding_free) = match layout {
        Layout::Whole => (false, false),
        Layout::PrefixSharing => (true, false),
        Layout::Packed => (false, true),
    };
}

/// A fixed weighting of the real positions' logits (so the LM head, tied or not, is in the loss).
fn loss(model: &CausalLm<AD>, hidden: Tensor<AD, 3>, lens: &[usize]) -> Tensor<AD, 1> {
    let logits = model.logits(hidden);
    let [rows, t, v] = logits.dims();
    let weights: Vec<f32> = (0..rows * t * v).map(|k| if k / v % t < lens[k / v / t] { ((k * 37 % 101) as f32 - 50.0) / 50.0 } else { 0.0 }).collect();
    (logits * Tensor::from_data(TensorData::new(weights, [rows, t, v]), &Default::default())).sum()
}

/// Every float parameter's gradient in `a` and `b` (both present or both absent), within 1e-5 of
/// the parameter's largest gradient: the same ops in the same order, only the sums of a tied
/// embedding's two gradients and of the streams' contributions may round differently.
struct Compare<'a> {
    a: &'a GradientsParams,
    b: &'a GradientsParams,
    seen: usize,
}

impl ModuleVisitor<AD> for Compare<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
        let (a, b) = (self.a.get::<Inner, D>(param.id), self.b.get::<Inner, D>(param.id));
        assert_eq!(a.is_some(), b.is_some(), "parameter {} ({:?}): a gradient on one side only", param.id, param.val().dims());
        let (Some(a), Some(b)) = (a, b) else { return };
        let (a, b): (Vec<f32>, Vec<f32>) = (a.into_data().to_vec().unwrap(), b.into_data().to_vec().unwrap());
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 1e-5 * scale.max(1e-12), "parameter {} ({:?}): gradients differ by {diff} (scale {scale})", param.id, param.val().dims());
        self.seen += 1;
    }
}

/// Hidden states and gradients both ways; returns how many parameters had gradients.
fn check(model: &mut CausalLm<AD>, layout: Layout) -> usize {
    let device = Default::default();
    let (ids, lens) = pairs();
    set_layout(model, layout);
    let plain = model.forward_hidden_pairs(&ids, &lens, &device);
    let (checkpointed, tape) = model.forward_hidden_pairs_checkpointed(&ids, &lens, &device);
    let diff = common::real_positions_diff(plain.clone(), checkpointed.clone(), &lens);
    assert!(diff == 0.0, "{layout:?}: checkpointed hidden states differ by {diff}");
    let want = GradientsParams::from_grads(loss(model, plain, &lens).backward(), model);
    let got = tape.backward(model, loss(model, checkpointed, &lens).backward());
    let mut compare = Compare { a: &got, b: &want, seen: 0 };
    model.visit(&mut compare);
    compare.seen
}

#[test]
fn full_fine_tuning_gradients_equal_the_graphs_on_every_layout_and_architecture() {
    let device = Default::default();
    for name in ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-llama3-rope"] {
        let (mut model, _) = CausalLm::<AD>::load(fixture(name), &device).unwrap();
        let params = model.num_params();
        for layout in [Layout::Whole, Layout::PrefixSharing, Layout::Packed] {
            let seen = check(&mut model, layout);
            assert!(seen >= 2 * 9 + 2, "{name} {layout:?}: only {seen} parameters had gradients ({params} values)");
        }
    }
}

#[test]
fn a_sliding_window_keeps_its_gradients() {
    let dir = common::mistral_with_window(3);
    let (mut model, _) = CausalLm::<AD>::load(dir.path(), &Default::default()).unwrap();
    for layout in [Layout::Whole, Layout::PrefixSharing, Layout::Packed] {
        check(&mut model, layout);
    }
}

#[test]
fn lora_gradients_equal_the_graphs_with_the_base_and_embeddings_frozen() {
    let device = Default::default();
    let (mut model, _) = CausalLm::<AD>::load(fixture("tiny-qwen2"), &device).unwrap();
    let config = LoraConfig { r: 4, lora_alpha: 8.0, target_modules: dipole_lora::TargetModules::List(vec!["q_proj".into(), "v_proj".into(), "down_proj".into()]), ..LoraConfig::default() };
    model.add_lora(&config, 7).unwrap();
    model.freeze_base();
    // LoRA's B starts at zero, which would leave A without gradient: give B values
    for (_, linear) in model.linears_mut() {
        if let Some(adapter) = linear.adapter.as_mut() {
            // from the host: the dropout test of this binary draws from the backend's generator
            let dims = adapter.b.val().dims();
            let values: Vec<f32> = (0..dims[0] * dims[1]).map(|k| ((k * 53 % 97) as f32 - 48.0) / 480.0).collect();
            let values = Tensor::<AD, 2>::from_data(TensorData::new(values, dims), &device);
            adapter.b = Param::initialized(adapter.b.id, values.require_grad());
        }
    }
    for layout in [Layout::Whole, Layout::PrefixSharing, Layout::Packed] {
        let seen = check(&mut model, layout);
        assert_eq!(seen, 2 * 3 * 2, "{layout:?}: gradients for exactly the adapters' A and B");
    }
}

#[test]
fn frozen_lower_layers_and_embeddings_get_no_gradient() {
    let device = Default::default();
    let (mut model, _) = CausalLm::<AD>::load(fixture("tiny-llama"), &device).unwrap();
    model.set_embeddings_trainable(false);
    model.set_layer_trainable(0, false);
    let seen = check(&mut model, Layout::PrefixSharing);
    assert_eq!(seen, 9 + 1 + 1, "layer 1's nine tensors, the final norm and the untied head");
}

/// Single-stream rows through `forward_hidden_checkpointed` (SFT's pass) and its gradients.
#[test]
fn padded_rows_without_pairs_too() {
    let device = Default::default();
    let (model, _) = CausalLm::<AD>::load(fixture("tiny-llama"), &device).unwrap();
    let (ids, lens) = pairs();
    let ids_t = dipole_models::ids_tensor::<AD>(&ids, &device);
    let mask: Vec<i64> = lens.iter().flat_map(|&l| (0..8).map(move |i| (i < l) as i64)).collect();
    let mask = Tensor::<AD, 2, burn::tensor::Int>::from_data(TensorData::new(mask, [4, 8]), &device);
    let plain = model.forward_hidden(ids_t.clone(), Some(mask.clone()), None);
    let (checkpointed, tape) = model.forward_hidden_checkpointed(ids_t, Some(mask));
    let want = GradientsParams::from_grads(loss(&model, plain, &lens).backward(), &model);
    let got = tape.backward(&model, loss(&model, checkpointed, &lens).backward());
    let mut compare = Compare { a: &got, b: &want, seen: 0 };
    model.visit(&mut compare);
    assert_eq!(compare.seen, 2 * 9 + 3);
}

/// With LoRA dropout the rerun draws the forward pass's masks again: the tape's gradient is the
/// derivative of the loss the checkpointed forward pass computed (central differences along it,
/// the masks fixed by the backend seed), and two runs from one seed give the same gradient.
#[test]
fn lora_dropout_draws_the_same_masks_when_a_layer_reruns() {
    let device = Default::default();
    let (mut model, _) = CausalLm::<AD>::load(fixture("tiny-llama"), &device).unwrap();
    let config = LoraConfig { r: 4, lora_alpha: 8.0, lora_dropout: 0.5, ..LoraConfig::default() };
    model.add_lora(&config, 7).unwrap();
    model.freeze_base();
    set_layout(&mut model, Layout::PrefixSharing);
    let (ids, lens) = pairs();
    let run = |model: &CausalLm<AD>| {
        AD::seed(&device, 42);
        let (hidden, tape) = model.forward_hidden_pairs_checkpointed(&ids, &lens, &device);
        let loss = loss(model, hidden, &lens);
        let value = loss.clone().into_scalar() as f64;
        (value, tape.backward(model, loss.backward()))
    };
    // B (A's gradient is 0 while B is at its initial 0)
    let b = model.layers[1].self_attn.q_proj.adapter.as_ref().unwrap().b.clone();
    let grad_of = |grads: &GradientsParams| grads.get::<Inner, 2>(b.id).expect("B has a gradient");
    let (_, grads) = run(&model);
    let g = grad_of(&grads);
    let (_, again) = run(&model);
    assert_eq!(g.to_data(), grad_of(&again).to_data(), "one seed, one gradient");

    let norm_sq = (g.clone() * g.clone()).sum().into_scalar() as f64;
    assert!(norm_sq > 0.0);
    let eps = 1e-2 / norm_sq.sqrt();
    let moved = |sign: f64| {
        let mut m = model.clone();
        let adapter = m.layers[1].self_attn.q_proj.adapter.as_mut().unwrap();
        let value = adapter.b.val() + Tensor::<AD, 2>::from_inner(g.clone()).mul_scalar(sign * eps);
        adapter.b = Param::initialized(b.id, value.detach().require_grad());
        run(&m).0
    };
    let slope = (moved(1.0) - moved(-1.0)) / (2.0 * eps);
    let rel = (slope - norm_sq).abs() / norm_sq;
    assert!(rel < 1e-2, "directional derivative {slope} vs |g|² {norm_sq} ({rel:.2e} apart)");
}
