//! Frozen weight matrices held in their stored dtype (`CausalLm::load_with`, `MatrixDtype`): a bf16
//! checkpoint loaded as stored gives the hidden states, log-probs and LoRA gradients of the same
//! checkpoint loaded in f32 (bf16 values are exact in f32, and every product computes in f32), while
//! its matrices take half the memory; weights made trainable again are f32.

mod common;

use burn::backend::Flex;
use burn::module::Param;
use burn::optim::GradientsParams;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor, TensorData};
use common::{AD, fixture};
use dipole_lora::{LoraConfig, TargetModules};
use dipole_models::{CausalLm, ExportDtype, MatrixDtype};

/// `name` written back as a bf16 checkpoint.
fn bf16_copy(name: &str) -> tempfile::TempDir {
    let (model, _) = CausalLm::<Flex>::load(fixture(name), &Default::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save_hf(dir.path(), ExportDtype::BF16, usize::MAX, Some(&fixture(name))).unwrap();
    dir
}

fn rows() -> (Vec<Vec<u32>>, Vec<usize>) {
    (vec![vec![1, 5, 9, 12, 20, 21, 22, 23], vec![1, 5, 9, 12, 40, 41, 0, 0]], vec![8, 6])
}

#[test]
fn stored_matrices_stay_bf16_and_norms_f32() {
    let dir = bf16_copy("tiny-qwen2");
    let (model, _) = CausalLm::<Flex>::load_with(dir.path(), MatrixDtype::Stored, &Default::default()).unwrap();
    assert_eq!(model.embed_tokens.val().dtype(), DType::BF16);
    for (name, linear) in model.linears() {
        assert_eq!(linear.weight.val().dtype(), DType::BF16, "{name}");
        if let Some(b) = &linear.bias {
            assert_eq!(b.val().dtype(), DType::F32, "{name} bias");
        }
    }
    assert_eq!(model.layers[0].input_layernorm.weight.val().dtype(), DType::F32);
    // an f32 checkpoint as stored is f32; a cast asks for the dtype whatever is stored
    let (f32_model, _) = CausalLm::<Flex>::load_with(fixture("tiny-qwen2"), MatrixDtype::Stored, &Default::default()).unwrap();
    assert_eq!(f32_model.embed_tokens.val().dtype(), DType::F32);
    let (cast, _) = CausalLm::<Flex>::load_with(fixture("tiny-qwen2"), MatrixDtype::Cast(DType::BF16), &Default::default()).unwrap();
    assert_eq!(cast.layers[1].mlp.down_proj.weight.val().dtype(), DType::BF16);
}

#[test]
fn a_bf16_base_computes_what_its_f32_copy_does() {
    let device = Default::default();
    for name in ["tiny-llama", "tiny-qwen2"] {
        let dir = bf16_copy(name);
        let (as_f32, _) = CausalLm::<Flex>::load(dir.path(), &device).unwrap();
        let (as_stored, _) = CausalLm::<Flex>::load_with(dir.path(), MatrixDtype::Stored, &device).unwrap();
        let (ids, lens) = rows();
        let a = as_f32.forward_hidden_pairs(&ids, &lens, &device);
        let b = as_stored.forward_hidden_pairs(&ids, &lens, &device);
        assert_eq!(a.dtype(), DType::F32);
        assert_eq!(b.dtype(), DType::F32, "{name}: the residual stream is f32");
        assert_eq!(common::real_positions_diff(a.clone(), b.clone(), &lens), 0.0, "{name}: hidden states");
        // the fused head (tiles of a bf16 weight cast to f32) and the whole logits
        let [r, t, h] = a.dims();
        let labels = Tensor::<Flex, 1, burn::tensor::Int>::from_data(TensorData::new(ids.concat().iter().map(|&i| i as i64).collect::<Vec<_>>(), [r * t]), &device);
        let fused = |m: &CausalLm<Flex>, x: Tensor<Flex, 3>| m.head_logps(x.reshape([r * t, h]), labels.clone()).unwrap().logps.into_data().to_vec::<f32>().unwrap();
        assert_eq!(fused(&as_f32, a.clone()), fused(&as_stored, b.clone()), "{name}: fused log-probs");
        let logits = |m: &CausalLm<Flex>, x: Tensor<Flex, 3>| m.logits(x).into_data().to_vec::<f32>().unwrap();
        assert_eq!(logits(&as_f32, a), logits(&as_stored, b), "{name}: logits");
    }
}

/// LoRA on a bf16 base: the adapters' gradients equal those on the f32 copy, with the whole graph
/// (the frozen products as `frozen_matmul`) and with per-layer recompute.
#[test]
fn lora_gradients_on_a_bf16_base_equal_the_f32_copys() {
    let device = Default::default();
    let dir = bf16_copy("tiny-llama");
    let config = LoraConfig { r: 4, target_modules: TargetModules::List(vec!["q_proj".into(), "v_proj".into(), "down_proj".into()]), ..LoraConfig::default() };
    let prepared = |matrices: MatrixDtype| {
        let (mut model, _) = CausalLm::<AD>::load_with(dir.path(), matrices, &device).unwrap();
        model.add_lora(&config, 3).unwrap();
        for (_, linear) in model.linears_mut() {
            if let Some(adapter) = linear.adapter.as_mut() {
                AD::seed(&device, 11);
                let b = Tensor::<AD, 2>::random(adapter.b.dims(), Distribution::Normal(0.0, 0.1), &device);
                adapter.b = Param::initialized(adapter.b.id, b.require_grad());
            }
        }
        model
    };
    let gradients = |model: &CausalLm<AD>, recompute: bool| -> Vec<Vec<f32>> {
        let (ids, lens) = rows();
        let (hidden, tape) = if recompute {
            let (h, t) = model.forward_hidden_pairs_checkpointed(&ids, &lens, &device);
            (h, Some(t))
        } else {
            (model.forward_hidden_pairs(&ids, &lens, &device), None)
        };
        AD::seed(&device, 5);
        let weights = Tensor::<AD, 3>::random(hidden.dims(), Distribution::Normal(0.0, 1.0), &device);
        let loss = model.logits(hidden * weights).sum();
        let grads = loss.backward();
        let grads = match tape {
            Some(tape) => tape.backward(model, grads),
            None => GradientsParams::from_grads(grads, model),
        };
        model.linears().iter().filter_map(|(_, l)| l.adapter.as_ref()).flat_map(|a| [a.a.id, a.b.id]).map(|id| grads.get::<Flex, 2>(id).expect("an adapter gradient").into_data().to_vec::<f32>().unwrap()).collect()
    };
    let (f32_base, bf16_base) = (prepared(MatrixDtype::F32), prepared(MatrixDtype::Stored));
    assert_eq!(bf16_base.layers[0].mlp.down_proj.weight.val().dtype(), DType::BF16);
    for recompute in [false, true] {
        let (want, got) = (gradients(&f32_base, recompute), gradients(&bf16_base, recompute));
        assert_eq!(want.len(), 12);
        for (w, g) in want.iter().zip(&got) {
            let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
            let diff = w.iter().zip(g).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(scale > 0.0 && diff <= 1e-6 * scale, "recompute {recompute}: adapter gradients differ by {diff} (scale {scale})");
        }
    }
}

#[test]
fn weights_made_trainable_are_f32_and_merges_keep_the_stored_dtype() {
    let dir = bf16_copy("tiny-llama");
    let (mut model, _) = CausalLm::<AD>::load_with(dir.path(), MatrixDtype::Stored, &Default::default()).unwrap();
    model.add_lora(&LoraConfig { r: 2, ..LoraConfig::default() }, 1).unwrap();
    let q = model.layers[0].self_attn.q_proj.weight.id;
    model.merge_adapters();
    assert_eq!(model.layers[0].self_attn.q_proj.weight.val().dtype(), DType::BF16, "merged in the stored dtype");
    model.unmerge_adapters();
    model.set_layer_trainable(0, true);
    let weight = &model.layers[0].self_attn.q_proj.weight;
    assert_eq!((weight.val().dtype(), weight.id), (DType::F32, q), "a trainable weight is f32, same parameter");
    assert!(weight.val().is_require_grad());
    assert_eq!(model.layers[1].self_attn.q_proj.weight.val().dtype(), DType::BF16, "the frozen layer stays bf16");
}
