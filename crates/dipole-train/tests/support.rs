//! The shipped customer-support task, shortened: a few LoRA DPO steps of the shipped base on the
//! shipped pairs move held-out reward accuracy up from the step-0 coin flip, and every output the
//! trainer writes for the default run (adapter, metrics, generations, checkpoint) is there. The
//! judged report and the plots are the CLI's (dipole-eval's tests); the full run's numbers live in
//! the README, measured by `cargo xtask train`.

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use dipole_data::generation::read_generations;
use dipole_train::{RunOptions, TrainConfig, train};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn a_short_default_run_improves_heldout_accuracy_and_writes_its_outputs() {
    let dir = tempfile::tempdir().unwrap();
    // a slice of the held-out set keeps the debug-build test short
    let heldout = std::fs::read_to_string(root().join("datasets/support/heldout.jsonl")).unwrap();
    let eval = dir.path().join("heldout.jsonl");
    std::fs::write(&eval, heldout.lines().take(48).collect::<Vec<_>>().join("\n")).unwrap();

    let config = TrainConfig::from_file(&root().join("configs/default.toml")).unwrap();
    let mut config = config
        .with_overrides(&[
            "train.max_steps=12".into(),
            "train.save_steps=6".into(),
            "train.generations=4".into(),
            "train.max_new_tokens=24".into(),
            "train.progress=false".into(),
            "optim.learning_rate=5e-3".into(),
        ])
        .unwrap();
    config.model.path = root().join(&config.model.path);
    config.data.train = root().join(&config.data.train);
    config.data.eval = Some(eval);
    config.train.output_dir = dir.path().join("run");

    let summary = train::<Autodiff<Flex>>(&config, &RunOptions::default(), &Default::default()).unwrap();
    assert_eq!(summary.steps, 12);
    let before = summary.initial_eval.as_ref().unwrap()["eval_rewards/accuracies_ties_half"];
    let after = summary.final_eval.as_ref().unwrap()["eval_rewards/accuracies_ties_half"];
    assert_eq!(before, 0.5, "policy = reference at step 0: every margin ties");
    assert!(after > 0.6, "held-out reward accuracy {before} -> {after}");

    let out = &config.train.output_dir;
    let generations = read_generations(summary.generations.as_ref().unwrap()).unwrap();
    assert_eq!(generations.len(), 4);
    assert!(generations.iter().all(|g| !g.prompt.is_empty()), "{generations:?}");
    for file in [
        "metrics.jsonl",
        "generations.jsonl",
        "final/adapter/adapter_model.safetensors",
        "final/adapter/adapter_config.json",
        "checkpoint-12/trainer_state.json",
    ] {
        assert!(out.join(file).exists(), "{file} missing");
    }
}
