//! The trainer against TRL's 3-step goldens (full fine-tuning with and without clipping, LoRA from
//! PEFT's init), exact resume, accumulation, the reference cache, bad configs and NaN handling.

mod common;

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use common::{AD, fixtures, assert_steps_match, assert_tensors_close, golden_config_of, golden_of, goldens_of, trl_three_steps};
use dipole_train::{ReferenceStrategy, Resume, RunOptions, TrainConfig, train};
use serde_json::Value;

fn goldens() -> PathBuf {
    goldens_of("tiny-llama", "standard")
}

fn golden_config(out: &Path) -> TrainConfig {
    golden_config_of(out, "tiny-llama", "standard")
}

fn golden(name: &str) -> Value {
    golden_of("tiny-llama", "standard", name)
}

#[test]
fn full_finetune_with_clipping_matches_trl() {
    let dir = tempfile::tempdir().unwrap();
    // the sharded step, whatever the machine's core count (the next test pins the whole-graph step)
    let mut config = golden_config(dir.path());
    config.train.batch_shards = 2;
    let summary = train::<AD>(&config, &RunOptions::default(), &Default::default()).unwrap();
    assert_steps_match(&summary, &golden("train_full_clip1.json"));
    assert_tensors_close(&summary.final_dir.join("model/model.safetensors"), &goldens().join("full_after3/model.safetensors"));
    // logged metrics carry TRL's names
    let first = &summary.log_history[0];
    for key in ["loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/accuracies", "logps/chosen", "entropy", "num_tokens"] {
        assert!(first.contains_key(key), "{key} not logged");
    }
    let want_tokens = golden("train_full_clip1.json")["log_history"][0]["num_tokens"].as_f64().unwrap();
    assert_eq!(first["num_tokens"], want_tokens);
    assert!(dir.path().join("metrics.jsonl").exists());
}

#[test]
fn full_finetune_without_clipping_matches_trl() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = golden_config(dir.path());
    config.optim.max_grad_norm = 0.0;
    // every row whole in one graph, as TRL runs them (the test above shares prompts, the default)
    config.train.batch_shards = 1;
    config.train.prefix_sharing = false;
    let summary = train::<AD>(&config, &RunOptions::default(), &Default::default()).unwrap();
    assert_steps_match(&summary, &golden("train_full_noclip.json"));
}

#[test]
fn lora_from_peft_init_matches_trl() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = golden_config(dir.path());
    config.lora.enabled = true;
    config.lora.init_adapter = Some(goldens().join("lora_init"));
    let summary = train::<AD>(&config, &RunOptions::default(), &Default::default()).unwrap();
    assert_steps_match(&summary, &golden("train_lora.json"));
    assert_tensors_close(
        &summary.final_dir.join("adapter/adapter_model.safetensors"),
        &goldens().join("lora_after3/adapter_model.safetensors"),
    );
}

macro_rules! three_steps {
    ($($name:ident: $model:literal, $format:literal;)*) => {
        $(#[test] fn $name() { trl_three_steps($model, $format, 0); })*
    };
}

three_steps! {
    trl_steps_llama_conversational: "tiny-llama", "conversational";
    trl_steps_mistral_standard: "tiny-mistral", "standard";
    trl_steps_mistral_conversational: "tiny-mistral", "conversational";
    trl_steps_qwen2_standard: "tiny-qwen2", "standard";
    trl_steps_qwen2_conversational: "tiny-qwen2", "conversational";
    trl_steps_llama3_rope_standard: "tiny-llama3-rope", "standard";
    trl_steps_llama3_rope_conversational: "tiny-llama3-rope", "conversational";
}

fn final_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("final/model/model.safetensors")).unwrap()
}

#[test]
fn resumed_run_is_bit_identical() {
    let full = tempfile::tempdir().unwrap();
    let mut config = golden_config(full.path());
    config.train.max_steps = Some(4);
    config.data.shuffle = true;
    config.optim.lr_scheduler_type = dipole_train::schedule::SchedulerKind::Cosine;
    config.optim.warmup_steps = Some(1);
    train::<AD>(&config, &RunOptions::default(), &Default::default()).unwrap();

    let parts = tempfile::tempdir().unwrap();
    let mut config2 = config.clone();
    config2.train.output_dir = parts.path().to_path_buf();
    config2.train.save_steps = 2;
    let first = train::<AD>(&config2, &RunOptions { stop_after: Some(2), ..Default::default() }, &Default::default()).unwrap();
    assert_eq!(first.steps, 2);
    assert!(parts.path().join("checkpoint-2/trainer_state.json").exists());
    train::<AD>(&config2, &RunOptions { resume: Some(Resume::Latest), ..Default::default() }, &Default::default()).unwrap();
    assert!(final_bytes(full.path()) == final_bytes(parts.path()), "resumed weights differ from the uninterrupted run");
}

#[test]
fn accumulation_equals_a_larger_batch() {
    let a = tempfile::tempdir().unwrap();
    let mut big = golden_config(a.path());
    big.train.max_steps = Some(2);
    let big_run = train::<AD>(&big, &RunOptions::default(), &Default::default()).unwrap();
    let b = tempfile::tempdir().unwrap();
    let mut small = big.clone();
    small.train.output_dir = b.path().to_path_buf();
    small.train.batch_size = 2;
    small.train.gradient_accumulation_steps = 2;
    let small_run = train::<AD>(&small, &RunOptions::default(), &Default::default()).unwrap();
    assert_eq!(big_run.step_losses.len(), small_run.step_losses.len(), "steps run");
    for (x, y) in big_run.step_losses.iter().zip(&small_run.step_losses) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
    for (x, y) in big_run.grad_norms.iter().zip(&small_run.grad_norms) {
        assert!((x - y).abs() < 1e-5 * x, "grad norm {x} vs {y}");
    }
}

#[test]
fn precomputed_reference_gives_the_same_losses_and_is_reused() {
    let a = tempfile::tempdir().unwrap();
    let mut config = golden_config(a.path());
    config.lora.enabled = true;
    config.lora.init_adapter = Some(goldens().join("lora_init"));
    let live = train::<AD>(&config, &RunOptions::default(), &Default::default()).unwrap();

    let cache = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    config.train.output_dir = b.path().to_path_buf();
    config.train.reference = ReferenceStrategy::Precompute;
    config.train.cache_dir = Some(cache.path().to_path_buf());
    let pre = train::<AD>(&config, &RunOptions::default(), &Default::default()).unwrap();
    assert_eq!(live.step_losses.len(), pre.step_losses.len(), "steps run");
    for (x, y) in live.step_losses.iter().zip(&pre.step_losses) {
        assert!((x - y).abs() < 1e-6, "{x} vs {y}");
    }
    let files: Vec<_> = std::fs::read_dir(cache.path()).unwrap().flatten().filter(|e| e.file_name() != "file-digests.json").collect();
    assert_eq!(files.len(), 1, "one cache file");
    let stamp = files[0].metadata().unwrap().modified().unwrap();
    let c = tempfile::tempdir().unwrap();
    config.train.output_dir = c.path().to_path_buf();
    let again = train::<AD>(&config, &RunOptions::default(), &Default::default()).unwrap();
    assert_eq!(again.step_losses, pre.step_losses);
    assert_eq!(files[0].metadata().unwrap().modified().unwrap(), stamp, "the cache was reused, not rewritten");
}

#[test]
fn nan_loss_stops_with_the_step_and_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = golden_config(dir.path());
    config.optim.learning_rate = 1e30; // the first update destroys the weights
    config.train.save_steps = 1;
    let err = train::<AD>(&config, &RunOptions::default(), &Default::default()).unwrap_err().to_string();
    assert!(err.contains("step") && err.contains("records"), "{err}");
    assert!(err.contains("NaN") || err.contains("inf"), "{err}");
    // the poisoned step wrote no checkpoint; the one before it is intact
    let checkpoints: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name().to_string_lossy().to_string()).filter(|n| n.starts_with("checkpoint-")).collect();
    assert_eq!(checkpoints, vec!["checkpoint-1".to_string()], "{checkpoints:?}");
}

#[test]
fn bad_configs_name_the_key() {
    let err = TrainConfig::from_toml("[train]\nbatch_size = 0\n", "run.toml").unwrap_err().to_string();
    assert!(err.contains("train.batch_size"), "{err}");
    let err = TrainConfig::from_toml("[lora]\nenabled = true\ndropout = 2.0\n", "run.toml").unwrap_err().to_string();
    assert!(err.contains("lora.dropout"), "{err}");
    let err = TrainConfig::from_toml("[objective]\nbeta = -1.0\n", "run.toml").unwrap_err().to_string();
    assert!(err.contains("beta"), "{err}");
}

#[test]
fn evaluation_and_generations_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = golden_config(dir.path());
    config.train.max_steps = Some(2);
    config.data.eval_fraction = 0.125;
    config.train.eval_steps = 1;
    config.train.generations = 2;
    config.train.max_new_tokens = 5;
    config.lora.enabled = true;
    let summary = train::<AD>(&config, &RunOptions::default(), &Default::default()).unwrap();
    let eval = summary.final_eval.expect("eval metrics");
    for key in ["eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen"] {
        assert!(eval.contains_key(key), "{key} missing");
    }
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("eval_loss")).count(), 3, "eval at steps 1, 2 and the end");
    let gens = std::fs::read_to_string(dir.path().join("generations.jsonl")).unwrap();
    let lines: Vec<Value> = gens.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0]["prompt"].as_str().is_some() && lines[0]["policy"].as_str().is_some() && lines[0]["reference"].as_str().is_some());
    assert!(!dir.path().join("plots").exists(), "plots are the CLI's, written from the summary's log_history");
    assert_eq!(summary.log_history.iter().filter(|l| l.contains_key("eval_loss")).count(), 3, "{:?}", summary.log_history);
}

#[test]
fn tr_dpo_sync_moves_the_reference_and_resumes_exactly() {
    // alpha 1, every step: the reference is always the policy of the step before, so every step
    // starts at policy = reference and its sigmoid loss is ln 2.
    let dir = tempfile::tempdir().unwrap();
    let mut config = golden_config(dir.path());
    config.train.sync_ref_model = true;
    config.train.ref_model_mixup_alpha = 1.0;
    config.train.ref_model_sync_steps = 1;
    let run = train::<AD>(&config, &RunOptions::default(), &Default::default()).unwrap();
    for loss in &run.step_losses {
        assert!((loss - std::f64::consts::LN_2).abs() < 1e-6, "{:?}", run.step_losses);
    }
    // without the sync the later steps move away from ln 2
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = train::<AD>(&golden_config(plain_dir.path()), &RunOptions::default(), &Default::default()).unwrap();
    assert!(plain.step_losses[1..].iter().all(|l| (l - std::f64::consts::LN_2).abs() > 1e-4), "{:?}", plain.step_losses);
    // alpha 0 keeps the initial reference: the plain run's losses
    let still = tempfile::tempdir().unwrap();
    let mut frozen = config.clone();
    frozen.train.output_dir = still.path().to_path_buf();
    frozen.train.ref_model_mixup_alpha = 0.0;
    assert_eq!(train::<AD>(&frozen, &RunOptions::default(), &Default::default()).unwrap().step_losses, plain.step_losses);

    // the moving reference is part of the checkpoint
    let parts = tempfile::tempdir().unwrap();
    let mut resumed = config.clone();
    resumed.train.output_dir = parts.path().to_path_buf();
    resumed.train.ref_model_mixup_alpha = 0.5;
    resumed.train.save_steps = 1;
    let mut whole = resumed.clone();
    let whole_dir = tempfile::tempdir().unwrap();
    whole.train.output_dir = whole_dir.path().to_path_buf();
    let whole_run = train::<AD>(&whole, &RunOptions::default(), &Default::default()).unwrap();
    train::<AD>(&resumed, &RunOptions { stop_after: Some(2), ..Default::default() }, &Default::default()).unwrap();
    assert!(parts.path().join("checkpoint-2/reference/model.safetensors").exists());
    let rest = train::<AD>(&resumed, &RunOptions { resume: Some(Resume::Latest), ..Default::default() }, &Default::default()).unwrap();
    assert_eq!(rest.step_losses.last(), whole_run.step_losses.last());
    assert!(final_bytes(whole_dir.path()) == final_bytes(parts.path()), "resumed TR-DPO weights differ");

    let mut lora = config.clone();
    lora.lora.enabled = true;
    let err = train::<AD>(&lora, &RunOptions::default(), &Default::default()).unwrap_err().to_string();
    assert!(err.contains("sync_ref_model"), "{err}");
}

#[test]
fn sft_from_scratch_on_prompt_completion_rows() {
    let dir = tempfile::tempdir().unwrap();
    // prompt-completion rows from the fixture pairs' chosen side
    let pairs = std::fs::read_to_string(fixtures().join("data/prefs_standard.jsonl")).unwrap();
    let rows: Vec<String> = pairs
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            serde_json::json!({"prompt": v["prompt"], "completion": v["chosen"]}).to_string()
        })
        .collect();
    let data = dir.path().join("sft.jsonl");
    std::fs::write(&data, rows.join("\n")).unwrap();
    let mut config = golden_config(&dir.path().join("run"));
    config.train.stage = dipole_train::Stage::Sft;
    config.model.from_scratch = true;
    config.data.train = data;
    config.train.max_steps = Some(6);
    config.optim.learning_rate = 1e-2;
    config.train.final_dir = Some(dir.path().join("base"));
    let run = train::<AD>(&config, &RunOptions::default(), &Default::default()).unwrap();
    assert!(run.step_losses[5] < run.step_losses[0] - 0.5, "SFT loss should fall: {:?}", run.step_losses);
    // random init starts near the uniform NLL ln(vocab)
    assert!((run.step_losses[0] - (512f64).ln()).abs() < 1.0, "{:?}", run.step_losses);
    let (trained, _) = dipole_models::CausalLm::<Flex>::load(dir.path().join("base/model"), &Default::default()).unwrap();
    assert_eq!(trained.config.vocab_size, 512);
    assert!(dir.path().join("base/model/tokenizer.json").exists(), "tokenizer files travel with the model");
    let log = &run.log_history[0];
    assert!(log.contains_key("mean_token_accuracy") && log.contains_key("entropy"), "{log:?}");

    let mut lora = config.clone();
    lora.lora.enabled = true;
    assert!(train::<AD>(&lora, &RunOptions::default(), &Default::default()).unwrap_err().to_string().contains("from_scratch"));
}

#[test]
fn kto_trains_on_pairs_split_into_unpaired_rows() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = golden_config(dir.path());
    config.objective.loss_type = vec![dipole_loss::LossType::Kto];
    let run = train::<AD>(&config, &RunOptions::default(), &Default::default()).unwrap();
    // policy = reference at step 1: every log-ratio and the KL estimate are 0, each row loses 1 − σ(0)
    assert!((run.step_losses[0] - 0.5).abs() < 1e-6, "{:?}", run.step_losses);
    assert!(run.step_losses[2] < run.step_losses[0], "{:?}", run.step_losses);
    let log = &run.log_history[2];
    for key in ["kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"] {
        assert!(log.contains_key(key), "{key} missing from {log:?}");
    }
    // class counts only weight the pooling (TRL does not log them)
    assert!(!log.contains_key("count/chosen"), "{log:?}");
    // the same run from a precomputed reference (log-probs of examples and their KL partners)
    let cached = tempfile::tempdir().unwrap();
    let mut precomputed = config.clone();
    precomputed.train.output_dir = cached.path().to_path_buf();
    precomputed.train.reference = ReferenceStrategy::Precompute;
    let again = train::<AD>(&precomputed, &RunOptions::default(), &Default::default()).unwrap();
    assert_eq!(run.step_losses.len(), again.step_losses.len(), "steps run");
    for (a, b) in run.step_losses.iter().zip(&again.step_losses) {
        assert!((a - b).abs() < 1e-6, "{:?} vs {:?}", run.step_losses, again.step_losses);
    }
}

#[test]
fn gradient_checkpointing_matches_trl_too() {
    // burn's balanced checkpointing recomputes memory-bound activations in the backward pass
    type Checkpointed = Autodiff<Flex, burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing>;
    let dir = tempfile::tempdir().unwrap();
    let mut config = golden_config(dir.path());
    config.train.batch_shards = 2;
    config.train.gradient_checkpointing = dipole_train::GradientCheckpointing::Balanced;
    let summary = train::<Checkpointed>(&config, &RunOptions::default(), &Default::default()).unwrap();
    assert_steps_match(&summary, &golden("train_full_clip1.json"));
    assert_tensors_close(&summary.final_dir.join("model/model.safetensors"), &goldens().join("full_after3/model.safetensors"));
}

/// `train.gradient_checkpointing = true` (per-layer recompute): TRL's three steps and final weights,
/// sharded and whole, full fine-tuning and LoRA.
#[test]
fn layer_recompute_matches_trl() {
    for shards in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = golden_config(dir.path());
        config.train.batch_shards = shards;
        config.train.gradient_checkpointing = dipole_train::GradientCheckpointing::Layers;
        let summary = train::<AD>(&config, &RunOptions::default(), &Default::default()).unwrap();
        assert_steps_match(&summary, &golden("train_full_clip1.json"));
        assert_tensors_close(&summary.final_dir.join("model/model.safetensors"), &goldens().join("full_after3/model.safetensors"));
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config = golden_config(dir.path());
    config.lora.enabled = true;
    config.lora.init_adapter = Some(goldens().join("lora_init"));
    config.train.gradient_checkpointing = dipole_train::GradientCheckpointing::Layers;
    let summary = train::<AD>(&config, &RunOptions::default(), &Default::default()).unwrap();
    assert_steps_match(&summary, &golden("train_lora.json"));
    assert_tensors_close(&summary.final_dir.join("adapter/adapter_model.safetensors"), &goldens().join("lora_after3/adapter_model.safetensors"));
}

/// `model.dtype = "auto"` on a bf16 checkpoint: the LoRA base stays bf16 and the run is the one
/// with the base held in f32 (`model.dtype = "f32"`), step for step, with and without per-layer
/// recompute; a full fine-tuning run's frozen reference copy is held in bf16 the same way.
#[test]
fn a_bf16_base_trains_as_its_f32_copy_does() {
    let bf16 = tempfile::tempdir().unwrap();
    let (fixture, _) = dipole_models::CausalLm::<Flex>::load(common::fixtures().join("tiny-llama"), &Default::default()).unwrap();
    fixture.save_hf(bf16.path(), dipole_models::ExportDtype::BF16, usize::MAX, Some(&common::fixtures().join("tiny-llama"))).unwrap();
    let run = |lora: bool, dtype: dipole_train::WeightDtype, checkpointing: dipole_train::GradientCheckpointing| {
        let dir = tempfile::tempdir().unwrap();
        let mut config = golden_config(dir.path());
        config.model.path = bf16.path().to_path_buf();
        config.model.dtype = dtype;
        config.lora.enabled = lora;
        config.train.gradient_checkpointing = checkpointing;
        train::<AD>(&config, &RunOptions::default(), &Default::default()).unwrap().step_losses
    };
    use dipole_train::{GradientCheckpointing as Gc, WeightDtype};
    for (lora, checkpointing) in [(true, Gc::Off), (true, Gc::Layers), (false, Gc::Off)] {
        let (want, got) = (run(lora, WeightDtype::F32, checkpointing), run(lora, WeightDtype::Auto, checkpointing));
        assert_eq!(want.len(), 3);
        for (w, g) in want.iter().zip(&got) {
            assert!((w - g).abs() <= 1e-6 * w.abs().max(1.0), "LoRA {lora}, {checkpointing:?}: losses {got:?} vs {want:?}");
        }
    }
}

/// `train.mixed_precision`: bf16 / fp16 matmuls on f32 master weights follow TRL's fp32 run to
/// half-precision accuracy, the saved weights stay f32, and fp16's loss scale is checkpointed.
#[test]
fn mixed_precision_tracks_the_fp32_run() {
    use dipole_models::MixedPrecision;
    let golden = golden("train_full_clip1.json");
    let want: Vec<f64> = golden["step_losses_exact"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    for (precision, tolerance) in [(MixedPrecision::Bf16, 1e-2), (MixedPrecision::Fp16, 2e-3)] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = golden_config(dir.path());
        config.train.mixed_precision = precision;
        config.train.save_steps = 3;
        config.train.batch_shards = 2;
        let summary = train::<AD>(&config, &RunOptions::default(), &Default::default()).unwrap();
        assert_eq!(summary.step_losses.len(), 3, "{precision}: steps run");
        eprintln!("{precision}: losses {:?} (fp32 {want:?})", summary.step_losses);
        assert_eq!(summary.step_losses.len(), want.len(), "{precision}: steps run");
        for (k, (got, want)) in summary.step_losses.iter().zip(&want).enumerate() {
            assert!((got - want).abs() <= tolerance, "{precision} step {k}: loss {got} vs fp32 {want}");
        }
        // step 0: policy == reference in the same precision, so exactly ln 2 as in fp32
        assert!((summary.step_losses[0] - std::f64::consts::LN_2).abs() < 1e-7, "{precision}: step 0 loss {}", summary.step_losses[0]);
        assert!(summary.step_losses[1..] != want[1..], "{precision}: losses equal fp32's exactly; half precision was not used");
        let bytes = std::fs::read(summary.final_dir.join("model/model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert!(st.tensors().iter().all(|(_, t)| t.dtype() == safetensors::Dtype::F32), "{precision}: master weights saved as f32");
        let state: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("checkpoint-3/trainer_state.json")).unwrap()).unwrap();
        match precision {
            MixedPrecision::Fp16 => assert_eq!(state["loss_scaler"]["scale"].as_f64(), Some(dipole_train::scaler::INIT_SCALE)),
            _ => assert!(state["loss_scaler"].is_null()),
        }
        assert_eq!(state["batch_shards"].as_u64(), Some(2), "{precision}: the shard count is recorded");
    }
}

/// Reference log-probs cached by an f32 run are not reused by a bf16 run (and the other way round).
#[test]
fn reference_cache_key_depends_on_the_precision() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = golden_config(dir.path());
    let f32_key = dipole_train::precompute::CacheInputs::of(&config, &[], &[], None).unwrap().key();
    config.train.mixed_precision = dipole_models::MixedPrecision::Bf16;
    let bf16_key = dipole_train::precompute::CacheInputs::of(&config, &[], &[], None).unwrap().key();
    assert_ne!(f32_key, bf16_key);
}

/// A copy of `model` whose last tensor (`model.norm.weight`, far past the file's first MiB in a
/// real checkpoint) is scaled by 1.5: same names, shapes and file size, other log-probs.
fn model_with_scaled_norm(model: &Path, out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    for entry in std::fs::read_dir(model).unwrap().flatten() {
        std::fs::copy(entry.path(), out.join(entry.file_name())).unwrap();
    }
    let bytes = std::fs::read(model.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor("model.norm.weight").unwrap();
    let scaled: Vec<u8> = view
        .data()
        .chunks_exact(4)
        .flat_map(|c| (f32::from_le_bytes(c.try_into().unwrap()) * 1.5).to_le_bytes())
        .collect();
    // the tensor's bytes sit at the same place in the copy: find them and overwrite in place
    let start = bytes.windows(scaled.len()).position(|w| w == view.data()).unwrap();
    let mut copy = bytes.clone();
    copy[start..start + scaled.len()].copy_from_slice(&scaled);
    std::fs::write(out.join("model.safetensors"), &copy).unwrap();
    assert_eq!(copy.len(), bytes.len());
}

#[test]
fn the_reference_cache_never_serves_another_models_log_probs() {
    let cache = tempfile::tempdir().unwrap();
    let run = |model: &Path| {
        let out = tempfile::tempdir().unwrap();
        let mut config = golden_config(out.path());
        config.model.path = model.to_path_buf();
        config.train.max_steps = Some(1);
        config.train.reference = ReferenceStrategy::Precompute;
        config.train.cache_dir = Some(cache.path().to_path_buf());
        train::<AD>(&config, &RunOptions::default(), &Default::default()).unwrap()
    };
    let original = fixtures().join("tiny-llama");
    let copy_dir = tempfile::tempdir().unwrap();
    let copy = copy_dir.path().join("model");
    model_with_scaled_norm(&original, &copy);
    // policy = reference at step 0: the loss is ln 2 exactly when the reference is the right model
    for model in [&original, &copy] {
        let summary = run(model);
        assert!((summary.step_losses[0] - std::f64::consts::LN_2).abs() < 1e-6, "{}: step-0 loss {}", model.display(), summary.step_losses[0]);
    }
    let caches: Vec<_> = std::fs::read_dir(cache.path()).unwrap().flatten().filter(|e| e.file_name() != "file-digests.json").collect();
    assert_eq!(caches.len(), 2, "one cache per model");
    // a cache file whose stored inputs are not the run's is recomputed, not trusted
    let text = std::fs::read_to_string(caches[0].path()).unwrap();
    let mut cache_json: Value = serde_json::from_str(&text).unwrap();
    cache_json["inputs"]["train_pairs"] = Value::from(1);
    std::fs::write(caches[0].path(), cache_json.to_string()).unwrap();
    std::fs::write(caches[1].path(), "{ garbled").unwrap();
    for model in [&original, &copy] {
        let summary = run(model);
        assert!((summary.step_losses[0] - std::f64::consts::LN_2).abs() < 1e-6, "{}: step-0 loss {}", model.display(), summary.step_losses[0]);
    }
}

/// The same three steps split into 3 shards on 3 threads and into 1 shard on 1 thread: other
/// summation orders must stay within the goldens' tolerances too.
#[test]
fn other_shard_and_thread_counts_match_trl() {
    for (threads, shards) in [(3, 3), (1, 1)] {
        let pool = rayon_core::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| trl_three_steps("tiny-qwen2", "standard", shards));
    }
}
