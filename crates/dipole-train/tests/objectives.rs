//! Every objective of `losses.json` (TRL 1.16 goldens) on every tiny checkpoint and both data
//! formats: loss and every metric within 1e-5 relative (1e-6 absolute near zero).

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use dipole_data::{LengthOptions, PreferenceBatch, Tokenizer, TruncationMode, load_pairs};
use dipole_loss::{FDivergence, LossType, ObjectiveConfig, ObjectiveState, PairInputs, preference_loss, preference_metrics, sequence_logps, token_stats};
use dipole_models::CausalLm;
use dipole_train::BatchTensors;
use serde_json::Value;

type B = Flex;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn config_from(golden: &Value) -> ObjectiveConfig {
    let c = &golden["config"];
    ObjectiveConfig {
        loss_type: c["loss_type"].as_array().unwrap().iter().map(|t| LossType::parse(t.as_str().unwrap()).unwrap()).collect(),
        loss_weights: c["loss_weights"].as_array().map(|w| w.iter().map(|x| x.as_f64().unwrap()).collect()).unwrap_or_default(),
        beta: c["beta"].as_f64().unwrap(),
        label_smoothing: c["label_smoothing"].as_f64().unwrap(),
        f_divergence_type: serde_json::from_value::<FDivergence>(c["f_divergence_type"].clone()).unwrap(),
        f_alpha_divergence_coef: c["f_alpha_divergence_coef"].as_f64().unwrap(),
        use_weighting: c["use_weighting"].as_bool().unwrap(),
        ld_alpha: c["ld_alpha"].as_f64(),
        discopop_tau: c["discopop_tau"].as_f64().unwrap(),
        rpo_alpha: None,
    }
}

struct BatchData {
    indices: Vec<usize>,
    inputs: PairInputs<B>,
    stats: dipole_loss::TokenStats,
}

fn batches(model_name: &str, format: &str) -> Vec<BatchData> {
    let root = fixtures();
    let device = Default::default();
    let tokenizer = Tokenizer::from_dir(root.join(model_name)).unwrap();
    let lengths = LengthOptions { max_length: Some(128), truncation: TruncationMode::KeepStart };
    let prepared = load_pairs(&root.join(format!("data/prefs_{format}.jsonl")), &tokenizer, lengths).unwrap();
    let (reference, _) = CausalLm::<B>::load(root.join(model_name), &device).unwrap();
    let (policy, _) = CausalLm::<B>::load(root.join(format!("{model_name}-perturbed")), &device).unwrap();
    let mut out = Vec::new();
    for chunk in prepared.pairs.chunks(4) {
        let batch = PreferenceBatch::new(chunk, tokenizer.pad_id());
        let t = BatchTensors::<B>::new(&batch, &device);
        let b = chunk.len();
        let logits = policy.forward(t.input_ids.clone(), Some(t.attention_mask.clone()));
        let stats = token_stats(logits.clone(), t.input_ids.clone(), t.completion_mask.clone());
        let pol = exact_sums(sequence_logps(logits, t.input_ids.clone(), t.completion_mask.clone()).per_token);
        let ref_logits = reference.forward(t.input_ids.clone(), Some(t.attention_mask.clone()));
        let rf = exact_sums(sequence_logps(ref_logits, t.input_ids.clone(), t.completion_mask.clone()).per_token);
        let lens: Vec<f32> = batch.completion_lengths().iter().map(|&l| l as f32).collect();
        let lens = Tensor::<B, 1>::from_data(TensorData::new(lens, [2 * b]), &device);
        out.push(BatchData {
            indices: batch.indices.clone(),
            inputs: PairInputs {
                chosen_logps: pol.clone().narrow(0, 0, b),
                rejected_logps: pol.narrow(0, b, b),
                ref_chosen_logps: Some(rf.clone().narrow(0, 0, b)),
                ref_rejected_logps: Some(rf.narrow(0, b, b)),
                chosen_lengths: lens.clone().narrow(0, 0, b),
                rejected_lengths: lens.narrow(0, b, b),
                chosen_weights: None,
                rejected_weights: None,
            },
            stats,
        });
    }
    out
}

/// Row sums of per-token log-probs taken in f64 (see `dipole_train::PairLogps`), back as f32.
fn exact_sums(per_token: Tensor<B, 2>) -> Tensor<B, 1> {
    let [rows, width] = per_token.dims();
    let v: Vec<f32> = per_token.into_data().to_vec().unwrap();
    let sums: Vec<f32> = (0..rows).map(|r| v[r * width..(r + 1) * width].iter().map(|&x| x as f64).sum::<f64>() as f32).collect();
    Tensor::from_data(TensorData::new(sums, [rows]), &Default::default())
}

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-5 * want.abs() || (got - want).abs() <= 1e-6
}

/// `rewards/*` are β times differences of summed log-probs near -700; the goldens' own f32 sums
/// carry up to 9.3e-5 of rounding (against the exact sum of their per-token values), so a reward
/// is only defined to about β·1e-4 = 1e-5 absolute.
fn close_reward(got: f64, want: f64) -> bool {
    close(got, want) || (got - want).abs() <= 1e-5
}

fn check(model_name: &str, format: &str) {
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("goldens/{model_name}/{format}/losses.json"))).unwrap(),
    )
    .unwrap();
    let data = batches(model_name, format);
    let mut failures = Vec::new();
    for (name, entry) in golden["losses"].as_object().unwrap() {
        let config = config_from(entry);
        let mut state = ObjectiveState::default();
        for (k, (gb, ours)) in entry["batches"].as_array().unwrap().iter().zip(&data).enumerate() {
            let indices: Vec<usize> = gb["indices"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            assert_eq!(indices, ours.indices, "{name} batch {k}: indices");
            let out = preference_loss(&config, &ours.inputs, &mut state);
            let loss: f64 = out.loss.clone().into_scalar() as f64;
            let want = gb["loss"].as_f64().unwrap();
            if !close(loss, want) {
                failures.push(format!("{name} batch {k}: loss {loss} vs {want}"));
            }
            let metrics = preference_metrics(&out, &ours.inputs, Some(&ours.stats));
            for (key, want) in gb["metrics"].as_object().unwrap() {
                let want = want.as_f64().unwrap();
                match metrics.get(key) {
                    Some(&got) if close(got, want) => {}
                    Some(&got) if key.starts_with("rewards/") && close_reward(got, want) => {}
                    Some(&got) => failures.push(format!("{name} batch {k}: {key} {got} vs {want}")),
                    None => failures.push(format!("{name} batch {k}: metric {key} missing")),
                }
            }
        }
    }
    assert!(failures.is_empty(), "{model_name}/{format}: {} mismatches:\n{}", failures.len(), failures.join("\n"));
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
