//! `cargo xtask bench`: DPO (sigmoid) training throughput and memory on weight-free shapes,
//! comparable with `fixtures/tools/bench_trl.py` (TRL + PyTorch on the same shape).
//!
//! Shapes (`--shape`, the `config.json` of each in `xtask/shapes/`): `bench-17m` (the default: Llama,
//! hidden 384, 6 layers, 6 heads, intermediate 1024, vocab 8000) and released architectures at their
//! real sizes (`smollm2-135m`, `qwen2.5-0.5b`, `llama-3.2-1b`), random init (seed 0); 4 pairs per
//! step of `--max-length` tokens (a quarter prompt, the rest completion), random ids; fp32.
//! Each configuration runs in its own process so peak RSS is its own.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use burn::backend::Autodiff;

use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::ElementConversion;
use burn::tensor::backend::{AutodiffBackend, Backend};
use clap::Args;
use dipole_data::{PairInputs, PreferenceBatch, Sequence};
use dipole_lora::{AdapterMode, LoraConfig, TargetModules};
use dipole_loss::{ObjectiveConfig, ObjectiveState};
use dipole_models::rng::SeededRng;
use dipole_models::{CausalLm, MixedPrecision, ModelConfig};
use dipole_train::grads::clip_global_norm;
use dipole_train::{Reference, StepContext, preference_step, reference_logps};
use serde::{Deserialize, Serialize};

use crate::backend::BackendKind;

pub const CONFIGS: [&str; 13] = [
    "full",
    "lora",
    "full_precompute",
    "lora_precompute",
    "full_t1024",
    "lora_t1024",
    // per-layer recompute (`train.gradient_checkpointing = true`; TRL's default, `full_gc` there)
    "full_gc",
    "lora_gc",
    // memory comparisons: burn's activation checkpointing, and the textbook log-probs (full
    // [rows, T, vocab] log-softmax over every position, then gather) instead of dipole's
    "full_checkpointed",
    "full_naive_logps",
    "full_naive_logps_t1024",
    // mixed precision (`train.mixed_precision = "bf16"`): for GPU backends; flex converts to f32
    "full_bf16",
    "lora_bf16",
];

/// The shapes `--shape` names: each a Hugging Face `config.json` of that architecture's real sizes.
pub const SHAPES: [(&str, &str); 5] = [
    ("bench-17m", include_str!("../shapes/bench-17m.json")),
    ("smollm2-135m", include_str!("../shapes/smollm2-135m.json")),
    ("qwen2.5-0.5b", include_str!("../shapes/qwen2.5-0.5b.json")),
    ("llama-3.2-1b", include_str!("../shapes/llama-3.2-1b.json")),
    ("mistral-7b", include_str!("../shapes/mistral-7b.json")),
];

/// The model config of shape `name`.
pub fn shape_config(name: &str) -> Result<ModelConfig> {
    let (_, json) = SHAPES
        .iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| anyhow!("--shape: unknown {name:?}; expected {}", SHAPES.map(|(n, _)| n).join(", ")))?;
    Ok(ModelConfig::from_json_str(json, std::path::Path::new(&format!("xtask/shapes/{name}.json")))?)
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Model shape (see `xtask/shapes/`): bench-17m, smollm2-135m, qwen2.5-0.5b, llama-3.2-1b, mistral-7b.
    #[arg(long, default_value = "bench-17m")]
    pub shape: String,
    /// Tokens per sequence (a quarter prompt, the rest completion); `*_t1024` configurations use 1024.
    #[arg(long, default_value_t = 256, value_parser = crate::flags::at_least_one)]
    pub max_length: usize,
    /// Preference pairs per step (each two rows of `--max-length` tokens).
    #[arg(long, default_value_t = 4, value_parser = crate::flags::at_least_one)]
    pub pairs: usize,
    /// The shape with another vocabulary size (to see what the vocabulary costs); at least 4, as the
    /// random pairs draw tokens from 3 up (0-2 are padding, BOS and EOS).
    #[arg(long, value_parser = vocab_size)]
    pub vocab_size: Option<usize>,
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
    /// CPU threads (sets RAYON_NUM_THREADS for each measured process).
    #[arg(long, value_parser = crate::flags::at_least_one)]
    pub threads: Option<usize>,
    /// Shards per batch (`train.batch_shards`; 0 = auto: one per CPU thread on the CPU backend).
    #[arg(long, default_value_t = 0)]
    pub shards: usize,
    /// Run every row whole instead of each pair's prompt once (`train.prefix_sharing = false`).
    #[arg(long)]
    pub no_prefix_sharing: bool,
    /// Keep every layer's attention probabilities for the backward pass
    /// (`train.attention_recompute = false`).
    #[arg(long)]
    pub no_attention_recompute: bool,
    /// Never pack sequences end to end (`train.padding_free = false`).
    #[arg(long)]
    pub no_padding_free: bool,
    /// Completion lengths drawn uniformly from this fraction of the longest up to the longest
    /// (1: every completion full length, the default), for a length-skewed batch.
    #[arg(long, default_value_t = 1.0, value_parser = crate::flags::unit)]
    pub min_completion: f64,
    /// Make the whole `[rows, T, vocab]` logits instead of the fused, tiled LM head
    /// (`train.fused_lm_head = false`).
    #[arg(long)]
    pub no_fused_head: bool,
    #[arg(long, default_value_t = 20, value_parser = crate::flags::at_least_one)]
    pub steps: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Configurations to run (default: all).
    #[arg(long, value_delimiter = ',')]
    pub configs: Vec<String>,
    /// Where the JSON results go.
    #[arg(long, default_value = "bench_results.json")]
    pub out: PathBuf,
    /// Run exactly one configuration in this process (used by the parent run).
    #[arg(long, hide = true)]
    pub only: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchResult {
    pub config: String,
    #[serde(default)]
    pub shape: String,
    pub backend: String,
    pub threads: Option<usize>,
    /// Shards each batch was split into.
    #[serde(default)]
    pub shards: usize,
    /// Whether each pair's prompt ran once (`train.prefix_sharing`).
    #[serde(default)]
    pub prefix_sharing: bool,
    /// Whether attention recomputed its probabilities in the backward pass (`train.attention_recompute`).
    #[serde(default)]
    pub attention_recompute: bool,
    /// Whether the LM head ran fused with the log-probs (`train.fused_lm_head`).
    #[serde(default)]
    pub fused_head: bool,
    #[serde(default)]
    pub pairs: usize,
    #[serde(default)]
    pub vocab_size: usize,
    pub params: usize,
    pub trainable_params: usize,
    pub seq_len: usize,
    pub steps: usize,
    pub seconds_per_step: f64,
    /// Chosen + rejected tokens (prompt included) per second.
    pub tokens_per_second: f64,
    pub completion_tokens_per_second: f64,
    /// Per trained token 4N (forward, and the backward pass's activation gradients) plus 2 per
    /// trainable parameter (its weight gradient): 6N in full fine-tuning, about 4N with LoRA; plus 2N
    /// per reference token (N = parameters).
    pub achieved_flops: f64,
    pub peak_rss_mib: f64,
    /// Seconds of the one-off reference pass (precompute configurations).
    pub precompute_seconds: Option<f64>,
    /// Where a step's seconds go (means over the timed steps).
    #[serde(default)]
    pub phases: PhaseSeconds,
    /// Where the peak memory is reached.
    #[serde(default)]
    pub phase_peaks: PhasePeaks,
    /// The peak `cargo xtask plan` gives for this run (see `dipole_train::plan`), MiB.
    #[serde(default)]
    pub planned_peak_mib: f64,
}

/// A step's seconds by phase. Exact on CPU backends, whose kernels finish before the call returns;
/// GPU backends queue kernels, so there only the forward pass (which reads the loss back) and the
/// whole step (which reads a weight back) end at a sync, and backward vs optimizer is approximate.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct PhaseSeconds {
    /// The reference's and the policy's forward passes and the objective.
    pub forward: f64,
    pub backward: f64,
    /// Global-norm clipping and AdamW.
    pub optimizer: f64,
}

/// Peak resident MiB by phase, each the highest over the timed and warmup steps (Linux restarts
/// the peak at each phase; elsewhere every phase reads the process's peak so far).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct PhasePeaks {
    /// Building the models and batches (and a precomputed reference's pass).
    pub setup: f64,
    pub forward: f64,
    pub backward: f64,
    pub optimizer: f64,
}

impl PhasePeaks {
    fn highest(&self) -> f64 {
        self.setup.max(self.forward).max(self.backward).max(self.optimizer)
    }
}

/// The peak since the last [`next_phase`] (MiB), restarting it for the phase that follows.
fn next_phase() -> f64 {
    let peak = dipole_train::metrics::peak_rss_mb().unwrap_or(f64::NAN);
    dipole_train::metrics::restart_peak_rss();
    peak
}

/// `--vocab-size`: at least 4 (see [`BenchArgs::vocab_size`]).
fn vocab_size(s: &str) -> Result<usize, String> {
    match crate::flags::at_least_one(s)? {
        v if v < 4 => Err(format!("must be at least 4 (token ids 0-2 are special), got {v}")),
        v => Ok(v),
    }
}

/// `pairs` random pairs, each sharing a prompt of `prompt` tokens between completions of
/// `completion` tokens, or with `min_completion < 1` of a length drawn uniformly from
/// `min_completion · completion` up to `completion`.
fn random_batch(pairs: usize, prompt: usize, completion: usize, min_completion: f64, vocab: u32, seed: u64) -> PreferenceBatch {
    let mut rng = SeededRng::new(seed);
    let shortest = ((min_completion * completion as f64).ceil() as usize).clamp(1, completion);
    let token = |rng: &mut SeededRng| 3 + (rng.next_u64() % (vocab as u64 - 3)) as u32;
    let items: Vec<PairInputs> = (0..pairs)
        .map(|index| {
            let p: Vec<u32> = std::iter::once(1).chain((1..prompt).map(|_| token(&mut rng))).collect();
            let mut seq = || {
                let len = shortest + (rng.next_u64() % (completion - shortest + 1) as u64) as usize;
                let mut ids = p.clone();
                ids.extend((1..len).map(|_| token(&mut rng)));
                ids.push(2);
                let mask = (0..ids.len()).map(|i| (i >= prompt) as u8).collect();
                Sequence { input_ids: ids, completion_mask: mask }
            };
            let chosen = seq();
            PairInputs { index, chosen, rejected: seq() }
        })
        .collect();
    PreferenceBatch::new(&items, 0)
}

/// Mean real tokens per batch: `(all, completion)`.
fn mean_tokens(batches: &[PreferenceBatch]) -> (f64, f64) {
    let n = batches.len().max(1) as f64;
    let all: usize = batches.iter().map(|b| b.lengths().iter().sum::<usize>()).sum();
    let completion: usize = batches.iter().map(|b| b.completion_mask.iter().flatten().map(|&m| m as usize).sum::<usize>()).sum();
    (all as f64 / n, completion as f64 / n)
}

pub fn run(args: BenchArgs) -> Result<()> {
    if let Some(only) = args.only.clone() {
        let result = crate::with_backend!(args.backend, run_one(&args, &only))?;
        println!("{}", serde_json::to_string(&result)?);
        return Ok(());
    }
    shape_config(&args.shape)?;
    let configs: Vec<String> = if args.configs.is_empty() { CONFIGS.iter().map(|s| s.to_string()).collect() } else { args.configs.clone() };
    for c in &configs {
        if !CONFIGS.contains(&c.as_str()) {
            return Err(anyhow!("--configs: unknown {c:?}; expected {}", CONFIGS.join(", ")));
        }
    }
    let exe = std::env::current_exe()?;
    let mut results = Vec::new();
    println!(
        "{:<16} {:>10} {:>10} {:>12} {:>10} {:>10} {:>11} {:>8} {:>8} {:>8}",
        "config", "tok/s", "s/step", "GFLOP/s", "peak MiB", "plan MiB", "trainable", "fwd s", "bwd s", "opt s"
    );
    for c in &configs {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["bench", "--only", c, "--steps", &args.steps.to_string(), "--warmup", &args.warmup.to_string()]);
        cmd.args(["--shape", &args.shape, "--max-length", &args.max_length.to_string(), "--pairs", &args.pairs.to_string()]);
        if let Some(v) = args.vocab_size {
            cmd.args(["--vocab-size", &v.to_string()]);
        }
        cmd.args(["--backend", &format!("{:?}", args.backend).to_lowercase(), "--shards", &args.shards.to_string()]);
        if args.no_prefix_sharing {
            cmd.arg("--no-prefix-sharing");
        }
        if args.no_fused_head {
            cmd.arg("--no-fused-head");
        }
        if args.no_padding_free {
            cmd.arg("--no-padding-free");
        }
        if args.no_attention_recompute {
            cmd.arg("--no-attention-recompute");
        }
        cmd.args(["--min-completion", &args.min_completion.to_string()]);
        if let Some(t) = args.threads {
            cmd.env("RAYON_NUM_THREADS", t.to_string());
            cmd.args(["--threads", &t.to_string()]);
        }
        let out = cmd.output().with_context(|| format!("running bench {c}"))?;
        if !out.status.success() {
            return Err(anyhow!("bench {c} failed:\n{}", String::from_utf8_lossy(&out.stderr)));
        }
        let line = String::from_utf8_lossy(&out.stdout);
        let r: BenchResult = serde_json::from_str(line.lines().last().unwrap_or("")).with_context(|| format!("bench {c} output"))?;
        println!(
            "{:<16} {:>10.1} {:>10.3} {:>12.2} {:>10.1} {:>10.1} {:>11} {:>8.3} {:>8.3} {:>8.3}",
            r.config,
            r.tokens_per_second,
            r.seconds_per_step,
            r.achieved_flops / 1e9,
            r.peak_rss_mib,
            r.planned_peak_mib,
            r.trainable_params,
            r.phases.forward,
            r.phases.backward,
            r.phases.optimizer
        );
        results.push(r);
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&results)?)?;
    println!("wrote {}", args.out.display());
    Ok(())
}

fn run_one<B: Backend>(device: &B::Device, args: &BenchArgs, name: &str) -> Result<BenchResult> {
    if name == "full_checkpointed" {
        run_with::<Autodiff<B, burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing>>(device, args, name)
    } else {
        run_with::<Autodiff<B>>(device, args, name)
    }
}

/// DPO sigmoid loss from log-probs computed the textbook way: logits at every position, the whole
/// `[rows, T, vocab]` log-softmax, then the labels gathered.
fn naive_dpo_loss<B: AutodiffBackend>(policy: &CausalLm<B>, reference: &[(f32, f32)], batch: &PreferenceBatch, device: &B::Device) -> burn::tensor::Tensor<B, 1> {
    use burn::tensor::{Tensor, TensorData, activation::log_softmax};
    let t = dipole_train::BatchTensors::<B>::new(batch, device);
    let logits = policy.forward(t.input_ids.clone(), Some(t.attention_mask));
    let [rows, len, vocab] = logits.dims();
    let logp = log_softmax(logits.slice([0..rows, 0..len - 1, 0..vocab]), 2);
    let labels = t.input_ids.slice([0..rows, 1..len]);
    let picked = logp.gather(2, labels.unsqueeze_dim::<3>(2)).squeeze_dim::<2>(2);
    let sums = (picked * t.completion_mask.slice([0..rows, 1..len])).sum_dim(1).squeeze_dim::<1>(1);
    let b = rows / 2;
    let refs: Vec<f32> = reference.iter().map(|r| r.0 - r.1).collect();
    let ref_margin = Tensor::<B, 1>::from_data(TensorData::new(refs, [b]), device);
    let logits = (sums.clone().narrow(0, 0, b) - sums.narrow(0, b, b) - ref_margin).mul_scalar(0.1);
    burn::tensor::activation::log_sigmoid(logits).neg().mean()
}

/// What a configuration's name selects.
struct Variant {
    /// Textbook log-probs (`naive_dpo_loss`) instead of `preference_step`.
    naive: bool,
    lora: bool,
    /// Reference log-probs computed once before training.
    precompute: bool,
    prompt: usize,
    completion: usize,
    precision: MixedPrecision,
    /// Per-layer recompute (`train.gradient_checkpointing = true`).
    layer_recompute: bool,
}

impl Variant {
    fn of(name: &str, max_length: usize) -> Self {
        let length = if name.ends_with("t1024") { 1024 } else { max_length };
        let prompt = (length / 4).max(1);
        let completion = (length - prompt).max(1);
        Variant {
            naive: name.starts_with("full_naive_logps"),
            lora: name.starts_with("lora"),
            precompute: name.ends_with("precompute"),
            prompt,
            completion,
            precision: if name.ends_with("bf16") { MixedPrecision::Bf16 } else { MixedPrecision::No },
            layer_recompute: name.ends_with("_gc"),
        }
    }

}

/// The policy to train: random init (seed 0), LoRA r 16 on q/v under `lora`, the variant's
/// precision and `--no-prefix-sharing`.
fn bench_policy<AB: AutodiffBackend>(device: &AB::Device, args: &BenchArgs, name: &str, v: &Variant, config: &ModelConfig) -> Result<CausalLm<AB>> {
    let mut policy = CausalLm::<AB>::init(config.clone(), 0, device);
    if v.lora {
        let lc = LoraConfig {
            r: 16,
            lora_alpha: 32.0,
            target_modules: TargetModules::List(vec!["q_proj".into(), "v_proj".into()]),
            ..Default::default()
        };
        policy.add_lora(&lc, 0).map_err(|e| anyhow!(e.to_string()))?;
    }
    v.precision.check_backend::<AB>(device).map_err(|e| anyhow!("{name}: {e}"))?;
    policy.set_mixed_precision(v.precision);
    policy.prefix_sharing = !args.no_prefix_sharing;
    policy.fused_head = !args.no_fused_head;
    policy.padding_free = !args.no_padding_free;
    policy.attention_recompute = !args.no_attention_recompute;
    policy.layer_recompute = v.layer_recompute;
    policy.assign_stable_param_ids();
    Ok(policy)
}

/// The frozen reference copy (the policy's init, no autodiff) full fine-tuning runs each step
/// against; none with LoRA (the policy's base is the reference) or a precomputed reference.
fn frozen_reference<B: Backend>(device: &B::Device, args: &BenchArgs, v: &Variant, config: &ModelConfig) -> Option<CausalLm<B>> {
    (!v.lora && !v.precompute).then(|| {
        let mut m = CausalLm::<B>::init(config.clone(), 0, device);
        m.set_mixed_precision(v.precision);
        m.prefix_sharing = !args.no_prefix_sharing;
        m.fused_head = !args.no_fused_head;
        m.padding_free = !args.no_padding_free;
        m
    })
}

/// The reference log-probs of every batch, computed once, and the seconds that took.
fn precompute_references<AB: AutodiffBackend>(policy: &CausalLm<AB>, batches: &[PreferenceBatch], lora: bool, shards: usize, device: &AB::Device) -> (Vec<Vec<(f32, f32)>>, f64) {
    let t = Instant::now();
    let mode = if lora { AdapterMode::Disabled } else { AdapterMode::Active };
    let v = batches.iter().map(|b| reference_logps(policy, Reference::Policy(mode), b, None, shards, device).expect("reference")).collect();
    (v, t.elapsed().as_secs_f64())
}

/// One step's gradients, with the seconds and peak MiB (see [`next_phase`]) of its forward pass
/// (counted from `started`) and its backward pass.
struct StepPhases {
    grads: GradientsParams,
    forward: f64,
    backward: f64,
    forward_peak: f64,
    backward_peak: f64,
}

/// One step's forward and backward passes, as the trainer runs them: shards on parallel threads,
/// each running its reference pass, then its policy's.
fn forward_backward<AB: AutodiffBackend>(policy: &CausalLm<AB>, reference: Reference<AB>, batch: &PreferenceBatch, naive: bool, ctx: StepContext<'_>, started: Instant, device: &AB::Device) -> StepPhases {
    let backward_pass: Box<dyn FnOnce() -> GradientsParams + '_> = if naive {
        let values = reference_logps(policy, reference, batch, None, ctx.shards, device).expect("reference");
        let loss = naive_dpo_loss(policy, &values, batch, device);
        Box::new(move || GradientsParams::from_grads(loss.backward(), policy))
    } else {
        let train_step = preference_step(policy, reference, batch, ctx, device);
        Box::new(move || train_step.backward(1.0))
    };
    let (forward, forward_peak) = (started.elapsed().as_secs_f64(), next_phase());
    let backward_started = Instant::now();
    let grads = backward_pass();
    StepPhases { grads, forward, backward: backward_started.elapsed().as_secs_f64(), forward_peak, backward_peak: next_phase() }
}

/// What the timed steps measured: total seconds, and per phase; peak memory per phase over all steps.
struct Timed {
    seconds: f64,
    phases: PhaseSeconds,
    peaks: PhasePeaks,
}

/// A configuration ready to time: its batches, where their reference log-probs come from, and the
/// shards each is split into.
struct Workload<'a, AB: AutodiffBackend> {
    variant: Variant,
    args: &'a BenchArgs,
    batches: Vec<PreferenceBatch>,
    /// Reference log-probs per batch (precompute configurations).
    cached: Vec<Vec<(f32, f32)>>,
    /// The frozen reference copy (full fine-tuning without a precomputed reference).
    frozen: Option<CausalLm<AB::InnerBackend>>,
    shards: usize,
}

impl<AB: AutodiffBackend> Workload<'_, AB> {
    /// Where batch `k`'s reference log-probs come from: the cache, the policy with its adapters
    /// off (LoRA), or the frozen copy (full fine-tuning).
    fn reference(&self, k: usize) -> Reference<AB> {
        if self.variant.precompute {
            Reference::Precomputed(self.cached[k].clone())
        } else if self.variant.lora {
            Reference::Policy(AdapterMode::Disabled)
        } else {
            Reference::Model(self.frozen.clone().expect("frozen copy"))
        }
    }

    /// `--warmup` then `--steps` AdamW steps (sigmoid DPO, clipping at 1) cycling over the
    /// batches; only the steps after the warmup are timed.
    fn train_timed(&self, mut policy: CausalLm<AB>, device: &AB::Device) -> Timed {
        let objective = ObjectiveConfig::default();
        // the trainer's AdamW with the config's defaults (TRL's: betas 0.9 / 0.999, eps 1e-8, no weight decay)
        let mut optimizer = dipole_train::FusedAdamW::of(&dipole_train::config::OptimSection::default()).init::<AB, CausalLm<AB>>();
        let mut state = ObjectiveState::default();
        let mut timed = Timed { seconds: 0.0, phases: PhaseSeconds::default(), peaks: PhasePeaks { setup: next_phase(), ..PhasePeaks::default() } };
        for step in 0..self.args.warmup + self.args.steps {
            let k = step % self.batches.len();
            let started = Instant::now();
            let reference = self.reference(k);
            let ctx = StepContext { objective: &objective, state: &mut state, shards: self.shards };
            let StepPhases { mut grads, forward, backward, forward_peak, backward_peak } = forward_backward(&policy, reference, &self.batches[k], self.variant.naive, ctx, started, device);
            let optimizer_started = Instant::now();
            clip_global_norm::<AB, CausalLm<AB>>(&policy, &mut grads, Some(1.0));
            policy = optimizer.step(1e-6, policy, grads);
            // reading a value waits for the device
            let _sync: f32 = policy.norm.weight.val().sum().into_scalar().elem();
            let p = &mut timed.peaks;
            (p.forward, p.backward, p.optimizer) = (p.forward.max(forward_peak), p.backward.max(backward_peak), p.optimizer.max(next_phase()));
            if step >= self.args.warmup {
                timed.seconds += started.elapsed().as_secs_f64();
                timed.phases.forward += forward;
                timed.phases.backward += backward;
                timed.phases.optimizer += optimizer_started.elapsed().as_secs_f64();
            }
        }
        timed
    }
}

/// The plan of this configuration's run, as `cargo xtask plan` makes it for the same settings
/// (random init in f32, so every matrix is held in f32).
fn planned_peak(args: &BenchArgs, v: &Variant, model: &ModelConfig, shards: usize) -> f64 {
    use dipole_train::config::{GradientCheckpointing, ReferenceStrategy};
    let mut config = dipole_train::TrainConfig::default();
    config.lora.enabled = v.lora;
    config.lora.r = 16;
    config.lora.alpha = 32.0;
    config.lora.target_modules = vec!["q_proj".into(), "v_proj".into()];
    let train = &mut config.train;
    train.batch_size = args.pairs;
    train.gradient_checkpointing = if v.layer_recompute { GradientCheckpointing::Layers } else { GradientCheckpointing::Off };
    train.reference = if v.precompute { ReferenceStrategy::Precompute } else { ReferenceStrategy::Auto };
    train.mixed_precision = v.precision;
    train.prefix_sharing = !args.no_prefix_sharing;
    train.padding_free = !args.no_padding_free;
    train.attention_recompute = !args.no_attention_recompute;
    train.fused_lm_head = !args.no_fused_head;
    let rows = dipole_train::plan::RowLengths { prompt: v.prompt, completion: v.completion };
    let inputs = dipole_train::plan::PlanInputs { config: &config, model, frozen_bytes: 4, rows, shards };
    dipole_train::plan::MemoryPlan::new(&inputs).map_or(f64::NAN, |plan| plan.peak)
}

fn run_with<AB: AutodiffBackend>(device: &AB::Device, args: &BenchArgs, name: &str) -> Result<BenchResult> {
    let variant = Variant::of(name, args.max_length);
    let mut config = shape_config(&args.shape)?;
    if let Some(vocab) = args.vocab_size {
        config.vocab_size = vocab;
    }
    let params = config.num_parameters();
    let policy = bench_policy::<AB>(device, args, name, &variant, &config)?;
    let trainable = policy.num_trainable_params();
    let frozen = frozen_reference::<AB::InnerBackend>(device, args, &variant, &config);
    let vocab = config.vocab_size as u32;
    let batches: Vec<PreferenceBatch> = (0..4).map(|k| random_batch(args.pairs, variant.prompt, variant.completion, args.min_completion, vocab, k)).collect();
    let shards = dipole_train::batch_shards::<AB>(args.shards, args.pairs, device);
    let (cached, precompute_seconds) = if variant.precompute {
        let (cached, seconds) = precompute_references(&policy, &batches, variant.lora, shards, device);
        (cached, Some(seconds))
    } else {
        (Vec::new(), None)
    };
    let workload = Workload { variant, args, batches, cached, frozen, shards };
    let timed = workload.train_timed(policy, device);
    let (prompt, completion, precompute) = (workload.variant.prompt, workload.variant.completion, workload.variant.precompute);
    let per_step = |total: f64| total / args.steps as f64;
    let phases = PhaseSeconds { forward: per_step(timed.phases.forward), backward: per_step(timed.phases.backward), optimizer: per_step(timed.phases.optimizer) };
    let seq = prompt + completion;
    let (tokens_per_step, completion_per_step) = mean_tokens(&workload.batches);
    let seconds_per_step = per_step(timed.seconds);
    let reference_tokens = if precompute { 0.0 } else { tokens_per_step };
    let flops_per_step = (4.0 * params as f64 + 2.0 * trainable as f64) * tokens_per_step + 2.0 * params as f64 * reference_tokens;
    Ok(BenchResult {
        config: name.to_string(),
        shape: args.shape.clone(),
        backend: format!("{:?}", args.backend).to_lowercase(),
        threads: args.threads,
        shards,
        prefix_sharing: !args.no_prefix_sharing,
        fused_head: !args.no_fused_head,
        attention_recompute: !args.no_attention_recompute,
        pairs: args.pairs,
        vocab_size: config.vocab_size,
        params,
        trainable_params: trainable,
        seq_len: seq,
        steps: args.steps,
        seconds_per_step,
        tokens_per_second: tokens_per_step / seconds_per_step,
        completion_tokens_per_second: completion_per_step / seconds_per_step,
        achieved_flops: flops_per_step / seconds_per_step,
        peak_rss_mib: timed.peaks.highest(),
        planned_peak_mib: planned_peak(args, &workload.variant, &config, shards) / (1 << 20) as f64,
        phase_peaks: timed.peaks,
        precompute_seconds,
        phases,
    })
}

#[cfg(test)]
mod shape_tests {
    use super::*;

    #[test]
    fn vocab_sizes_below_four_are_refused() {
        assert_eq!(vocab_size("4"), Ok(4));
        assert_eq!(vocab_size("3"), Err("must be at least 4 (token ids 0-2 are special), got 3".to_string()));
        assert!(vocab_size("0").is_err() && vocab_size("x").is_err());
    }

    /// Parameter counts of the released checkpoints these shapes copy (their model cards round them
    /// to 135M, 0.49B, 1.24B and 7.24B), and the criterion benches' shape for `bench-17m`.
    #[test]
    fn shapes_have_the_released_models_sizes() {
        let bench = ModelConfig::llama(dipole_models::LlamaShape::BENCHMARK).unwrap();
        assert_eq!(shape_config("bench-17m").unwrap().num_parameters(), bench.num_parameters());
        for (name, params) in [("smollm2-135m", 134_515_008), ("qwen2.5-0.5b", 494_032_768), ("llama-3.2-1b", 1_235_814_400), ("mistral-7b", 7_241_732_096)] {
            assert_eq!(shape_config(name).unwrap().num_parameters(), params, "{name}");
        }
        let err = shape_config("gpt2").unwrap_err().to_string();
        assert_eq!(err, "--shape: unknown \"gpt2\"; expected bench-17m, smollm2-135m, qwen2.5-0.5b, llama-3.2-1b, mistral-7b");
    }
}
