//! The command line on bad input: every case exits with an error naming the flag, key, file or
//! backend and what was expected; none panics (exit 101) or aborts (134).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture(rel: &str) -> String {
    root().join("fixtures").join(rel).display().to_string()
}

fn xtask(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
    cmd.args(args).current_dir(root()).env_remove("DIPOLE_FUSED_KERNELS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// Runs and checks the exit code and that stderr holds `want` (clap adds usage lines after it).
fn refused(args: &[&str], env: &[(&str, &str)], code: i32, want: &str) {
    let out = xtask(args, env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: exit {:?}\n{stderr}", out.status.code());
    assert!(stderr.contains(want), "{args:?}: stderr lacks {want:?}:\n{stderr}");
}

fn logps_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<String> {
    let mut v: Vec<String> = ["logps", "--model", &fixture("tiny-llama"), "--data", &fixture("data/prefs_standard.jsonl"), "--out", out]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn zero_and_out_of_range_flags_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.jsonl").display().to_string();
    let args = logps_args(&out, &["--batch-size", "0"]);
    refused(&strs(&args), &[], 2, "invalid value '0' for '--batch-size <BATCH_SIZE>': must be at least 1");
    let args = logps_args(&out, &["--max-length", "0"]);
    refused(&strs(&args), &[], 2, "invalid value '0' for '--max-length <MAX_LENGTH>': must be at least 1");
    let pairs = ["--model", &fixture("tiny-llama"), "--data", &fixture("data/prefs_standard.jsonl")];
    for (command, extra) in [("eval", vec![]), ("score", vec!["--out", out.as_str()])] {
        let mut args = vec![command];
        args.extend(pairs);
        args.extend(extra);
        args.extend(["--batch-size", "0"]);
        refused(&args, &[], 2, "invalid value '0' for '--batch-size <BATCH_SIZE>': must be at least 1");
    }
    let mut args = vec!["eval"];
    args.extend(pairs);
    args.push("--temperature=-1");
    refused(&args, &[], 2, "invalid value '-1' for '--temperature <TEMPERATURE>': must be >= 0, got -1");
    let mut args = vec!["eval"];
    args.extend(pairs);
    args.push("--top-p=1.5");
    refused(&args, &[], 2, "invalid value '1.5' for '--top-p <TOP_P>': must be in (0, 1], got 1.5");
    let mut args = vec!["score"];
    args.extend(pairs);
    args.extend(["--out", &out, "--beta=0"]);
    refused(&args, &[], 2, "invalid value '0' for '--beta <BETA>': must be > 0, got 0");
    refused(&["bench", "--steps", "0"], &[], 2, "invalid value '0' for '--steps <STEPS>': must be at least 1");
    refused(&["plan", "--budget", "0GiB"], &[], 2, "invalid value '0GiB' for '--budget <BUDGET>': must be above 0, got 0GiB");
    refused(&["plan", "--budget", "24XB"], &[], 2, "unknown unit \"XB\" in \"24XB\"; expected GiB, GB, MiB, MB, KiB, KB, TiB, TB or B");
    refused(&["data", "split", "--data", "x.jsonl", "--out-dir", "y", "--test-fraction", "1"], &[], 2, "invalid value '1' for '--test-fraction <TEST_FRACTION>': must be in (0, 1), got 1");
}

#[test]
fn a_row_too_long_for_memory_is_an_error_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("long.jsonl");
    // about 4 MB of text in one completion: a million-token row needs terabytes of attention scores
    let long = "the quick brown fox jumps over the lazy dog ".repeat(100_000);
    std::fs::write(&data, format!("{{\"prompt\": \"Q:\", \"chosen\": \"{long}\", \"rejected\": \" no\"}}\n")).unwrap();
    let out = dir.path().join("o.jsonl").display().to_string();
    let data = data.display().to_string();
    let args = ["logps", "--model", &fixture("tiny-llama"), "--data", &data, "--out", &out, "--max-length", "1000000"];
    refused(&args, &[], 1, "--max-length: the longest row has ");
    refused(&args, &[], 1, "GiB (4 heads), more than the ");
}

#[test]
fn a_malformed_kernel_switch_is_an_error() {
    refused(&["data", "check", "--data", "x.jsonl"], &[("DIPOLE_FUSED_KERNELS", "maybe")], 1, "DIPOLE_FUSED_KERNELS=\"maybe\": expected 1/on/true or 0/off/false");
}

#[test]
fn a_backend_not_built_in_is_named_with_its_feature() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.jsonl").display().to_string();
    let args = logps_args(&out, &["--backend", "cuda"]);
    if cfg!(feature = "cuda") {
        // built with CUDA: on a machine without the driver the probe names what is missing
        let out = xtask(&strs(&args), &[]);
        assert_ne!(out.status.code(), Some(101), "{}", String::from_utf8_lossy(&out.stderr));
    } else {
        refused(&strs(&args), &[], 1, "backend Cuda is not compiled into this binary; rebuild with `--features cuda`");
    }
}

/// A tiny run's config: tiny-llama, one step, its output folder under `dir`.
fn tiny_run(dir: &Path) -> PathBuf {
    let config = dir.join("run.toml");
    let text = format!(
        "[model]\npath = {:?}\n[data]\ntrain = {:?}\nmax_length = 128\n[train]\nbatch_size = 4\nmax_steps = 1\nprogress = false\noutput_dir = {:?}\n",
        fixture("tiny-llama"),
        fixture("data/prefs_standard.jsonl"),
        dir.join("out").display().to_string()
    );
    std::fs::write(&config, text).unwrap();
    config
}

#[test]
fn bad_runs_are_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_run(dir.path()).display().to_string();
    refused(&["train", "--config", &config, "--set", "optim.max_grad_norm=-1"], &[], 1, "--set: optim.max_grad_norm must be >= 0 (0 turns clipping off), got -1");
    refused(&["train", "--config", &config, "--set", "train.max_steps=0"], &[], 1, "--set: train.max_steps must be at least 1, got 0");
    refused(&["plan", "--config", &config, "--set", "train.max_steps=0"], &[], 1, "--set: train.max_steps must be at least 1, got 0");
    let no_model = dir.path().join("no-model.toml");
    let missing = dir.path().join("missing");
    std::fs::write(&no_model, std::fs::read_to_string(&config).unwrap().replace(&format!("{:?}", fixture("tiny-llama")), &format!("{:?}", missing.display().to_string()))).unwrap();
    refused(&["plan", "--config", no_model.to_str().unwrap()], &[], 1, &format!("{}: No such file or directory", missing.join("config.json").display()));
    let out_dir = dir.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    refused(&["train", "--config", &config, "--resume"], &[], 1, &format!("--resume: {} holds no checkpoint-* folder to resume from", out_dir.display()));
    // a live process (this test) holds the folder's lock
    let lock = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(out_dir.join("dipole.lock")).unwrap();
    lock.try_lock().unwrap();
    std::fs::write(out_dir.join("dipole.lock"), format!("{}\n", std::process::id())).unwrap();
    refused(&["train", "--config", &config], &[], 1, &format!("train.output_dir {} is in use by a live run (pid {}), which holds", out_dir.display(), std::process::id()));
    drop(lock);
}

#[test]
fn a_file_with_no_valid_row_fails_the_check_even_when_skipping() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bad.jsonl");
    std::fs::write(&data, "{\"prompt\": \"x\"}\nnot json\n").unwrap();
    let data = data.display().to_string();
    refused(&["data", "check", "--data", &data, "--skip-invalid"], &[], 1, &format!("{data}: no valid records (2 invalid rows skipped; first: line 1: missing field \"chosen\")"));
}

#[test]
fn a_checkpoint_with_a_nan_weight_is_an_error_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    for entry in std::fs::read_dir(root().join("fixtures/tiny-llama")).unwrap().flatten() {
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    let path = model.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let start = header["model.norm.weight"]["data_offsets"][0].as_u64().unwrap() as usize + 8 + header_len;
    bytes[start + 8..start + 12].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let out = dir.path().join("o.jsonl").display().to_string();
    let args = ["logps", "--model", &model.display().to_string(), "--data", &fixture("data/prefs_standard.jsonl"), "--out", &out];
    refused(&args, &[], 1, &format!("{}: tensor \"model.norm.weight\" has 1 non-finite value (first at element 2: NaN)", path.display()));
}

/// A run SIGKILLed (as soon as each of a few checkpoints appears, so mid-step or mid-write) and
/// resumed each time ends with the same bytes as an uninterrupted run; each restart takes over the
/// dead run's lock. `scripts/kill-resume.sh` does the same at random moments.
#[test]
fn a_killed_and_resumed_run_ends_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_run(dir.path()).display().to_string();
    let steps = ["--set", "train.max_steps=12", "--set", "train.save_steps=1", "--set", "optim.learning_rate=1e-3"];
    let whole = dir.path().join("whole").display().to_string();
    let set_out = |out: &str| format!("train.output_dir={out:?}");
    let mut args = vec!["train", "--config", &config];
    args.extend(steps);
    let whole_out = set_out(&whole);
    let out = xtask(&[args.clone(), vec!["--set", &whole_out]].concat(), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let parts = dir.path().join("parts");
    let parts_out = set_out(&parts.display().to_string());
    for (k, after) in [2, 4, 6].into_iter().enumerate() {
        let mut run = args.clone();
        run.extend(["--set", &parts_out]);
        if k > 0 {
            run.push("--resume");
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_xtask")).args(&run).current_dir(root()).stderr(std::process::Stdio::null()).spawn().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while !parts.join(format!("checkpoint-{after}")).exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let left = std::fs::read_to_string(parts.join("dipole.lock")).unwrap();
        assert_eq!(left.trim(), child.id().to_string(), "the killed run's pid stays in the lock file");
    }
    let mut run = args.clone();
    run.extend(["--set", &parts_out, "--resume"]);
    let out = xtask(&run, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("a run that ended without finishing; taking it over"), "{stderr}");
    let weights = |d: &Path| std::fs::read(d.join("final/model/model.safetensors")).unwrap();
    assert!(weights(Path::new(&whole)) == weights(&parts), "resumed weights differ from the uninterrupted run's");
}

/// `eval --config` on a run's final adapter and eval file gives the run's own final evaluation:
/// the same objective (here with RPO's NLL term), batches, reference and metrics, to 1e-6.
#[test]
fn eval_with_the_runs_config_agrees_with_the_runs_final_evaluation() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = std::fs::read_to_string(root().join("fixtures/data/prefs_standard.jsonl")).unwrap();
    let heldout = dir.path().join("heldout.jsonl");
    // 10 pairs: batches of 4, 4 and 2, so a mean over batches and one over pairs would differ
    std::fs::write(&heldout, pairs.lines().take(10).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let config = tiny_run(dir.path());
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("[lora]\nenabled = true\n[objective]\nrpo_alpha = 1.0\n[optim]\nlearning_rate = 1e-3\n");
    text = text.replace("max_length = 128\n", &format!("max_length = 128\neval = {:?}\n", heldout.display().to_string()));
    text = text.replace("max_steps = 1\n", "max_steps = 3\n");
    std::fs::write(&config, text).unwrap();
    let config = config.display().to_string();
    let out = xtask(&["train", "--config", &config], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // the CLI plots a finished run's log
    let svg = std::fs::read_to_string(dir.path().join("out/plots/loss.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.matches("<polyline").count() == 2, "train and eval loss: {svg}");
    let log = std::fs::read_to_string(dir.path().join("out/metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    let adapter = dir.path().join("out/final/adapter").display().to_string();
    let json = dir.path().join("eval.json").display().to_string();
    let args = ["eval", "--config", &config, "--model", &fixture("tiny-llama"), "--adapter", &adapter, "--data", &heldout.display().to_string(), "--out", &json];
    let out = xtask(&args, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let eval: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(eval["objective"], serde_json::json!(["sigmoid"]));
    let metrics = eval["metrics"].as_object().unwrap();
    let logged: Vec<(&String, f64)> = last.as_object().unwrap().iter().filter(|(k, _)| k.starts_with("eval_")).map(|(k, v)| (k, v.as_f64().unwrap())).collect();
    assert_eq!(logged.len(), metrics.len(), "the same metrics: {logged:?} vs {metrics:?}");
    for (key, want) in logged {
        let got = metrics[key.strip_prefix("eval_").unwrap()].as_f64().unwrap();
        assert!((got - want).abs() <= 1e-6 * want.abs().max(1.0), "{key}: eval {got} vs the run's {want}");
    }
}

/// `score --ld-alpha` with a reference (refused while score had a reference path of its own) runs
/// the evaluation's batches: on one batch its loss and metrics are `eval --config`'s with the same
/// `objective.ld_alpha`, to 1e-6, and the reference's log-probs it writes are LD-DPO weighted.
#[test]
fn score_with_ld_alpha_and_a_reference_agrees_with_eval_on_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = std::fs::read_to_string(root().join("fixtures/data/prefs_standard.jsonl")).unwrap();
    let data = dir.path().join("six.jsonl");
    std::fs::write(&data, pairs.lines().take(6).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let data = data.display().to_string();
    let config = tiny_run(dir.path());
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("[objective]\nld_alpha = 0.5\n");
    std::fs::write(&config, text).unwrap();
    let config = config.display().to_string();
    let (policy, reference) = (fixture("tiny-llama-perturbed"), fixture("tiny-llama"));
    // six pairs in one batch of eight
    let common = ["--model", &policy, "--ref", &reference, "--data", &data, "--max-length", "128", "--batch-size", "8"];
    let read = |path: &str| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap() };
    let eval_json = dir.path().join("eval.json").display().to_string();
    let out = xtask(&[&["eval", "--config", &config, "--out", &eval_json][..], &common].concat(), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let score = |name: &str, extra: &[&str]| {
        let path = dir.path().join(name).display().to_string();
        let out = xtask(&[&["score", "--out", &path][..], &common, extra].concat(), &[]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        read(&path)
    };
    let (ld, plain) = (score("ld.json", &["--ld-alpha", "0.5"]), score("plain.json", &[]));
    let batches = ld["batches"].as_array().unwrap();
    assert_eq!(batches.len(), 1, "one batch: {batches:?}");
    let eval = read(&eval_json);
    let metrics = eval["metrics"].as_object().unwrap();
    assert!(metrics.len() > 5, "{metrics:?}");
    for (key, want) in metrics {
        let want = want.as_f64().unwrap();
        let got = if key == "loss" { &batches[0]["loss"] } else { &batches[0]["metrics"][key] };
        let got = got.as_f64().unwrap_or_else(|| panic!("score lacks {key}: {}", batches[0]));
        assert!((got - want).abs() <= 1e-6 * want.abs().max(1.0), "{key}: score {got} vs eval {want}");
    }
    assert_ne!(ld["batches"][0]["loss"], plain["batches"][0]["loss"]);
    // weights <= 1 on negative log-probs: the weighted sums are higher, strictly where completions differ in length
    let (ld_examples, plain_examples) = (ld["examples"].as_array().unwrap(), plain["examples"].as_array().unwrap());
    assert_eq!(ld_examples.len(), plain_examples.len());
    let mut raised = 0;
    for (a, b) in ld_examples.iter().zip(plain_examples) {
        assert_eq!(a["index"], b["index"]);
        for side in ["ref_chosen_logps", "ref_rejected_logps"] {
            let (weighted, whole) = (a[side].as_f64().unwrap(), b[side].as_f64().unwrap());
            assert!(weighted >= whole - 1e-4, "{side} of pair {}: {weighted} < {whole}", a["index"]);
            raised += (weighted > whole + 1e-3) as usize;
        }
    }
    assert!(raised > 0, "no reference log-prob was LD-DPO weighted");
}

#[test]
fn the_dipole_binary_is_the_same_command_line_with_completions() {
    let dipole = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_dipole")).args(args).current_dir(root()).output().unwrap();
    let help = dipole(&["--help"]);
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success() && text.contains("Usage: dipole <COMMAND>"), "{text}");
    for command in ["train", "sft", "eval", "score", "logps", "export", "data", "bench", "completions"] {
        assert!(text.contains(&format!("  {command} ")), "help lacks {command}:\n{text}");
    }
    for (shell, marker) in [("bash", "_dipole()"), ("zsh", "#compdef dipole"), ("fish", "complete -c dipole")] {
        let out = dipole(&["completions", shell]);
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && script.contains(marker) && script.contains("train"), "{shell}:\n{script}");
    }
    refused(&["completions", "tcsh"], &[], 2, "invalid value 'tcsh'");
    // the in-repo entry point names itself as it is typed
    let help = xtask(&["--help"], &[]);
    assert!(String::from_utf8_lossy(&help.stdout).contains("Usage: cargo xtask <COMMAND>"));
}
