//! Every shipped config parses and validates.

use std::path::Path;

use dipole_train::TrainConfig;

#[test]
fn shipped_configs_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        if entry.path().extension().is_some_and(|e| e == "toml") {
            TrainConfig::from_file(&entry.path()).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 3, "expected the shipped configs, found {n}");
}

/// Each bad value is refused before any work, with exactly this message (`--set` names the origin
/// of an override; a file's path names a file's).
const BAD: &[(&str, &str)] = &[
    ("optim.max_grad_norm=-1", "--set: optim.max_grad_norm must be >= 0 (0 turns clipping off), got -1"),
    ("optim.adam_beta1=1.5", "--set: optim.adam_beta1 must be in [0, 1), got 1.5"),
    ("optim.adam_beta2=1.0", "--set: optim.adam_beta2 must be in [0, 1), got 1"),
    ("optim.adam_epsilon=0.0", "--set: optim.adam_epsilon must be > 0, got 0"),
    ("optim.adam_epsilon=-1e-8", "--set: optim.adam_epsilon must be > 0, got -0.00000001"),
    ("optim.weight_decay=-0.1", "--set: optim.weight_decay must be >= 0, got -0.1"),
    ("optim.warmup_ratio=1.5", "--set: optim.warmup_ratio must be in [0, 1], got 1.5"),
    ("optim.warmup_ratio=-0.1", "--set: optim.warmup_ratio must be in [0, 1], got -0.1"),
    ("optim.learning_rate=-1e-5", "--set: optim.learning_rate must be >= 0, got -0.00001"),
    ("optim.learning_rate=nan", "--set: optim.learning_rate must be >= 0, got NaN"),
    ("lora.alpha=0.0", "--set: lora.alpha must be > 0, got 0"),
    ("lora.dropout=1.0", "--set: lora.dropout must be in [0, 1), got 1"),
    ("objective.rpo_alpha=-1.0", "--set: objective: rpo_alpha must be >= 0, got -1"),
    ("objective.beta=inf", "--set: objective: beta must be finite, got inf"),
    ("objective.discopop_tau=0.0", "--set: objective: discopop_tau must be > 0, got 0"),
    ("objective.cpo_alpha=-2.0", "--set: objective: cpo_alpha must be >= 0, got -2"),
    ("objective.loss_weights=[1.0, -1.0]", "--set: objective: loss_weights has 2 entries but loss_type has 1"),
    ("train.max_steps=0", "--set: train.max_steps must be at least 1, got 0 (leave it unset to train for train.num_train_epochs)"),
    ("train.num_train_epochs=0.0", "--set: train.num_train_epochs must be > 0, got 0"),
    ("train.num_train_epochs=-1.0", "--set: train.num_train_epochs must be > 0, got -1"),
    ("train.batch_size=0", "--set: train.batch_size must be at least 1, got 0"),
    ("train.gradient_accumulation_steps=0", "--set: train.gradient_accumulation_steps must be at least 1, got 0"),
    ("train.logging_steps=0", "--set: train.logging_steps must be at least 1, got 0"),
    ("train.max_new_tokens=0", "--set: train.max_new_tokens must be at least 1, got 0"),
    ("train.save_total_limit=0", "--set: train.save_total_limit must be at least 1, got 0 (leave it unset to keep every checkpoint)"),
    ("train.max_skipped_fraction=2.0", "--set: train.max_skipped_fraction must be in [0, 1], got 2"),
    ("data.max_length=0", "--set: data.max_length must be at least 1, got 0"),
    ("data.max_prompt_length=0", "--set: data.max_prompt_length must be at least 1, got 0 (leave it unset to keep whole prompts)"),
    ("data.max_prompt_length=2000", "--set: data.max_prompt_length (2000) must be below data.max_length (1024): no completion token would be left"),
    ("data.eval_fraction=1.0", "--set: data.eval_fraction must be in [0, 1), got 1"),
    ("data.truncation=keep_middle", "--set \"data.truncation=keep_middle\": unknown variant `keep_middle`, expected `keep_start` or `keep_end`"),
    ("lora.init=xavier", "--set \"lora.init=xavier\": unknown variant `xavier`, expected one of `kaiming`, `kaiming_uniform`, `gaussian`"),
    ("train.backend=tpu", "--set \"train.backend=tpu\": unknown variant `tpu`, expected one of `cpu`, `ndarray`, `wgpu`, `vulkan`, `metal`, `cuda`"),
    ("optim.learning_rat=1e-5", "--set \"optim.learning_rat=1e-5\": unknown field `learning_rat`, expected one of `learning_rate`, `adam_beta1`, `adam_beta2`, `adam_epsilon`, `weight_decay`, `max_grad_norm`, `lr_scheduler_type`, `warmup_ratio`, `warmup_steps`"),
    ("model.dtype=\"int8\"", "--set \"model.dtype=\\\"int8\\\"\": unknown variant `int8`, expected one of `auto`, `f32`, `bf16`, `f16`"),
    ("train.gradient_checkpointing=\"full\"", "--set \"train.gradient_checkpointing=\\\"full\\\"\": \"full\": expected true, false, \"layers\" or \"balanced\""),
    ("train.gradient_checkpointing=1", "--set \"train.gradient_checkpointing=1\": expected true, false, \"layers\" or \"balanced\""),
    ("train.generation_temperature=-1.0", "--set: train.generation_temperature must be >= 0 and train.generation_top_p in (0, 1], got -1 and 1"),
];

#[test]
fn every_bad_value_is_refused_with_its_key_and_range() {
    let mut failures = Vec::new();
    for (set, want) in BAD {
        match TrainConfig::default().with_overrides(&[set.to_string()]) {
            Ok(_) => failures.push(format!("{set}: accepted")),
            Err(got) if got.to_string() != *want => failures.push(format!("{set}:\n   got {got}\n  want {want}")),
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{} of {} cases:\n{}", failures.len(), BAD.len(), failures.join("\n"));
}

#[test]
fn lora_rank_zero_is_refused_only_when_lora_is_on() {
    let err = TrainConfig::default().with_overrides(&["lora.enabled=true".into(), "lora.r=0".into()]).unwrap_err();
    assert_eq!(err.to_string(), "--set: lora.r must be at least 1, got 0");
    TrainConfig::default().with_overrides(&["lora.r=0".into()]).unwrap();
}

#[test]
fn wpo_weights_are_refused_for_kto_pair() {
    let err = TrainConfig::default().with_overrides(&["objective.loss_type=[\"kto_pair\"]".into(), "objective.use_weighting=true".into()]).unwrap_err();
    assert_eq!(err.to_string(), "--set: objective: use_weighting (WPO) weights pairs; kto_pair's loss is per completion and cannot take it");
}

#[test]
fn gradient_checkpointing_takes_a_flag_or_a_strategy() {
    use dipole_train::GradientCheckpointing::*;
    for (value, want) in [("true", Layers), ("false", Off), ("\"layers\"", Layers), ("\"balanced\"", Balanced), ("\"off\"", Off)] {
        let config = TrainConfig::default().with_overrides(&[format!("train.gradient_checkpointing={value}")]).unwrap();
        assert_eq!(config.train.gradient_checkpointing, want, "{value}");
        // written back as the file would say it, and read again
        let text = toml::to_string(&config).unwrap();
        let again: TrainConfig = toml::from_str(&text).unwrap();
        assert_eq!(again.train.gradient_checkpointing, want, "{value} round trip");
    }
}
