//! `cargo xtask plan` against the peak memory a run reaches: the same config planned, then trained
//! (the `bench-17m` shape written by `init-model`, pairs of 128 + 384 tokens through its byte
//! tokenizer), the plan within 15% of the run's peak resident memory over its steps.

use std::path::Path;
use std::process::{Command, Output};

fn xtask(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask")).args(args).env_remove("DIPOLE_FUSED_KERNELS").output().unwrap();
    assert!(out.status.success(), "{args:?}:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Lowercase words of `len` characters from a seeded generator (one byte-tokenizer token each).
fn text(len: usize, seed: &mut u64) -> String {
    (0..len)
        .map(|_| {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            match (*seed >> 33) % 27 {
                0 => ' ',
                k => (b'a' + k as u8 - 1) as char,
            }
        })
        .collect()
}

fn write_pairs(path: &Path, pairs: usize) {
    let mut seed = 7;
    let lines: Vec<String> = (0..pairs)
        .map(|_| serde_json::json!({"prompt": text(127, &mut seed), "chosen": text(383, &mut seed), "rejected": text(383, &mut seed)}).to_string())
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// The `peak phase: PHASE, N MiB` line's MiB, checked against the `peak: X.X GiB` line that follows it.
fn planned_mib(stdout: &str) -> f64 {
    let line = stdout.lines().find(|l| l.starts_with("peak phase: ")).unwrap_or_else(|| panic!("no peak phase line in:\n{stdout}"));
    let mib: f64 = line.rsplit(", ").next().and_then(|rest| rest.strip_suffix(" MiB")).unwrap_or_else(|| panic!("{line}")).parse().unwrap();
    let gib_line = stdout.lines().find(|l| l.starts_with("peak: ")).unwrap_or_else(|| panic!("no peak line in:\n{stdout}"));
    let gib: f64 = gib_line.strip_prefix("peak: ").and_then(|g| g.strip_suffix(" GiB")).unwrap_or_else(|| panic!("{gib_line}")).parse().unwrap();
    assert!((gib - mib / 1024.0).abs() <= 0.05, "{line} / {gib_line}");
    mib
}

/// The highest `peak_rss_mb` of a run's `metrics.jsonl`.
fn measured_mib(run: &Path) -> f64 {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("peak_rss_mb")?.as_f64()).fold(0.0, f64::max)
}

#[test]
fn plans_are_within_15_percent_of_the_peaks_runs_reach() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    xtask(&["init-model", "--shape", "bench-17m", "--dtype", "f32", "--out", model.to_str().unwrap()]);
    let pairs = dir.path().join("pairs.jsonl");
    write_pairs(&pairs, 8);
    let cases = [
        ("lora_gc", "[lora]\nenabled = true\nr = 16\nalpha = 32.0\ntarget_modules = [\"q_proj\", \"v_proj\"]\n", "gradient_checkpointing = true"),
        ("full", "", "gradient_checkpointing = false"),
    ];
    let mut report = String::new();
    let mut worst: f64 = 0.0;
    for (name, lora, checkpointing) in cases {
        let run = dir.path().join(name);
        let config = format!(
            "[model]\npath = {model:?}\n\n[data]\ntrain = {pairs:?}\nmax_length = 512\neval_fraction = 0.0\n\n{lora}\n[train]\nbatch_size = 4\nmax_steps = 3\nlogging_steps = 1\nsave_steps = 1000\ngenerations = 0\nbatch_shards = 2\n{checkpointing}\noutput_dir = {run:?}\n"
        );
        let config_path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&config_path, config).unwrap();
        let planned = planned_mib(&String::from_utf8_lossy(&xtask(&["plan", "--config", config_path.to_str().unwrap()]).stdout));
        xtask(&["train", "--config", config_path.to_str().unwrap()]);
        let measured = measured_mib(&run);
        let error = planned / measured - 1.0;
        worst = worst.max(error.abs());
        report += &format!("{name}: planned {planned:.0} MiB, measured {measured:.0} MiB ({:+.1}%)\n", 100.0 * error);
    }
    assert!(worst <= 0.15, "a plan is off by more than 15%:\n{report}");
    println!("{report}");
}
