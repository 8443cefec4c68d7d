//! The training loop: SFT or any preference objective, LoRA or full fine-tuning, on any autodiff
//! backend. One readable function; every step is a plain call (see DESIGN.md, "One DPO step").

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::ElementConversion;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::backend::Backend;
use dipole_data::{
    CompletionInputs, LengthOptions, PairInputs, PairsAs, PreferenceBatch, ReadOptions, SequenceBatch, Tokenizer, TruncationMode,
    kto_pairs, load_completions_with, load_pairs_with,
};
use dipole_lora::AdapterMode;
use dipole_loss::{LossType, ObjectiveConfig, ObjectiveState};
use dipole_models::{CausalLm, ExportDtype, MixedPrecision, ModelConfig};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{RunLock, check_resume_config, checkpoint_dirs, is_sealed, publish, verify, write_json};
use crate::config::{ReferenceStrategy, Stage, TrainConfig};
use crate::grads::{accumulate, clip_global_norm, scale};
use crate::scaler::LossScaler;
use crate::precompute::{CacheInputs, ReferenceCache};
use crate::schedule::Schedule;
use crate::step::{Reference, StepOutput, batch_shards, objective_on_batch, preference_step, reference_logps, sft_on_batch, sft_step};

/// Everything a run needs besides its config.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Continue from this checkpoint folder (or the latest in `output_dir` with `Latest`).
    pub resume: Option<Resume>,
    /// Stop (as if killed) after this many optimizer steps; checkpoints are what survives.
    pub stop_after: Option<usize>,
}

#[derive(Clone, Debug)]
pub enum Resume {
    Latest,
    Path(PathBuf),
}

/// What the loop keeps between steps, saved in every checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// Micro-batches consumed (the data cursor across epochs).
    pub batches_seen: usize,
    pub num_tokens: u64,
    pub objective: ObjectiveState,
    pub skipped_steps: usize,
    /// fp16 mixed precision's dynamic loss scale.
    #[serde(default)]
    pub loss_scaler: Option<LossScaler>,
    /// Shards of a full micro-batch (`train.batch_shards` resolved on the machine that ran it; 0 in
    /// states written before shards existed).
    #[serde(default)]
    pub batch_shards: usize,
    /// Steps skipped because their loss or gradients were not finite (`train.skip_nonfinite`);
    /// fp16 overflows, routine, are not counted here.
    #[serde(default)]
    pub nonfinite_steps: usize,
    /// BLAKE3 of the training examples as tokenised (ids, masks, labels, order), compared on resume:
    /// another file, split or tokenisation would make the saved data cursor meaningless.
    #[serde(default)]
    pub train_data: Option<String>,
}

/// The outcome of a run.
#[derive(Clone, Debug, Default)]
pub struct TrainSummary {
    pub steps: usize,
    /// Loss of every optimizer step (mean over its micro-batches), in order.
    pub step_losses: Vec<f64>,
    /// Pre-clip global gradient norm of every step.
    pub grad_norms: Vec<f64>,
    /// One entry per logging step, TRL's names.
    pub log_history: Vec<BTreeMap<String, f64>>,
    /// Metrics of the final evaluation (`eval_*`), when there is an eval set.
    pub final_eval: Option<BTreeMap<String, f64>>,
    /// Metrics of the evaluation before the first step (`train.eval_on_start`).
    pub initial_eval: Option<BTreeMap<String, f64>>,
    /// The generations file, when generations were written.
    pub generations: Option<PathBuf>,
    /// Where the final adapter or model was written.
    pub final_dir: PathBuf,
}

pub type TrainResult<T> = Result<T, String>;

/// Deterministic batch order: epoch `e` is a seeded permutation of the pairs (or file order).
pub struct DataOrder {
    pub num_pairs: usize,
    pub batch_size: usize,
    pub shuffle: bool,
    pub seed: u64,
    /// Length-grouped sampling: within windows of 50 batches of the permutation, pairs are sorted
    /// by length (longest first), so batches hold similar lengths and pad less.
    pub lengths: Option<Vec<usize>>,
}

impl DataOrder {
    pub fn batches_per_epoch(&self) -> usize {
        self.num_pairs.div_ceil(self.batch_size)
    }

    /// Pair indices of micro-batch number `k` counted from the start of training.
    pub fn batch(&self, k: usize) -> Vec<usize> {
        let per_epoch = self.batches_per_epoch();
        let (epoch, within) = (k / per_epoch, k % per_epoch);
        let mut order: Vec<usize> = (0..self.num_pairs).collect();
        if self.shuffle {
            let mut rng = dipole_models::rng::SplitMix64::new(self.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for i in (1..order.len()).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                order.swap(i, j);
            }
        }
        if let Some(lengths) = &self.lengths {
            for window in order.chunks_mut(self.batch_size * 50) {
                window.sort_by(|a, b| lengths[*b].cmp(&lengths[*a]));
            }
        }
        let start = within * self.batch_size;
        order[start..(start + self.batch_size).min(self.num_pairs)].to_vec()
    }
}

fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Each metric over a logging window: the mean over the batches that report it. KTO's per-class
/// metrics (batches carrying `count/chosen`, `count/rejected`) are pooled as TRL's `KTOTrainer`
/// does: sums over the window divided by the window's class count, margins from the pooled
/// rewards, and the counts themselves not logged.
fn mean_metrics(window: &[BTreeMap<String, f64>]) -> BTreeMap<String, f64> {
    let class_of = |key: &str| -> Option<&'static str> {
        let (metric, split) = key.split_once('/')?;
        if !["rewards", "logps", "logits"].contains(&metric) {
            return None;
        }
        ["chosen", "rejected"].into_iter().find(|s| *s == split)
    };
    let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let mut pooled = false;
    for m in window {
        for (k, v) in m {
            let weight = match class_of(k).and_then(|split| m.get(&format!("count/{split}"))) {
                Some(&count) => {
                    pooled = true;
                    count
                }
                None => 1.0,
            };
            let e = sums.entry(k.clone()).or_insert((0.0, 0.0));
            e.0 += v * weight;
            e.1 += weight;
        }
    }
    let mut out: BTreeMap<String, f64> = sums.into_iter().map(|(k, (sum, n))| (k, sum / n)).collect();
    if pooled {
        out.retain(|k, _| !k.starts_with("count/"));
        out.remove("rewards/margins");
        if let (Some(c), Some(r)) = (out.get("rewards/chosen"), out.get("rewards/rejected")) {
            out.insert("rewards/margins".into(), c - r);
        }
    }
    out
}

/// The objective a stage trains: SFT is the NLL of the chosen completions.
fn stage_objective(config: &TrainConfig) -> ObjectiveConfig {
    match config.train.stage {
        Stage::Dpo => config.objective.clone(),
        Stage::Sft => ObjectiveConfig {
            loss_type: vec![LossType::Sft],
            loss_weights: Vec::new(),
            ..config.objective.clone()
        },
    }
}

/// Resolves `auto` and checks the strategy fits the run.
pub fn resolve_reference(config: &TrainConfig) -> TrainResult<ReferenceStrategy> {
    let objective = stage_objective(config);
    Ok(match config.train.reference {
        ReferenceStrategy::Auto if objective.reference_free() => ReferenceStrategy::None,
        ReferenceStrategy::Auto if config.lora.enabled && config.lora.reference_adapter.is_some() => ReferenceStrategy::RefAdapter,
        ReferenceStrategy::Auto if config.lora.enabled => ReferenceStrategy::AdapterOff,
        ReferenceStrategy::Auto => ReferenceStrategy::FrozenCopy,
        ReferenceStrategy::Precompute if objective.reference_free() => {
            return Err(format!(
                "train.reference = \"precompute\" but loss_type {:?} (stage {:?}) uses no reference",
                objective.loss_type.iter().map(|t| t.name()).collect::<Vec<_>>(),
                config.train.stage
            ));
        }
        ReferenceStrategy::None if !objective.reference_free() => {
            return Err(format!(
                "train.reference = \"none\" but loss_type {:?} needs reference log-probs",
                objective.loss_type.iter().map(|t| t.name()).collect::<Vec<_>>()
            ));
        }
        other => other,
    })
}

/// Builds the policy the config describes, from the base model or from a checkpoint.
fn build_policy<B: AutodiffBackend>(config: &TrainConfig, checkpoint: Option<&Path>, device: &B::Device) -> TrainResult<CausalLm<B>> {
    let base = &config.model.path;
    let full_weights = match checkpoint {
        Some(dir) if !config.lora.enabled => dir.join("model"),
        _ => base.clone(),
    };
    let mut model = match checkpoint {
        None => base_model::<B>(config, device)?,
        Some(_) => CausalLm::<B>::load(&full_weights, device).map_err(|e| e.to_string())?.0,
    };
    if config.lora.enabled {
        let lora = config.lora.lora_config(base)?;
        if let Some(dir) = checkpoint {
            model.load_adapter(&dir.join("adapter")).map_err(|e| e.to_string())?;
        } else if let Some(init) = &config.lora.init_adapter {
            model.load_adapter(init).map_err(|e| format!("lora.init_adapter: {e}"))?;
        } else {
            check_lora_fits(&lora, &mut model)?;
            model.add_lora(&lora, config.train.seed).map_err(|e| e.to_string())?;
        }
        if let Some(reference) = &config.lora.reference_adapter {
            model.load_reference_adapter(reference).map_err(|e| format!("lora.reference_adapter: {e}"))?;
        }
        if config.train.disable_dropout {
            for (_, l) in model.linears_mut() {
                if let Some(a) = &mut l.adapter {
                    a.dropout = 0.0;
                }
            }
        }
    } else {
        model.set_embeddings_trainable(!config.model.freeze_embeddings);
        for &layer in &config.model.freeze_layers {
            if layer >= model.layers.len() {
                return Err(format!("model.freeze_layers: layer {layer} does not exist (the model has {})", model.layers.len()));
            }
            model.set_layer_trainable(layer, false);
        }
    }
    model.assign_stable_param_ids();
    model.set_mixed_precision(config.train.mixed_precision);
    model.prefix_sharing = config.train.prefix_sharing;
    Ok(model)
}

/// `lora.layers_to_transform` must name layers the model has, and `lora.r` must not exceed the
/// smaller side of any layer it adapts (a rank above it adds parameters and no capacity).
fn check_lora_fits<B: Backend>(lora: &dipole_lora::LoraConfig, model: &mut CausalLm<B>) -> TrainResult<()> {
    let layers = model.layers.len();
    if let Some(bad) = lora.layers_to_transform.iter().flatten().find(|&&l| l >= layers) {
        let valid = if layers == 0 { "none".to_string() } else { format!("0..={}", layers - 1) };
        return Err(format!("lora.layers_to_transform: layer {bad} does not exist (the model has {layers}: {valid})"));
    }
    for (name, linear) in model.linears_mut() {
        let side = linear.in_features().min(linear.out_features());
        if lora.targets(&name) && lora.r > side {
            return Err(format!(
                "lora.r = {} is larger than {name} ({} -> {} features): the rank can be at most {side}",
                lora.r,
                linear.in_features(),
                linear.out_features()
            ));
        }
    }
    Ok(())
}

/// TR-DPO's soft update: `alpha * policy + (1 - alpha) * reference`, weight by weight.
fn mix_models<B: Backend>(policy: &CausalLm<B>, reference: &CausalLm<B>, alpha: f64) -> TrainResult<CausalLm<B>> {
    struct Mix(BTreeMap<String, Vec<f32>>);
    impl dipole_models::WeightSource for Mix {
        fn tensor(&mut self, name: &str, shape: &[usize], _kind: dipole_models::ParamKind) -> dipole_models::Result<Vec<f32>> {
            let v = self.0.remove(name).unwrap_or_else(|| panic!("{name}: both models have the same tensors"));
            assert_eq!(v.len(), shape.iter().product::<usize>(), "{name}");
            Ok(v)
        }
    }
    let reference_tensors: BTreeMap<String, Vec<f32>> = reference.hf_tensors().into_iter().map(|(n, _, v)| (n, v)).collect();
    let mut mixed = BTreeMap::new();
    for (name, _, p) in policy.hf_tensors() {
        let r = &reference_tensors[&name];
        let (a, b) = (alpha as f32, (1.0 - alpha) as f32);
        mixed.insert(name, p.iter().zip(r).map(|(p, r)| a * p + b * r).collect());
    }
    let device = reference.embed_tokens.device();
    let mut model = CausalLm::from_source(reference.config.clone(), &mut Mix(mixed), &device).map_err(|e| e.to_string())?;
    model.set_mixed_precision(reference.mixed_precision);
    model.prefix_sharing = reference.prefix_sharing;
    Ok(model)
}

fn mask_tokens(mask: &[Vec<u8>]) -> u64 {
    mask.iter().flatten().map(|&m| m as u64).sum()
}

fn report_skipped_and_dropped(config: &TrainConfig, skipped: &[dipole_data::DataError], dropped: &[usize], total: usize) {
    if !skipped.is_empty() {
        eprintln!("{} invalid training rows skipped:", skipped.len());
        for e in skipped {
            eprintln!("  {e}");
        }
    }
    if !dropped.is_empty() {
        eprintln!(
            "{} of {total} training records dropped: prompt alone reaches max_length {} (records {dropped:?})",
            dropped.len(),
            config.data.max_length,
        );
    }
}

/// The starting weights: the model folder's, or seeded random ones (`model.from_scratch`).
fn base_model<B: Backend>(config: &TrainConfig, device: &B::Device) -> TrainResult<CausalLm<B>> {
    let mut model = if config.model.from_scratch {
        let model_config = ModelConfig::from_dir(&config.model.path).map_err(|e| e.to_string())?;
        CausalLm::init(model_config, config.train.seed, device)
    } else {
        CausalLm::<B>::load(&config.model.path, device).map_err(|e| e.to_string())?.0
    };
    model.set_mixed_precision(config.train.mixed_precision);
    model.prefix_sharing = config.train.prefix_sharing;
    Ok(model)
}

/// A stage's examples: preference pairs, or single prompt + completion sequences (SFT).
enum Examples {
    /// Preference pairs; for KTO, unpaired examples with their KL sequences and desirable flags.
    Pairs(Vec<PairInputs>, Option<Vec<bool>>),
    Sequences(Vec<CompletionInputs>),
}

impl Examples {
    fn len(&self) -> usize {
        match self {
            Examples::Pairs(p, _) => p.len(),
            Examples::Sequences(s) => s.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// BLAKE3 of the examples as tokenised: ids and masks of every row, labels, in order.
    fn digest(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(&(self.len() as u64).to_le_bytes());
        match self {
            Examples::Pairs(pairs, labels) => {
                for p in pairs {
                    crate::precompute::hash_sequence(&mut h, &p.chosen);
                    crate::precompute::hash_sequence(&mut h, &p.rejected);
                }
                for &l in labels.iter().flatten() {
                    h.update(&[l as u8]);
                }
            }
            Examples::Sequences(seqs) => {
                for s in seqs {
                    crate::precompute::hash_sequence(&mut h, &s.sequence);
                    h.update(&[s.label.map_or(2, |l| l as u8)]);
                }
            }
        }
        h.finalize().to_hex().to_string()
    }

    /// Longest row of example `i` (length-grouped batching).
    fn row_len(&self, i: usize) -> usize {
        match self {
            Examples::Pairs(p, _) => p[i].chosen.input_ids.len().max(p[i].rejected.input_ids.len()),
            Examples::Sequences(s) => s[i].sequence.input_ids.len(),
        }
    }

    /// The prompt tokens of example `i` and its record index (generations).
    fn prompt(&self, i: usize) -> (usize, Vec<u32>) {
        let (index, seq) = match self {
            Examples::Pairs(p, _) => (p[i].index, &p[i].chosen),
            Examples::Sequences(s) => (s[i].index, &s[i].sequence),
        };
        (index, seq.input_ids[..seq.prompt_len()].to_vec())
    }
}

/// Saves the trainable weights of `policy` into `dir` (PEFT adapter, or an f32 HF folder).
fn save_weights<B: AutodiffBackend>(config: &TrainConfig, policy: &CausalLm<B>, dir: &Path) -> TrainResult<()> {
    if config.lora.enabled {
        let lora = config.lora.lora_config(&config.model.path)?;
        policy.save_adapter(&dir.join("adapter"), &lora).map_err(|e| e.to_string())
    } else {
        policy
            .save_hf(&dir.join("model"), ExportDtype::F32, usize::MAX, Some(&config.model.path))
            .map_err(|e| e.to_string())
    }
}

/// Runs the configured training. Prints a progress bar (when enabled) and writes
/// `metrics.jsonl`, checkpoints and the final adapter or model under `train.output_dir`.
pub fn train<B: AutodiffBackend>(config: &TrainConfig, options: &RunOptions, device: &B::Device) -> TrainResult<TrainSummary> {
    config.validate()?;
    let objective = stage_objective(config);
    let strategy = resolve_reference(config)?;
    let out_dir = config.train.output_dir.clone();
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let _lock = RunLock::acquire(&out_dir)?;

    // Data.
    let tokenizer = Tokenizer::from_dir(&config.model.path).map_err(|e| e.to_string())?;
    let lengths = LengthOptions {
        max_length: Some(config.data.max_length),
        truncation: if config.data.truncation == "keep_end" { TruncationMode::KeepEnd } else { TruncationMode::KeepStart },
        max_prompt_length: config.data.max_prompt_length,
    };
    let read = ReadOptions { format: None, skip_invalid: config.data.skip_invalid };
    // SFT and KTO read prompt + completion examples (pairs give their chosen side, or both sides).
    let completion_sets = |pairs_as: PairsAs| -> TrainResult<(Vec<CompletionInputs>, Vec<CompletionInputs>)> {
        let load = |path: &Path| load_completions_with(path, &tokenizer, lengths, read, pairs_as).map_err(|e| e.to_string());
        let prepared = load(&config.data.train)?;
        report_skipped_and_dropped(config, &prepared.skipped, &prepared.dropped, prepared.examples.len() + prepared.dropped.len());
        Ok(match &config.data.eval {
            Some(path) => (prepared.examples, load(path)?.examples),
            None => split_pairs(prepared.examples, config.data.eval_fraction, config.train.seed),
        })
    };
    let (train_set, eval_set) = if config.train.stage == Stage::Sft {
        let (train, eval) = completion_sets(PairsAs::Chosen)?;
        (Examples::Sequences(train), Examples::Sequences(eval))
    } else if objective.loss_type.iter().any(|t| t.unpaired()) {
        // KTO: each example with a mismatched KL sequence fixed by dataset order.
        let (train, eval) = completion_sets(PairsAs::Unpaired)?;
        let with_kl = |examples: &[CompletionInputs]| {
            kto_pairs(examples, config.train.batch_size, lengths.max_length, lengths.truncation).map_err(|e| e.to_string())
        };
        let ((train, train_labels), (eval, eval_labels)) = (with_kl(&train)?, with_kl(&eval)?);
        (Examples::Pairs(train, Some(train_labels)), Examples::Pairs(eval, Some(eval_labels)))
    } else {
        let prepared = load_pairs_with(&config.data.train, &tokenizer, lengths, read).map_err(|e| e.to_string())?;
        report_skipped_and_dropped(config, &prepared.skipped, &prepared.dropped, prepared.tokenized.len());
        let (train, eval) = match &config.data.eval {
            Some(path) => (prepared.pairs, load_pairs_with(path, &tokenizer, lengths, read).map_err(|e| e.to_string())?.pairs),
            None => split_pairs(prepared.pairs, config.data.eval_fraction, config.train.seed),
        };
        (Examples::Pairs(train, None), Examples::Pairs(eval, None))
    };
    if train_set.is_empty() {
        return Err(format!("{}: no training examples left after length filtering", config.data.train.display()));
    }
    let pad = tokenizer.pad_id();

    // Resume point.
    let resume_dir = match &options.resume {
        None => None,
        Some(Resume::Path(p)) => Some(p.clone()),
        Some(Resume::Latest) => Some(
            checkpoint_dirs(&out_dir)
                .pop()
                .map(|(_, p)| p)
                .ok_or_else(|| format!("--resume: {} holds no checkpoint-* folder to resume from", out_dir.display()))?,
        ),
    };
    if let Some(dir) = &resume_dir {
        if !dir.join("trainer_state.json").exists() {
            return Err(format!("--resume {}: not a checkpoint (no trainer_state.json)", dir.display()));
        }
        let saved = dir.join("config.json");
        let text = std::fs::read_to_string(&saved).map_err(|e| format!("{}: {e}", saved.display()))?;
        let saved: TrainConfig = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", saved.display()))?;
        check_resume_config(&saved, config, dir)?;
        verify(dir)?;
    }
    let mut state: TrainerState = match &resume_dir {
        Some(dir) => {
            let text = std::fs::read_to_string(dir.join("trainer_state.json")).map_err(|e| format!("{}: {e}", dir.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("{}/trainer_state.json: {e}", dir.display()))?
        }
        None => TrainerState::default(),
    };
    let train_data = train_set.digest();
    if let (Some(dir), Some(saved)) = (&resume_dir, &state.train_data)
        && *saved != train_data
    {
        return Err(format!(
            "--resume {}: the training examples differ from the checkpoint's (data.train, data.eval_fraction or the tokenisation changed; {} examples now)",
            dir.display(),
            train_set.len()
        ));
    }
    state.train_data = Some(train_data);
    let order = DataOrder {
        num_pairs: train_set.len(),
        batch_size: config.train.batch_size,
        shuffle: config.data.shuffle,
        seed: config.train.seed,
        lengths: config.data.group_by_length.then(|| (0..train_set.len()).map(|i| train_set.row_len(i)).collect()),
    };
    let accum = config.train.gradient_accumulation_steps;
    let steps_per_epoch = (order.batches_per_epoch() / accum).max(1);
    let total_steps = config
        .train
        .max_steps
        .unwrap_or_else(|| (config.train.num_train_epochs * steps_per_epoch as f64).ceil() as usize);
    let final_dir = config.train.final_dir.clone().unwrap_or_else(|| out_dir.join("final"));
    let final_weights = final_dir.join(if config.lora.enabled { "adapter" } else { "model" });
    // a run killed after its last checkpoint but before its final weights were whole still ends
    if resume_dir.is_some() && state.step >= total_steps && is_sealed(&final_weights) {
        return Err(format!(
            "--resume {}: the run finished there (step {} of {total_steps}; its weights are in {}); nothing left to train (raise train.max_steps or train.num_train_epochs to go on)",
            resume_dir.as_deref().unwrap_or(&out_dir).display(),
            state.step,
            final_weights.display()
        ));
    }
    config.train.mixed_precision.check_backend::<B>(device).map_err(|e| format!("train.mixed_precision: {e}"))?;
    // fp16 scales the loss; a run resumed in another precision drops the scaler
    state.loss_scaler = (config.train.mixed_precision == MixedPrecision::Fp16).then(|| state.loss_scaler.take().unwrap_or_default());

    // Models.
    let mut policy = build_policy::<B>(config, resume_dir.as_deref(), device)?;
    let longest = (0..train_set.len()).map(|i| train_set.row_len(i)).chain((0..eval_set.len()).map(|i| eval_set.row_len(i))).max().unwrap_or(0);
    // each shard pads to its own longest row: only the longest row's shard is surely that long
    let batch = config.train.batch_size.min(train_set.len().max(eval_set.len()));
    let per_shard = batch.div_ceil(batch_shards::<B>(config.train.batch_shards, batch, device).max(1));
    crate::memory::check_batch_fits::<B>(device, &policy.config, per_shard, longest, "data.max_length")?;
    if config.train.sync_ref_model && strategy != ReferenceStrategy::FrozenCopy {
        return Err(format!("train.sync_ref_model (TR-DPO) needs train.reference = \"frozen-copy\", not {strategy:?}"));
    }
    // In a RefCell: TR-DPO replaces it while the reference closure below holds it.
    let frozen_copy = std::cell::RefCell::new(match strategy {
        // TR-DPO's reference moves: a checkpoint holds the one it had reached.
        ReferenceStrategy::FrozenCopy => match &resume_dir {
            Some(dir) if config.train.sync_ref_model => {
                let mut reference = CausalLm::<B::InnerBackend>::load(dir.join("reference"), device).map_err(|e| e.to_string())?.0;
                reference.set_mixed_precision(config.train.mixed_precision);
                reference.prefix_sharing = config.train.prefix_sharing;
                Some(reference)
            }
            _ => Some(base_model::<B::InnerBackend>(config, device)?),
        },
        _ => None,
    });
    // The reference of a precomputed run: the initial policy with adapters off (LoRA) or the base.
    let precomputed: Option<ReferenceCache> = match (strategy, &train_set, &eval_set) {
        (ReferenceStrategy::Precompute, Examples::Pairs(train_pairs, _), Examples::Pairs(eval_pairs, _)) => {
            let dir = config.train.cache_dir.clone().unwrap_or_else(|| out_dir.join("reference-cache"));
            let inputs = CacheInputs::of(config, train_pairs, eval_pairs, Some(&dir))?;
            Some(ReferenceCache::load_or_compute(&dir, &inputs, || {
                let initial = build_policy::<B>(config, None, device)?;
                let mode = if config.lora.reference_adapter.is_some() { AdapterMode::Reference } else { AdapterMode::Disabled };
                let all: Vec<PairInputs> = train_pairs.iter().chain(eval_pairs.iter()).cloned().collect();
                let mut values = Vec::with_capacity(all.len());
                for chunk in all.chunks(config.train.batch_size) {
                    let batch = PreferenceBatch::new(chunk, pad);
                    let shards = batch_shards::<B>(config.train.batch_shards, batch.num_pairs(), device);
                    let r = reference_logps(&initial, Reference::Policy(mode), &batch, objective.ld_alpha, shards, device).expect("reference");
                    values.extend(r);
                }
                Ok(values)
            })?)
        }
        _ => None,
    };

    let schedule = Schedule {
        kind: config.optim.lr_scheduler_type,
        peak_lr: config.optim.learning_rate,
        warmup_steps: Schedule::warmup_from(config.optim.warmup_steps, config.optim.warmup_ratio, total_steps),
        total_steps,
    };
    let mut optimizer = AdamWConfig::new()
        .with_beta_1(config.optim.adam_beta1 as f32)
        .with_beta_2(config.optim.adam_beta2 as f32)
        .with_epsilon(config.optim.adam_epsilon as f32)
        .with_weight_decay(config.optim.weight_decay as f32)
        .init::<B, CausalLm<B>>();
    let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
    if let Some(dir) = &resume_dir {
        let record = recorder
            .load(dir.join("optimizer"), device)
            .map_err(|e| format!("{}/optimizer.mpk: {e}", dir.display()))?;
        optimizer = optimizer.load_record(record);
        eprintln!("resumed from {} at step {}", dir.display(), state.step);
    }
    // Auto shards follow the machine's cores; a different count changes results by float rounding only.
    let shards = batch_shards::<B>(config.train.batch_shards, config.train.batch_size, device);
    if resume_dir.is_some() && state.batch_shards != 0 && state.batch_shards != shards {
        eprintln!("note: the run used {} batch shards, this machine uses {shards}: results differ from an uninterrupted run by float rounding", state.batch_shards);
    }
    state.batch_shards = shards;

    let reference_for = |indices: &[usize], eval: bool| -> Reference<B> {
        match strategy {
            ReferenceStrategy::Precompute => {
                let cache = precomputed.as_ref().expect("computed above");
                let offset = if eval { train_set.len() } else { 0 };
                Reference::Precomputed(indices.iter().map(|&i| cache.values[offset + i]).collect())
            }
            ReferenceStrategy::FrozenCopy => Reference::Model(frozen_copy.borrow().as_ref().expect("loaded").clone()),
            ReferenceStrategy::AdapterOff => Reference::Policy(AdapterMode::Disabled),
            ReferenceStrategy::RefAdapter => Reference::Policy(AdapterMode::Reference),
            ReferenceStrategy::None => Reference::None,
            ReferenceStrategy::Auto => unreachable!("resolved above"),
        }
    };

    let metrics_path = out_dir.join("metrics.jsonl");
    let mut metrics_file = open_metrics(&metrics_path, state.step)?;
    let progress = config.train.progress.then(|| {
        let bar = indicatif::ProgressBar::new(total_steps as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed}<{eta}] {msg}").expect("template"),
        );
        bar.set_position(state.step as u64);
        bar
    });

    let mut summary = TrainSummary::default();
    if config.train.eval_on_start && state.step == 0 && !eval_set.is_empty() {
        let mut eval = evaluate(&policy, &eval_set, pad, config, &objective, &state.objective, &reference_for, device);
        eval.insert("step".into(), 0.0);
        writeln!(metrics_file, "{}", serde_json::to_string(&eval).expect("json")).map_err(|e| e.to_string())?;
        summary.log_history.push(eval.clone());
        summary.initial_eval = Some(eval);
    }
    let mut window: Vec<BTreeMap<String, f64>> = Vec::new();
    let mut window_losses: Vec<f64> = Vec::new();
    let mut window_tokens = 0u64;
    let mut window_start = Instant::now();
    let mut steps_this_run = 0;

    while state.step < total_steps {
        if options.stop_after.is_some_and(|n| steps_this_run >= n) {
            break;
        }
        let lr = schedule.lr(state.step);
        let mut grads: Option<GradientsParams> = None;
        let mut step_loss = 0.0;
        let mut step_batches = Vec::new();
        let mut step_tokens = 0u64;
        for _ in 0..accum {
            let indices = order.batch(state.batches_seen);
            let (out, tokens, records) = match &train_set {
                Examples::Pairs(all, labels) => {
                    let pairs: Vec<PairInputs> = indices.iter().map(|&i| all[i].clone()).collect();
                    let mut batch = PreferenceBatch::new(&pairs, pad);
                    batch.labels = labels.as_ref().map(|l| indices.iter().map(|&i| l[i]).collect());
                    let shards = batch_shards::<B>(config.train.batch_shards, batch.num_pairs(), device);
                    let out = preference_step(&policy, reference_for(&indices, false), &batch, &objective, &mut state.objective, true, shards, device);
                    (out, mask_tokens(&batch.attention_mask), batch.indices)
                }
                Examples::Sequences(all) => {
                    let examples: Vec<&CompletionInputs> = indices.iter().map(|&i| &all[i]).collect();
                    let batch = SequenceBatch::new(&examples, pad);
                    let shards = batch_shards::<B>(config.train.batch_shards, batch.len(), device);
                    (sft_step(&policy, &batch, shards, device), mask_tokens(&batch.attention_mask), batch.indices)
                }
            };
            let loss = out.loss;
            if !loss.is_finite() {
                if config.train.skip_nonfinite {
                    eprintln!("step {}: loss is {loss} on records {records:?}; step skipped", state.step + 1);
                    state.nonfinite_steps += 1;
                    check_skipped_share(config, &state)?;
                    grads = None;
                    step_batches.clear();
                    state.batches_seen += 1;
                    break;
                }
                return Err(format!(
                    "step {} (micro-batch {}): loss is {loss} on records {records:?}; no checkpoint was written for this step",
                    state.step + 1,
                    state.batches_seen
                ));
            }
            // Accumulation averages, as PyTorch's loss / accumulation_steps does.
            let factor = state.loss_scaler.as_ref().map_or(1.0, |scaler| scaler.scale) / accum as f64;
            let metrics = out.metrics.clone();
            let g = out.backward(factor);
            match &mut grads {
                Some(acc) => accumulate::<B, CausalLm<B>>(&policy, acc, g),
                None => grads = Some(g),
            }
            step_loss += loss / accum as f64;
            step_tokens += tokens;
            window.push(metrics);
            step_batches.push(indices);
            state.batches_seen += 1;
        }
        let Some(mut grads) = grads else {
            state.skipped_steps += 1;
            state.step += 1;
            continue;
        };
        if let Some(scaler) = &state.loss_scaler {
            scale::<B, CausalLm<B>>(&policy, &mut grads, 1.0 / scaler.scale);
        }
        let max_norm = (config.optim.max_grad_norm > 0.0).then_some(config.optim.max_grad_norm);
        let grad_norm = clip_global_norm::<B, CausalLm<B>>(&policy, &mut grads, max_norm);
        // fp16 overflow is routine: the update is skipped and the scale halved, but the step counts
        // and is logged and saved like any other (weights unchanged). Gradients still not finite at
        // a scale below 1 are not an overflow: they take the non-finite path below.
        let overflowed = state.loss_scaler.as_mut().is_some_and(|scaler| !scaler.update(grad_norm.is_finite()) && scaler.scale >= 1.0);
        if let Some(scaler) = state.loss_scaler.as_ref().filter(|_| overflowed) {
            eprintln!("step {}: fp16 gradients overflowed; update skipped, loss scale now {}", state.step + 1, scaler.scale);
        }
        if !grad_norm.is_finite() && !overflowed {
            if config.train.skip_nonfinite {
                eprintln!("step {}: gradient norm is {grad_norm}; step skipped", state.step + 1);
                state.nonfinite_steps += 1;
                check_skipped_share(config, &state)?;
                state.skipped_steps += 1;
                state.step += 1;
                continue;
            }
            return Err(format!(
                "step {}: gradient norm is {grad_norm} (batches {step_batches:?}); no checkpoint was written for this step",
                state.step + 1
            ));
        }
        if overflowed {
            state.skipped_steps += 1;
        } else {
            policy = optimizer.step(lr, policy, grads);
        }
        state.step += 1;
        if !overflowed && config.train.sync_ref_model && state.step.is_multiple_of(config.train.ref_model_sync_steps) {
            let mixed = mix_models(&policy.valid(), frozen_copy.borrow().as_ref().expect("frozen-copy checked above"), config.train.ref_model_mixup_alpha)?;
            *frozen_copy.borrow_mut() = Some(mixed);
        }
        steps_this_run += 1;
        state.num_tokens += step_tokens;
        window_tokens += step_tokens;
        summary.step_losses.push(step_loss);
        summary.grad_norms.push(grad_norm);
        window_losses.push(step_loss);

        if state.step.is_multiple_of(config.train.logging_steps) || state.step == total_steps {
            let elapsed = window_start.elapsed().as_secs_f64().max(1e-9);
            let mut line = mean_metrics(&window);
            line.insert("loss".into(), window_losses.iter().sum::<f64>() / window_losses.len() as f64);
            line.insert("grad_norm".into(), grad_norm);
            line.insert("learning_rate".into(), lr);
            line.insert("epoch".into(), state.batches_seen as f64 / order.batches_per_epoch() as f64);
            line.insert("step".into(), state.step as f64);
            line.insert("num_tokens".into(), state.num_tokens as f64);
            line.insert("tokens_per_second".into(), window_tokens as f64 / elapsed);
            if let Some(rss) = peak_rss_mb() {
                line.insert("peak_rss_mb".into(), rss);
            }
            writeln!(metrics_file, "{}", serde_json::to_string(&line).expect("json")).map_err(|e| e.to_string())?;
            if let Some(bar) = &progress {
                bar.set_message(format!(
                    "loss {:.4} acc {:.2} {:.0} tok/s",
                    line["loss"],
                    line.get("rewards/accuracies").copied().unwrap_or(0.0),
                    line["tokens_per_second"]
                ));
            }
            summary.log_history.push(line);
            window.clear();
            window_losses.clear();
            window_tokens = 0;
            window_start = Instant::now();
        }
        if let Some(bar) = &progress {
            bar.set_position(state.step as u64);
        }
        if config.train.eval_steps > 0 && state.step.is_multiple_of(config.train.eval_steps) && !eval_set.is_empty() {
            let mut eval = evaluate(&policy, &eval_set, pad, config, &objective, &state.objective, &reference_for, device);
            eval.insert("step".into(), state.step as f64);
            writeln!(metrics_file, "{}", serde_json::to_string(&eval).expect("json")).map_err(|e| e.to_string())?;
            summary.log_history.push(eval);
        }
        if config.train.save_steps > 0 && state.step.is_multiple_of(config.train.save_steps) {
            save_checkpoint(config, &policy, frozen_copy.borrow().as_ref().filter(|_| config.train.sync_ref_model), &optimizer, &state, &recorder)?;
        }
    }
    if let Some(bar) = progress {
        bar.finish();
    }
    summary.steps = state.step;
    if state.step >= total_steps {
        if !eval_set.is_empty() {
            let mut eval = evaluate(&policy, &eval_set, pad, config, &objective, &state.objective, &reference_for, device);
            eval.insert("step".into(), state.step as f64);
            writeln!(metrics_file, "{}", serde_json::to_string(&eval).expect("json")).map_err(|e| e.to_string())?;
            summary.log_history.push(eval.clone());
            summary.final_eval = Some(eval);
        }
        crate::plot::write_run_plots(&out_dir.join("plots"), &summary.log_history).map_err(|e| format!("plots: {e}"))?;
        // written whole or not at all: a partial folder, then renamed into place
        let partial = final_dir.join(".partial");
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
        }
        save_weights(config, &policy, &partial)?;
        publish(&partial.join(final_weights.file_name().expect("adapter or model")), &final_weights)?;
        std::fs::remove_dir_all(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
        summary.final_dir = final_dir.clone();
        if config.train.generations > 0 && !eval_set.is_empty() {
            let path = out_dir.join("generations.jsonl");
            write_generations(config, &policy, frozen_copy.borrow().as_ref(), &eval_set, &tokenizer, &path)?;
            summary.generations = Some(path);
        }
    }
    Ok(summary)
}

/// Loss and metrics over the eval examples (no gradients), as `eval_*` keys.
#[allow(clippy::too_many_arguments)]
fn evaluate<B: AutodiffBackend>(
    policy: &CausalLm<B>,
    examples: &Examples,
    pad: u32,
    config: &TrainConfig,
    objective: &ObjectiveConfig,
    objective_state: &ObjectiveState,
    reference_for: &dyn Fn(&[usize], bool) -> Reference<B>,
    device: &B::Device,
) -> BTreeMap<String, f64> {
    let inner = policy.valid();
    let mut state = objective_state.clone();
    let size = config.train.batch_size;
    let mut all = Vec::new();
    let mut losses = Vec::new();
    for start in (0..examples.len()).step_by(size) {
        let range = start..(start + size).min(examples.len());
        let indices: Vec<usize> = range.clone().collect();
        let out: StepOutput<B::InnerBackend> = match examples {
            Examples::Pairs(pairs, labels) => {
                let mut batch = PreferenceBatch::new(&pairs[range.clone()], pad);
                batch.labels = labels.as_ref().map(|l| l[range].to_vec());
                let shards = batch_shards::<B>(config.train.batch_shards, batch.num_pairs(), device);
                let ref_pairs = reference_logps(policy, reference_for(&indices, true), &batch, objective.ld_alpha, shards, device);
                objective_on_batch(&inner, ref_pairs, &batch, objective, &mut state, false, shards, device)
            }
            Examples::Sequences(seqs) => {
                let rows: Vec<&CompletionInputs> = indices.iter().map(|&i| &seqs[i]).collect();
                let shards = batch_shards::<B>(config.train.batch_shards, rows.len(), device);
                sft_on_batch(&inner, &SequenceBatch::new(&rows, pad), shards, device)
            }
        };
        losses.push(out.loss.into_scalar().elem::<f64>());
        all.push(out.metrics);
    }
    let mut out: BTreeMap<String, f64> = mean_metrics(&all).into_iter().map(|(k, v)| (format!("eval_{k}"), v)).collect();
    out.insert("eval_loss".into(), losses.iter().sum::<f64>() / losses.len().max(1) as f64);
    out
}

/// Continuations of the first `train.generations` eval prompts by the policy and the reference
/// (greedy, or sampled with `train.generation_temperature`), one JSON line per prompt.
fn write_generations<B: AutodiffBackend>(
    config: &TrainConfig,
    policy: &CausalLm<B>,
    frozen: Option<&CausalLm<B::InnerBackend>>,
    examples: &Examples,
    tokenizer: &Tokenizer,
    path: &Path,
) -> TrainResult<()> {
    let policy = policy.valid();
    let reference = match frozen {
        Some(f) => f.clone(),
        None => {
            let mut r = policy.clone();
            let mode = if config.lora.reference_adapter.is_some() { AdapterMode::Reference } else { AdapterMode::Disabled };
            r.set_adapter_mode(mode);
            r
        }
    };
    let mut lines = String::new();
    for i in 0..config.train.generations.min(examples.len()) {
        let (index, prompt) = examples.prompt(i);
        let options = dipole_models::GenerateOptions {
            max_new_tokens: config.train.max_new_tokens,
            temperature: config.train.generation_temperature,
            top_p: config.train.generation_top_p,
            stop_tokens: tokenizer.eos.iter().map(|t| t.id).collect(),
            // The same seed per prompt for policy and reference: differences come from the models.
            seed: config.train.seed.wrapping_add(index as u64),
        };
        let text = |ids: &[u32]| tokenizer.decode(ids, true).map_err(|e| e.to_string());
        let line = serde_json::json!({
            "index": index,
            "prompt": text(&prompt)?,
            "policy": text(&policy.generate(&prompt, &options))?,
            "reference": text(&reference.generate(&prompt, &options))?,
        });
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    std::fs::write(path, lines).map_err(|e| format!("{}: {e}", path.display()))
}

/// Holds out `fraction` of the examples (seeded) for evaluation.
pub fn split_pairs<T>(pairs: Vec<T>, fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let (_, test) = dipole_data::split::split_indices(pairs.len(), fraction, seed);
    let test: std::collections::BTreeSet<usize> = test.into_iter().collect();
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (i, p) in pairs.into_iter().enumerate() {
        if test.contains(&i) { eval.push(p) } else { train.push(p) }
    }
    (train, eval)
}

/// `metrics.jsonl` for a run at `step`: a fresh run starts it empty, a resumed one keeps the lines
/// of steps up to its checkpoint (a killed run may have logged past it) and appends.
fn open_metrics(path: &Path, step: usize) -> TrainResult<std::fs::File> {
    let kept = match std::fs::read_to_string(path) {
        Ok(text) if step > 0 => text
            .lines()
            .filter(|line| {
                // a Value, not floats: an overflowed step logs `grad_norm` inf, which JSON writes as null
                let logged = serde_json::from_str::<serde_json::Value>(line).ok().and_then(|m| m.get("step").and_then(serde_json::Value::as_f64));
                logged.is_some_and(|s| s <= step as f64)
            })
            .map(|line| format!("{line}\n"))
            .collect::<String>(),
        _ => String::new(),
    };
    crate::checkpoint::write_atomic(path, kept.as_bytes())?;
    std::fs::OpenOptions::new().append(true).open(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Stops a `skip_nonfinite` run whose skipped share passed `train.max_skipped_fraction`.
fn check_skipped_share(config: &TrainConfig, state: &TrainerState) -> TrainResult<()> {
    let steps = state.step + 1;
    let limit = config.train.max_skipped_fraction;
    if state.nonfinite_steps > 1 && state.nonfinite_steps as f64 > limit * steps as f64 {
        return Err(format!(
            "step {steps}: {} of {steps} steps were skipped as not finite, more than train.max_skipped_fraction = {limit}; the run is diverging (lower optim.learning_rate, or check the data)",
            state.nonfinite_steps
        ));
    }
    Ok(())
}

/// Writes `checkpoint-<step>` durably (temporary folder, every file synced and checksummed, then
/// renamed) and prunes old ones.
fn save_checkpoint<B: AutodiffBackend, O: Optimizer<CausalLm<B>, B>>(
    config: &TrainConfig,
    policy: &CausalLm<B>,
    moving_reference: Option<&CausalLm<B::InnerBackend>>,
    optimizer: &O,
    state: &TrainerState,
    recorder: &NamedMpkFileRecorder<FullPrecisionSettings>,
) -> TrainResult<()> {
    let out_dir = &config.train.output_dir;
    let final_dir = out_dir.join(format!("checkpoint-{}", state.step));
    let tmp = out_dir.join(format!(".checkpoint-{}.tmp", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    save_weights(config, policy, &tmp)?;
    if let Some(reference) = moving_reference {
        reference.save_hf(&tmp.join("reference"), ExportDtype::F32, usize::MAX, None).map_err(|e| e.to_string())?;
    }
    recorder
        .record(optimizer.to_record(), tmp.join("optimizer"))
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    write_json(&tmp.join("trainer_state.json"), state)?;
    write_json(&tmp.join("config.json"), config)?;
    publish(&tmp, &final_dir)?;
    if let Some(limit) = config.train.save_total_limit {
        let dirs = checkpoint_dirs(out_dir);
        for (_, dir) in dirs.iter().take(dirs.len().saturating_sub(limit.max(1))) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kto_metrics_pool_over_the_window_as_trl_does() {
        let batch = |pairs: &[(&str, f64)]| pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>();
        let window = [
            batch(&[("rewards/chosen", 1.0), ("count/chosen", 3.0), ("rewards/rejected", -1.0), ("count/rejected", 1.0), ("rewards/margins", 2.0), ("kl", 0.5)]),
            batch(&[("rewards/chosen", 3.0), ("count/chosen", 1.0), ("rewards/rejected", 0.0), ("count/rejected", 3.0), ("rewards/margins", 3.0), ("kl", 0.1)]),
            // a batch without rejected rows
            batch(&[("rewards/chosen", 2.0), ("count/chosen", 4.0), ("kl", 0.3)]),
        ];
        let m = mean_metrics(&window);
        assert!((m["rewards/chosen"] - (3.0 + 3.0 + 8.0) / 8.0).abs() < 1e-12);
        assert!((m["rewards/rejected"] - (-1.0 / 4.0)).abs() < 1e-12);
        assert!((m["rewards/margins"] - (14.0 / 8.0 + 0.25)).abs() < 1e-12);
        assert!((m["kl"] - 0.3).abs() < 1e-12);
        assert!(!m.contains_key("count/chosen") && !m.contains_key("count/rejected"));
        // pair objectives: plain means
        let m = mean_metrics(&[batch(&[("rewards/chosen", 1.0)]), batch(&[("rewards/chosen", 2.0)])]);
        assert_eq!(m["rewards/chosen"], 1.5);
    }

    #[test]
    fn data_order_is_a_seeded_permutation_per_epoch() {
        let order = DataOrder { num_pairs: 10, batch_size: 4, shuffle: true, seed: 3, lengths: None };
        assert_eq!(order.batches_per_epoch(), 3);
        let epoch: Vec<usize> = (0..3).flat_map(|k| order.batch(k)).collect();
        let mut sorted = epoch.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        let next: Vec<usize> = (3..6).flat_map(|k| order.batch(k)).collect();
        assert_ne!(epoch, next, "each epoch has its own order");
        assert_eq!(order.batch(4), DataOrder { num_pairs: 10, batch_size: 4, shuffle: true, seed: 3, lengths: None }.batch(4));
    }

    #[test]
    fn length_grouping_puts_similar_lengths_together() {
        let lengths: Vec<usize> = (0..8).map(|i| if i % 2 == 0 { 10 } else { 100 }).collect();
        let order = DataOrder { num_pairs: 8, batch_size: 4, shuffle: true, seed: 1, lengths: Some(lengths.clone()) };
        for k in 0..2 {
            let b = order.batch(k);
            assert!(b.iter().all(|&i| lengths[i] == lengths[b[0]]), "{b:?}");
        }
    }
}
