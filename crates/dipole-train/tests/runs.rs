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
    let err = train::<AD>(&other, &resume(), &Default::default()).unwrap_err().to_string();
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
    let err = train::<AD>(&c, &resume(), &Default::default()).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}: checksum mismatch (BLAKE3 ", optimizer.display())) && err.ends_with("the file is damaged"), "{err}");
    std::fs::write(&optimizer, &good).unwrap();

    // resumed: metrics keep steps 1-2 and go on from there, without repeating step 3
    train::<AD>(&c, &resume(), &Default::default()).unwrap();
    assert_eq!(metrics_steps(dir.path()), vec![1.0, 2.0, 3.0, 4.0]);
    let err = train::<AD>(&c, &resume(), &Default::default()).unwrap_err().to_string();
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
    let err = train::<AD>(&c, &resume(), &Default::default()).unwrap_err().to_string();
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
    let err = train::<AD>(&c, &RunOptions::default(), &Default::default()).unwrap_err().to_string();
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
    let err = train::<AD>(&c, &RunOptions::default(), &Default::default()).unwrap_err().to_string();
    assert_eq!(err, "lora.r = 65 is larger than model.layers.0.self_attn.q_proj (64 -> 64 features): the rank can be at most 64");
    c.lora.r = 8;
    c.lora.layers_to_transform = Some(vec![0, 2]);
    let err = train::<AD>(&c, &RunOptions::default(), &Default::default()).unwrap_err().to_string();
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

fn eval_lines(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|m| m.get("eval_loss").is_some())
        .collect()
}

#[test]
fn save_best_keeps_the_weights_of_the_best_evaluation() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.lora.enabled = true;
    c.data.eval_fraction = 0.25;
    c.train.max_steps = Some(5);
    c.train.eval_steps = 1;
    c.train.save_steps = 1;
    c.train.save_best = true;
    c.train.metric_for_best_model = "rewards/margins".into();
    let summary = train::<AD>(&c, &RunOptions::default(), &Default::default()).unwrap();

    let evals = eval_lines(dir.path());
    assert_eq!(evals.len(), 6, "one per step and the final one");
    // the first evaluation with the highest margin (a later tie does not replace it)
    let best = evals.iter().fold(None::<&serde_json::Value>, |best, e| match best {
        Some(b) if b["eval_rewards/margins"].as_f64() >= e["eval_rewards/margins"].as_f64() => Some(b),
        _ => Some(e),
    });
    let best = best.unwrap();
    let step = best["step"].as_f64().unwrap() as usize;
    let kept: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("best/best.json")).unwrap()).unwrap();
    assert_eq!(kept["step"].as_u64(), Some(step as u64));
    assert_eq!(kept["metric"], "eval_rewards/margins");
    assert_eq!(kept["value"].as_f64(), best["eval_rewards/margins"].as_f64());
    assert_eq!(summary.best.as_ref().map(|b| b.step), Some(step));
    assert!(dir.path().join("best/checksums.json").is_file(), "published whole");
    let weights = |d: &Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(weights(&dir.path().join("best")), weights(&dir.path().join(format!("checkpoint-{step}"))), "the best step's weights");

    c.train.metric_for_best_model = "eval_rewards/margin".into();
    let other = tempfile::tempdir().unwrap();
    c.train.output_dir = other.path().to_path_buf();
    let err = train::<AD>(&c, &RunOptions::default(), &Default::default()).unwrap_err().to_string();
    assert!(err.starts_with("train.metric_for_best_model = \"eval_rewards/margin\": the evaluation has no \"eval_rewards/margin\"; it has "), "{err}");
    assert!(err.contains("eval_rewards/margins"), "{err}");

    let err = TrainConfig::default().with_overrides(&["train.save_best=true".into()]).unwrap_err().to_string();
    assert_eq!(err, "--set: train.save_best ranks evaluations: it needs held-out data (data.eval or data.eval_fraction)");
}

#[test]
fn the_manifest_names_the_build_config_files_and_machine() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.train.max_steps = Some(1);
    c.train.save_steps = 0;
    train::<AD>(&c, &RunOptions::default(), &Default::default()).unwrap();
    let manifest = dipole_train::manifest::RunManifest::read(dir.path()).unwrap();
    assert_eq!(manifest.config, c);
    assert_eq!(manifest.dipole_version, env!("CARGO_PKG_VERSION"));
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.git");
    assert_eq!(manifest.git_commit.is_some(), repo.exists(), "{:?}", manifest.git_commit);
    let digest = |p: &Path| blake3::hash(&std::fs::read(p).unwrap()).to_hex().to_string();
    let config_json = manifest.model.iter().find(|f| f.name == "config.json").expect("config.json listed");
    assert_eq!(config_json.blake3, digest(&c.model.path.join("config.json")));
    assert_eq!(manifest.model.len(), std::fs::read_dir(&c.model.path).unwrap().flatten().filter(|e| e.path().is_file()).count());
    assert_eq!(manifest.data.train_files.len(), 1);
    assert_eq!(manifest.data.train_files[0].blake3, digest(&c.data.train));
    // the 64 rows less the 2 whose prompt alone reaches max_length 128
    assert_eq!((manifest.data.train_examples, manifest.data.eval_examples), (62, 0));
    assert!(manifest.backend.contains("Autodiff"), "{}", manifest.backend);
    assert!(manifest.machine.threads >= 1);
    assert_eq!(manifest.resumed_from, None);

    // a dataset folder: every one of its files, in name order
    let data = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(&c.data.train).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(data.path().join("a.jsonl"), lines[..32].join("\n")).unwrap();
    std::fs::write(data.path().join("b.jsonl"), lines[32..].join("\n")).unwrap();
    let out = tempfile::tempdir().unwrap();
    c.data.train = data.path().to_path_buf();
    c.train.output_dir = out.path().to_path_buf();
    train::<AD>(&c, &RunOptions::default(), &Default::default()).unwrap();
    let manifest = dipole_train::manifest::RunManifest::read(out.path()).unwrap();
    let names: Vec<&str> = manifest.data.train_files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["a.jsonl", "b.jsonl"]);
    assert_eq!(manifest.data.train_files[1].blake3, digest(&data.path().join("b.jsonl")));
}
