//! Parity with TRL 1.16 / transformers 5.24 goldens (`fixtures/goldens`): token ids, dropped records
//! and per-sequence / per-token log-probs for every tiny checkpoint, base and perturbed.

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use dipole_data::{LengthOptions, Tokenizer, TruncationMode, load_pairs};
use dipole_models::CausalLm;
use dipole_train::pair_logps;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn check(model_name: &str, format: &str) {
    let root = fixtures();
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join(format!("goldens/{model_name}/{format}/examples.json"))).unwrap(),
    )
    .unwrap();
    let examples = golden["examples"].as_array().unwrap();
    let data = root.join(format!("data/prefs_{format}.jsonl"));
    let lengths = LengthOptions {
        max_length: Some(128),
        truncation: TruncationMode::KeepStart,
        ..Default::default()
    };
    let device = Default::default();
    for (variant, prefix) in [(model_name.to_string(), "ref"), (format!("{model_name}-perturbed"), "policy")] {
        let dir = root.join(&variant);
        let tokenizer = Tokenizer::from_dir(&dir).unwrap();
        let prepared = load_pairs(&data, &tokenizer, lengths).unwrap();
        let dropped: Vec<usize> = golden["dropped_indices"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(prepared.dropped, dropped, "{variant}/{format}: dropped indices");
        assert_eq!(prepared.pairs.len(), examples.len(), "{variant}/{format}: kept pairs");
        for (pair, ex) in prepared.pairs.iter().zip(examples) {
            let i = pair.index;
            assert_eq!(i as u64, ex["index"].as_u64().unwrap());
            let t = &prepared.tokenized[i];
            assert_eq!(t.prompt_ids, ids(&ex["prompt_ids"]), "{variant}/{format} #{i}: prompt_ids");
            assert_eq!(t.chosen_ids, ids(&ex["chosen_ids"]), "{variant}/{format} #{i}: chosen_ids");
            assert_eq!(t.rejected_ids, ids(&ex["rejected_ids"]), "{variant}/{format} #{i}: rejected_ids");
            assert_eq!(pair.chosen.input_ids, ids(&ex["chosen_input_ids"]), "#{i} chosen_input_ids");
            assert_eq!(pair.rejected.input_ids, ids(&ex["rejected_input_ids"]), "#{i} rejected_input_ids");
            let mask = |m: &[u8]| m.iter().map(|&x| x as u32).collect::<Vec<_>>();
            assert_eq!(mask(&pair.chosen.completion_mask), ids(&ex["chosen_completion_mask"]), "#{i} chosen mask");
            assert_eq!(mask(&pair.rejected.completion_mask), ids(&ex["rejected_completion_mask"]), "#{i} rejected mask");
        }

        let (model, _) = CausalLm::<Flex>::load(&dir, &device).unwrap();
        let logps = pair_logps(&model, &prepared.pairs, 4, tokenizer.pad_id(), &device);
        let mut worst = 0.0f64;
        for (lp, ex) in logps.iter().zip(examples) {
            let i = lp.index;
            for (side, sum, tokens) in [("chosen", lp.chosen, &lp.chosen_tokens), ("rejected", lp.rejected, &lp.rejected_tokens)] {
                let want = ex[format!("{prefix}_{side}_logps")].as_f64().unwrap();
                let diff = (sum - want).abs();
                worst = worst.max(diff);
                assert!(diff < 1e-4, "{variant}/{format} #{i} {side}: {sum} vs {want}");
                let want_tokens = floats(&ex[format!("{prefix}_{side}_token_logps")]);
                assert_eq!(tokens.len(), want_tokens.len(), "#{i} {side}: completion token count");
                for (k, (a, b)) in tokens.iter().zip(&want_tokens).enumerate() {
                    assert!((*a as f64 - b).abs() < 1e-4, "{variant}/{format} #{i} {side} token {k}: {a} vs {b}");
                }
            }
        }
        eprintln!("{variant}/{format}: worst summed log-prob difference {worst:.2e}");
    }
}

macro_rules! parity {
    ($($name:ident: $model:literal, $format:literal;)*) => {
        $(#[test] fn $name() { check($model, $format); })*
    };
}

parity! {
    llama_standard: "tiny-llama", "standard";
    mistral_standard: "tiny-mistral", "standard";
    qwen2_standard: "tiny-qwen2", "standard";
    llama3_rope_standard: "tiny-llama3-rope", "standard";
    llama_conversational: "tiny-llama", "conversational";
    mistral_conversational: "tiny-mistral", "conversational";
    qwen2_conversational: "tiny-qwen2", "conversational";
    llama3_rope_conversational: "tiny-llama3-rope", "conversational";
}
