//! LoRA against PEFT: adapters PEFT wrote load to the same log-probs, ours round-trip, merge and
//! export keep the function, and the reference modes compute what they promise.

mod common;

use common::fixtures;
use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use dipole_data::{LengthOptions, PairInputs, Tokenizer, TruncationMode, load_pairs};
use dipole_lora::{AdapterMode, LoraConfig, TargetModules};
use dipole_models::{CausalLm, ExportDtype};
use dipole_train::{PairLogps, pair_logps};
use serde_json::Value;

fn goldens() -> PathBuf {
    common::goldens_of("tiny-llama", "standard")
}

fn batch0() -> (Vec<PairInputs>, u32) {
    let tokenizer = Tokenizer::from_dir(fixtures().join("tiny-llama")).unwrap();
    let lengths = LengthOptions { max_length: Some(128), truncation: TruncationMode::KeepStart, ..Default::default() };
    let prepared = load_pairs(&fixtures().join("data/prefs_standard.jsonl"), &tokenizer, lengths).unwrap();
    (prepared.pairs[..4].to_vec(), tokenizer.pad_id())
}

fn base() -> CausalLm<Flex> {
    CausalLm::<Flex>::load(fixtures().join("tiny-llama"), &Default::default()).unwrap().0
}

fn logps(model: &CausalLm<Flex>) -> Vec<PairLogps> {
    let (pairs, pad) = batch0();
    pair_logps(model, &pairs, 4, pad, &Default::default())
}

fn assert_close(a: &[PairLogps], b: &[PairLogps], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: pair count");
    for (x, y) in a.iter().zip(b) {
        assert!((x.chosen - y.chosen).abs() <= tol && (x.rejected - y.rejected).abs() <= tol, "{what}: {x:?} vs {y:?}");
    }
}

#[test]
fn peft_random_adapter_reproduces_peft_logps() {
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(goldens().join("lora_forward.json")).unwrap()).unwrap();
    let mut model = base();
    let config = model.load_adapter(&goldens().join("lora_random")).unwrap();
    assert_eq!(config.scale(), 2.0);
    let got = logps(&model);
    for (k, lp) in got.iter().enumerate() {
        let want_c = golden["policy_chosen_logps"][k].as_f64().unwrap();
        let want_r = golden["policy_rejected_logps"][k].as_f64().unwrap();
        assert!((lp.chosen - want_c).abs() < 1e-4, "#{k} chosen {} vs {want_c}", lp.chosen);
        assert!((lp.rejected - want_r).abs() < 1e-4, "#{k} rejected {} vs {want_r}", lp.rejected);
    }
    // disabling the adapter gives the base model exactly
    model.set_adapter_mode(AdapterMode::Disabled);
    assert_eq!(logps(&model), logps(&base()));
}

#[test]
fn peft_init_adapter_leaves_the_model_unchanged() {
    let mut model = base();
    model.load_adapter(&goldens().join("lora_init")).unwrap();
    assert_eq!(logps(&model), logps(&base()));
}

#[test]
fn saved_adapter_loads_back_identically() {
    let mut model = base();
    let config = model.load_adapter(&goldens().join("lora_random")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save_adapter(dir.path(), &config).unwrap();
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(saved["peft_type"], "LORA");
    assert_eq!(saved["task_type"], "CAUSAL_LM");
    let mut again = base();
    again.load_adapter(dir.path()).unwrap();
    assert_eq!(logps(&again), logps(&model));
}

#[test]
fn merge_unmerge_and_merged_export() {
    let mut model = base();
    model.load_adapter(&goldens().join("lora_random")).unwrap();
    let adapted = logps(&model);
    let base_weights = base().hf_tensors();

    model.merge_adapters();
    assert_close(&logps(&model), &adapted, 1e-4, "merged");
    model.unmerge_adapters();
    for (name, linear) in model.linears() {
        let w: Vec<f32> = linear.weight.val().into_data().to_vec().unwrap();
        let (_, _, orig) = base_weights.iter().find(|(n, _, _)| *n == format!("{name}.weight")).unwrap();
        let [i, o] = linear.weight.dims();
        let orig_t = dipole_lora::transpose(orig, o, i);
        let worst = w.iter().zip(&orig_t).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst <= 1e-6, "{name}: unmerge differs by {worst}");
    }

    let dir = tempfile::tempdir().unwrap();
    model.save_hf(dir.path(), ExportDtype::F32, 200_000, Some(&fixtures().join("tiny-llama"))).unwrap();
    assert!(dir.path().join("model.safetensors.index.json").exists(), "small shards force an index");
    let (exported, _) = CausalLm::<Flex>::load(dir.path(), &Default::default()).unwrap();
    assert_close(&logps(&exported), &adapted, 1e-4, "exported");
}

/// `merge_checkpoint` (what `cargo xtask export` runs) merges tensor by tensor from the files: the
/// weights of the in-memory merge within f32 rounding, the log-probs of the adapted model, the
/// base's stored dtype by default (bf16 stays bf16), and an adapter that does not fit is an error
/// naming its module.
#[test]
fn streaming_export_equals_the_in_memory_merge() {
    let adapter = goldens().join("lora_random");
    let mut model = base();
    model.load_adapter(&adapter).unwrap();
    let adapted = logps(&model);
    let want = model.into_merged().hf_tensors();
    let dir = tempfile::tempdir().unwrap();
    let written = dipole_models::merge_checkpoint(&fixtures().join("tiny-llama"), Some(&adapter), dir.path(), None, 200_000).unwrap();
    assert_eq!(written, ExportDtype::F32, "the fixture is stored in f32");
    assert!(dir.path().join("model.safetensors.index.json").exists() && dir.path().join("tokenizer.json").exists());
    let (exported, _) = CausalLm::<Flex>::load(dir.path(), &Default::default()).unwrap();
    for ((name, _, got), (_, _, w)) in exported.hf_tensors().iter().zip(&want) {
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        let worst = got.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-6 * scale, "{name}: differs by {worst}");
    }
    assert_close(&logps(&exported), &adapted, 1e-4, "streamed export");

    // a bf16 base is written in bf16
    let bf16 = tempfile::tempdir().unwrap();
    base().save_hf(bf16.path(), ExportDtype::BF16, usize::MAX, Some(&fixtures().join("tiny-llama"))).unwrap();
    let out = tempfile::tempdir().unwrap();
    assert_eq!(dipole_models::merge_checkpoint(bf16.path(), Some(&adapter), out.path(), None, usize::MAX).unwrap(), ExportDtype::BF16);
    let config: Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");

    // an adapter naming a layer the model does not have
    let mut peft = dipole_lora::PeftAdapter::load(&adapter).unwrap();
    let (module, m) = peft.modules.pop_first().unwrap();
    peft.modules.insert(module.replace("layers.0.", "layers.7."), m);
    let bad = tempfile::tempdir().unwrap();
    peft.save(bad.path()).unwrap();
    let err = dipole_models::merge_checkpoint(&fixtures().join("tiny-llama"), Some(bad.path()), tempfile::tempdir().unwrap().path(), None, usize::MAX).unwrap_err().to_string();
    assert!(err.contains("model.layers.7.") && err.contains("which this model does not"), "{err}");
}

#[test]
fn sft_adapter_as_reference() {
    // policy = base + trainable adapter (starts at PEFT's init: B = 0), reference = base + SFT adapter
    let mut model = base();
    model.load_reference_adapter(&goldens().join("lora_random")).unwrap();
    model.load_adapter(&goldens().join("lora_init")).unwrap();
    let mut sft = base();
    sft.load_adapter(&goldens().join("lora_random")).unwrap();

    model.set_adapter_mode(AdapterMode::Reference);
    assert_eq!(logps(&model), logps(&sft), "reference mode = base + SFT adapter");
    model.set_adapter_mode(AdapterMode::Active);
    assert_eq!(logps(&model), logps(&base()), "active mode = base + fresh adapter");
}

#[test]
fn trainable_parameter_count_matches_trl() {
    let (mut model, _) = CausalLm::<Autodiff<Flex>>::load(fixtures().join("tiny-llama"), &Default::default()).unwrap();
    let config = LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        target_modules: TargetModules::List(vec!["q_proj".into(), "v_proj".into()]),
        ..Default::default()
    };
    assert_eq!(model.add_lora(&config, 42).unwrap(), 4);
    assert_eq!(model.num_trainable_params(), 3584);
}

#[test]
fn adapter_for_another_model_is_rejected_by_name() {
    let (mut qwen, _) = CausalLm::<Flex>::load(fixtures().join("tiny-mistral"), &Default::default()).unwrap();
    // tiny-mistral has 1 kv head: v_proj is 16 wide, the adapter's is 32
    let err = qwen.load_adapter(&goldens().join("lora_random")).unwrap_err().to_string();
    assert!(err.contains("v_proj"), "{err}");
}
