//! Forward-pass behaviour: KV-cache decoding, padding, sliding windows, random init.

mod common;

use std::path::PathBuf;

use common::fixture;

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use dipole_models::{CausalLm, KvCache, ids_tensor};


fn tiny_llama() -> PathBuf {
    fixture("tiny-llama")
}

#[test]
fn kv_cache_decoding_equals_full_forward() {
    let device = Default::default();
    let (model, _) = CausalLm::<Flex>::load(tiny_llama(), &device).unwrap();
    let ids: Vec<u32> = vec![1, 403, 28, 410, 315, 272, 266, 500];
    let full = model.forward(ids_tensor::<Flex>(std::slice::from_ref(&ids), &device), None);
    let mut cache = KvCache::new(model.layers.len());
    let first = model.logits(model.forward_hidden(ids_tensor::<Flex>(&[ids[..5].to_vec()], &device), None, Some(&mut cache)));
    let mut parts = vec![first];
    for &t in &ids[5..] {
        parts.push(model.logits(model.forward_hidden(ids_tensor::<Flex>(&[vec![t]], &device), None, Some(&mut cache))));
    }
    let incremental = Tensor::cat(parts, 1);
    let diff: f32 = (full - incremental).abs().max().into_scalar();
    assert!(diff < 1e-4, "cached decoding differs by {diff}");
}

#[test]
fn padding_does_not_change_real_tokens() {
    let device = Default::default();
    let (model, _) = CausalLm::<Flex>::load(tiny_llama(), &device).unwrap();
    let alone = model.forward(ids_tensor::<Flex>(&[vec![1, 5, 9, 13]], &device), None);
    let padded_ids = ids_tensor::<Flex>(&[vec![1, 5, 9, 13, 0, 0], vec![1, 7, 8, 9, 10, 11]], &device);
    let mask = Tensor::<Flex, 2, Int>::from_data(TensorData::new(vec![1i64, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1], [2, 6]), &device);
    let padded = model.forward(padded_ids, Some(mask)).slice([0..1, 0..4]);
    let diff: f32 = (alone - padded).abs().max().into_scalar();
    assert!(diff < 1e-5, "padding changed real-token logits by {diff}");
}

#[test]
fn random_init_has_the_configured_parameter_count() {
    use burn::module::Module;
    use dipole_models::ModelConfig;
    let config = ModelConfig::llama(dipole_models::LlamaShape { vocab_size: 100, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64 }).unwrap();
    let expected = config.num_parameters();
    let model = CausalLm::<Flex>::init(config, 0, &Default::default());
    assert_eq!(model.num_params(), expected);
}

/// With a window of 2 and 2 layers, position t sees tokens t-2..t only: changing token 1 must not
/// change logits from position 4 on, but must change them at positions 1..=3.
#[test]
fn mistral_sliding_window_limits_what_each_position_sees() {
    let dir = common::mistral_with_window(2);
    let src = fixture("tiny-mistral");
    let device = Default::default();
    let (model, _) = CausalLm::<Flex>::load(dir.path(), &device).unwrap();
    assert_eq!(model.layers[0].sliding_window, Some(2));
    let a = model.forward(ids_tensor::<Flex>(&[vec![1, 10, 20, 30, 40, 50, 60]], &device), None);
    let b = model.forward(ids_tensor::<Flex>(&[vec![1, 11, 20, 30, 40, 50, 60]], &device), None);
    let per_position: Vec<f32> = (a - b).abs().max_dim(2).into_data().to_vec().unwrap();
    assert!(per_position[1..=3].iter().all(|d| *d > 1e-4), "{per_position:?}");
    assert!(per_position[4..].iter().all(|d| *d == 0.0), "{per_position:?}");

    // and the full model (window 4096) does see it
    let (full, _) = CausalLm::<Flex>::load(src, &device).unwrap();
    let a = full.forward(ids_tensor::<Flex>(&[vec![1, 10, 20, 30, 40, 50, 60]], &device), None);
    let b = full.forward(ids_tensor::<Flex>(&[vec![1, 11, 20, 30, 40, 50, 60]], &device), None);
    let last: Vec<f32> = (a - b).abs().max_dim(2).into_data().to_vec().unwrap();
    assert!(last[6] > 1e-4);
}

/// Mixed precision (autocast's split): half-precision matmuls on f32 weights give f32 logits close
/// to the f32 forward, leave the parameters f32, and decode with a KV cache as the full forward does.
#[test]
fn mixed_precision_forward_is_close_to_f32_and_keeps_f32_weights() {
    use burn::tensor::DType;
    use dipole_models::MixedPrecision;
    let device = Default::default();
    let (mut model, _) = CausalLm::<Flex>::load(tiny_llama(), &device).unwrap();
    let ids: Vec<u32> = vec![1, 403, 28, 410, 315, 272, 266, 500];
    let input = || ids_tensor::<Flex>(std::slice::from_ref(&ids), &device);
    let exact = model.forward(input(), None);
    let scale: f32 = exact.clone().abs().max().into_scalar();
    for (precision, tolerance) in [(MixedPrecision::Bf16, 0.05), (MixedPrecision::Fp16, 0.01)] {
        model.set_mixed_precision(precision);
        let logits = model.forward(input(), None);
        assert_eq!(logits.dtype(), DType::F32, "{precision}: logits dtype");
        assert_eq!(model.layers[0].self_attn.q_proj.weight.val().dtype(), DType::F32, "{precision}: weights stay f32");
        let diff: f32 = (exact.clone() - logits.clone()).abs().max().into_scalar();
        assert!(diff < tolerance * scale, "{precision}: logits differ from f32 by {diff} (max |logit| {scale})");
        assert!(diff > 0.0, "{precision}: no difference at all, so the matmuls did not run in half precision");

        let mut cache = KvCache::new(model.layers.len());
        let mut parts = vec![model.logits(model.forward_hidden(ids_tensor::<Flex>(&[ids[..5].to_vec()], &device), None, Some(&mut cache)))];
        for &t in &ids[5..] {
            parts.push(model.logits(model.forward_hidden(ids_tensor::<Flex>(&[vec![t]], &device), None, Some(&mut cache))));
        }
        let cached: f32 = (logits - Tensor::cat(parts, 1)).abs().max().into_scalar();
        assert!(cached < tolerance * scale, "{precision}: cached decoding differs by {cached}");
    }
}
