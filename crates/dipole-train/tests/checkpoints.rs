//! The same weights stored differently (bf16, sharded with an index) load to the same log-probs.

mod common;

use std::collections::HashMap;
use common::{fixtures, read_f32_tensors};
use std::path::Path;

use burn::backend::Flex;
use dipole_data::{LengthOptions, Tokenizer, TruncationMode, load_pairs};
use dipole_models::CausalLm;
use dipole_train::{PairLogps, pair_logps};
use safetensors::{Dtype, tensor::TensorView};

/// Copies the non-weight files of `src` into a fresh temporary folder.
fn copy_model_files(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(src.join(name), dir.path().join(name)).unwrap();
    }
    dir
}

fn logps_of(dir: &Path) -> Vec<PairLogps> {
    let tokenizer = Tokenizer::from_dir(dir).unwrap();
    let lengths = LengthOptions { max_length: Some(128), truncation: TruncationMode::KeepStart, ..Default::default() };
    let prepared = load_pairs(&fixtures().join("data/prefs_standard.jsonl"), &tokenizer, lengths).unwrap();
    let device = Default::default();
    let (model, _) = CausalLm::<Flex>::load(dir, &device).unwrap();
    pair_logps(&model, &prepared.pairs[..12], 4, tokenizer.pad_id(), &device)
}

#[test]
fn bf16_checkpoint_matches_f32_within_bf16_tolerance() {
    let src = fixtures().join("tiny-llama");
    let dir = copy_model_files(&src);
    let tensors = read_f32_tensors(&src.join("model.safetensors"));
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, TensorView)> = encoded
        .iter()
        .map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::BF16, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();

    let want = logps_of(&src);
    let got = logps_of(dir.path());
    for (a, b) in got.iter().zip(&want) {
        // bf16 keeps ~3 significant digits per weight; summed log-probs of up to ~100 tokens move
        // by well under 1% of their magnitude.
        for (x, y) in [(a.chosen, b.chosen), (a.rejected, b.rejected)] {
            assert!((x - y).abs() <= 0.01 * y.abs() + 0.05, "#{}: bf16 {x} vs f32 {y}", a.index);
        }
    }
    assert_ne!(got, want, "the bf16 copy should not be bit-identical");
}

#[test]
fn two_shard_checkpoint_is_identical() {
    let src = fixtures().join("tiny-llama");
    let dir = copy_model_files(&src);
    let tensors = read_f32_tensors(&src.join("model.safetensors"));
    let half_point = tensors.len() / 2;
    let mut weight_map = HashMap::new();
    for (shard, part) in [&tensors[..half_point], &tensors[half_point..]].iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", shard + 1);
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> =
            part.iter().map(|(n, s, v)| (n.clone(), s.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
        let views: Vec<(String, TensorView)> =
            bytes.iter().map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
        safetensors::serialize_to_file(views, None, &dir.path().join(&file)).unwrap();
        for (n, _, _) in part.iter() {
            weight_map.insert(n.clone(), file.clone());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_eq!(logps_of(dir.path()), logps_of(&src));
}
