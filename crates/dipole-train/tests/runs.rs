//! A run's folder: resume refuses a checkpoint that another config, a damaged file or a finished
//! run would make wrong, keeps `metrics.jsonl` to the checkpoint's steps, and a diverging
//! `skip_nonfinite` run stops; LoRA settings the model cannot take are errors naming the key.

mod common;

use std::path::Path;

use common::{AD, golden_config_of};
use dipole_train::{Resume, RunOptions, TrainConfig, train};

fn config(out: &Path) -> TrainConfig {
    let mut c = golden_config_of(out, "tiny-llama", "standard");
    c.train.max_steps = Some(4);
    c.train.save_steps = 2;
    c
}

fn resume() -> RunOptions {
    RunOptions { resume: Some(Resume::Latest), ..Default::default() }
}

fn metrics_steps(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_f64().unwrap())
        .collect()
}

#[test]
fn resume_checks_the_config_the_files_and_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    // a run killed after step 3: its checkpoint is step 2, its metrics went on to step 3
    train::<AD>(&c, &RunOptions { stop_after: Some(3), ..Default::default() }, &Default::default()).unwrap();
    assert_eq!(metrics_steps(dir.path()), vec![1.0, 2.0, 3.0]);

    let mut other = c.clone();
    other.objective.beta = 0.2;
    let err = train::<AD>(&other, &resume(), &Default::default()).unwrap_err();
    let ckpt = dir.path().join("checkpoint-2");
    assert_eq!(
        err,
        format!("--resume {}: objective.beta was 0.1 when the checkpoint was written, now 0.2; that changes what the run computes (resume with the checkpoint's value, or start a new run in another output_dir)", ckpt.display())
    );

    // a damaged optimizer state is named, not loaded
    let optimizer = ckpt.join("optimizer.mpk");
    let good = std::fs::read(&optimizer).unwrap();
    let mut bad = good.clone();
    for b in &mut bad[100..500] {
        *b ^= 0x5a;
    }
    std::fs::write(&optimizer, &bad).unwrap();
    let err = train::<AD>(&c, &resume(), &Default::default()).unwrap_err();
    assert!(err.starts_with(&format!("{}: checksum mismatch (BLAKE3 ", optimizer.display())) && err.ends_with("the file is damaged"), "{err}");
    std::fs::write(&optimizer, &good).unwrap();

    // resumed: metrics keep steps 1-2 and go on from there, without repeating step 3
    train::<AD>(&c, &resume(), &Default::default()).unwrap();
    assert_eq!(metrics_steps(dir.path()), vec![1.0, 2.0, 3.0, 4.0]);
    let err = train::<AD>(&c, &resume(), &Default::default()).unwrap_err();
    assert_eq!(
        err,
        format!(
            "--resume {}: the run finished there (step 4 of 4; its weights are in {}); nothing left to train (raise train.max_steps or train.num_train_epochs to go on)",
            dir.path().join("checkpoint-4").display(),
            dir.path().join("final/model").display()
        )
    );
    // killed after its last checkpoint, before its final weights were whole: resuming finishes it
    let weights = std::fs::read(dir.path().join("final/model/model.safetensors")).unwrap();
    std::fs::remove_file(dir.path().join("final/model/checksums.json")).unwrap();
    train::<AD>(&c, &resume(), &Default::default()).unwrap();
    assert!(std::fs::read(dir.path().join("final/model/model.safetensors")).unwrap() == weights, "the same final weights");
    assert_eq!(metrics_steps(dir.path()), vec![1.0, 2.0, 3.0, 4.0]);
}

#[test]
fn resume_refuses_other_training_examples_under_the_same_path() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pairs.jsonl");
    std::fs::copy(common::fixtures().join("data/prefs_standard.jsonl"), &data).unwrap();
    let out = dir.path().join("out");
    let mut c = config(&out);
    c.data.train = data.clone();
    train::<AD>(&c, &RunOptions { stop_after: Some(2), ..Default::default() }, &Default::default()).unwrap();
    let text = std::fs::read_to_string(&data).unwrap();
    std::fs::write(&data, text.lines().skip(1).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let err = train::<AD>(&c, &resume(), &Default::default()).unwrap_err();
    assert_eq!(
        err,
        format!(
            "--resume {}: the training examples differ from the checkpoint's (data.train, data.eval_fraction or the tokenisation changed; 61 examples now)",
            out.join("checkpoint-2").display()
        )
    );
}

#[test]
fn a_run_that_keeps_diverging_stops_despite_skip_nonfinite() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.train.save_steps = 0;
    c.optim.learning_rate = 1e30; // every step after the first is NaN
    c.train.skip_nonfinite = true;
    c.train.max_skipped_fraction = 0.5;
    let err = train::<AD>(&c, &RunOptions::default(), &Default::default()).unwrap_err();
    assert_eq!(
        err,
        "step 3: 2 of 3 steps were skipped as not finite, more than train.max_skipped_fraction = 0.5; the run is diverging (lower optim.learning_rate, or check the data)"
    );
}

#[test]
fn lora_settings_the_model_cannot_take_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.lora.enabled = true;
    c.lora.r = 65;
    let err = train::<AD>(&c, &RunOptions::default(), &Default::default()).unwrap_err();
    assert_eq!(err, "lora.r = 65 is larger than model.layers.0.self_attn.q_proj (64 -> 64 features): the rank can be at most 64");
    c.lora.r = 8;
    c.lora.layers_to_transform = Some(vec![0, 2]);
    let err = train::<AD>(&c, &RunOptions::default(), &Default::default()).unwrap_err();
    assert_eq!(err, "lora.layers_to_transform: layer 2 does not exist (the model has 2: 0..=1)");
}

#[test]
fn a_fresh_run_starts_its_metrics_anew() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.train.max_steps = Some(1);
    c.train.save_steps = 0;
    std::fs::write(dir.path().join("metrics.jsonl"), "{\"step\": 7.0, \"loss\": 1.0}\n").unwrap();
    train::<AD>(&c, &RunOptions::default(), &Default::default()).unwrap();
    assert_eq!(metrics_steps(dir.path()), vec![1.0]);
}
