//! A training run, as a TOML file (`configs/*.toml`) with `--set key=value` overrides. Unknown keys
//! and bad values are errors that name the key and what is allowed.

use std::path::{Path, PathBuf};

use dipole_data::TruncationMode;
use dipole_lora::{LoraConfig, LoraInit, TargetModules};
use dipole_loss::ObjectiveConfig;
use serde::{Deserialize, Serialize};

use crate::schedule::SchedulerKind;

/// The burn backend a run computes on. CPU (flex) is always built; the others come with the
/// cargo feature of the same name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// burn's pure-Rust CPU backend (flex).
    #[default]
    Cpu,
    /// burn's ndarray CPU backend (feature `ndarray`), kept for comparison.
    Ndarray,
    /// wgpu: Vulkan, Metal or DX12, whichever the machine has (feature `wgpu`).
    Wgpu,
    /// wgpu restricted to Vulkan (feature `vulkan`).
    Vulkan,
    /// wgpu restricted to Metal (feature `metal`).
    Metal,
    /// CUDA through cubecl, kernels compiled at run time by NVRTC (feature `cuda`).
    Cuda,
}

/// A config that cannot be read or used: the file (or `--set`) it came from and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{origin}: {source}")]
    Toml { origin: String, source: toml::de::Error },
    #[error("--set {item:?}: {reason}")]
    Override { item: String, reason: String },
    #[error("{origin}: {source}")]
    Invalid { origin: String, source: InvalidConfig },
}

/// A value out of range or a combination of keys that cannot work together, named by its key.
#[derive(Debug, thiserror::Error)]
pub enum InvalidConfig {
    #[error("{0}")]
    Value(String),
    #[error("objective: {0}")]
    Objective(#[source] dipole_loss::ObjectiveError),
    #[error("lora: {0}")]
    Lora(#[source] dipole_lora::LoraError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Sft,
    #[default]
    Dpo,
}

/// What the backward pass recomputes instead of keeping (`train.gradient_checkpointing`): `false`,
/// `true` (= `"layers"`) or `"balanced"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GradientCheckpointing {
    /// Keep every activation the backward pass needs.
    #[default]
    Off,
    /// Keep only each decoder layer's input and run the layer again in the backward pass
    /// (Hugging Face's gradient checkpointing; `dipole_models::LayerTape`).
    Layers,
    /// burn's `BalancedCheckpointing`: element-wise ops' outputs recomputed, matmuls' kept. `cargo
    /// xtask` then trains on `Autodiff<B, BalancedCheckpointing>`; library callers choose that
    /// backend type themselves.
    Balanced,
}

impl Serialize for GradientCheckpointing {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            GradientCheckpointing::Off => s.serialize_bool(false),
            GradientCheckpointing::Layers => s.serialize_bool(true),
            GradientCheckpointing::Balanced => s.serialize_str("balanced"),
        }
    }
}

impl<'de> Deserialize<'de> for GradientCheckpointing {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Flag(bool),
            Name(String),
        }
        match Raw::deserialize(d) {
            Ok(Raw::Flag(false)) => Ok(GradientCheckpointing::Off),
            Ok(Raw::Flag(true)) => Ok(GradientCheckpointing::Layers),
            Ok(Raw::Name(name)) if name == "layers" => Ok(GradientCheckpointing::Layers),
            Ok(Raw::Name(name)) if name == "balanced" => Ok(GradientCheckpointing::Balanced),
            Ok(Raw::Name(name)) if name == "off" => Ok(GradientCheckpointing::Off),
            Ok(Raw::Name(name)) => Err(serde::de::Error::custom(format!("{name:?}: expected true, false, \"layers\" or \"balanced\""))),
            Err(_) => Err(serde::de::Error::custom("expected true, false, \"layers\" or \"balanced\"")),
        }
    }
}

/// Where reference log-probs come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ReferenceStrategy {
    /// `adapter-off` with LoRA, `frozen-copy` for full fine-tuning, `none` for reference-free losses.
    #[default]
    Auto,
    /// One pass over the training data before training, cached on disk and reused by later runs.
    Precompute,
    /// LoRA: the policy with its adapters disabled (no second copy of the model).
    AdapterOff,
    /// Full fine-tuning: a frozen copy of the initial weights.
    FrozenCopy,
    /// LoRA from an SFT adapter: base + that adapter, frozen.
    RefAdapter,
    /// Reference-free objectives (SimPO-style, `sft`).
    None,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// Hugging Face model folder.
    pub path: PathBuf,
    /// Which decoder layers stay frozen in full fine-tuning (indices).
    pub freeze_layers: Vec<usize>,
    /// Freeze the token embeddings in full fine-tuning.
    pub freeze_embeddings: bool,
    /// Train from random weights (seeded by `train.seed`, N(0, `initializer_range`)): the folder
    /// needs only `config.json` and the tokenizer files.
    pub from_scratch: bool,
    /// The dtype frozen weight matrices are held in (see [`WeightDtype`]): a LoRA run's base and a
    /// full fine-tuning run's frozen reference copy. Trained parameters are always f32.
    pub dtype: WeightDtype,
}

/// `model.dtype`: how frozen weight matrices (embeddings, projections, LM head) are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    /// As stored (a bf16 checkpoint's base stays bf16, an f32 one f32).
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

impl WeightDtype {
    /// The loader's setting for frozen matrices.
    pub fn matrices(self) -> dipole_models::MatrixDtype {
        use burn::tensor::DType;
        use dipole_models::MatrixDtype;
        match self {
            WeightDtype::Auto => MatrixDtype::Stored,
            WeightDtype::F32 => MatrixDtype::F32,
            WeightDtype::Bf16 => MatrixDtype::Cast(DType::BF16),
            WeightDtype::F16 => MatrixDtype::Cast(DType::F16),
        }
    }
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            freeze_layers: Vec::new(),
            freeze_embeddings: false,
            from_scratch: false,
            dtype: WeightDtype::Auto,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Training pairs (JSONL; standard or conversational).
    pub train: PathBuf,
    /// Held-out pairs; when absent, `eval_fraction` of `train` is held out.
    pub eval: Option<PathBuf>,
    pub eval_fraction: f64,
    pub max_length: usize,
    /// `keep_start` or `keep_end`.
    pub truncation: TruncationMode,
    pub shuffle: bool,
    /// Skip invalid rows (each reported) instead of stopping at the first.
    pub skip_invalid: bool,
    /// Cut prompts to their last N tokens first (older TRL's `max_prompt_length`; off by default).
    pub max_prompt_length: Option<usize>,
    /// Batch pairs of similar length together (less padding).
    pub group_by_length: bool,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            train: PathBuf::new(),
            eval: None,
            eval_fraction: 0.0,
            max_length: 1024,
            truncation: TruncationMode::KeepStart,
            shuffle: true,
            skip_invalid: false,
            max_prompt_length: None,
            group_by_length: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    pub enabled: bool,
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Module names (`["q_proj", "v_proj"]`), `["all-linear"]`, or use `target_regex`.
    pub target_modules: Vec<String>,
    pub target_regex: Option<String>,
    pub layers_to_transform: Option<Vec<usize>>,
    pub use_rslora: bool,
    /// `kaiming` (PEFT's default) or `gaussian`.
    pub init: LoraInit,
    /// Start from this PEFT adapter instead of a fresh one.
    pub init_adapter: Option<PathBuf>,
    /// The frozen reference adapter (`reference = "ref-adapter"`).
    pub reference_adapter: Option<PathBuf>,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            enabled: false,
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            target_regex: None,
            layers_to_transform: None,
            use_rslora: false,
            init: LoraInit::KaimingUniform,
            init_adapter: None,
            reference_adapter: None,
        }
    }
}

impl LoraSection {
    pub fn lora_config(&self, base: &Path) -> Result<LoraConfig, InvalidConfig> {
        let config = LoraConfig {
            r: self.r,
            lora_alpha: self.alpha,
            lora_dropout: self.dropout,
            target_modules: match &self.target_regex {
                Some(re) => TargetModules::Regex(re.clone()),
                None => TargetModules::List(self.target_modules.clone()),
            },
            layers_to_transform: self.layers_to_transform.clone(),
            use_rslora: self.use_rslora,
            init: self.init,
            base_model_name_or_path: Some(base.display().to_string()),
        };
        config.validate().map_err(InvalidConfig::Lora)?;
        Ok(config)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimSection {
    pub learning_rate: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub weight_decay: f64,
    /// Global-norm clipping; `0` disables it.
    pub max_grad_norm: f64,
    pub lr_scheduler_type: SchedulerKind,
    pub warmup_ratio: f64,
    pub warmup_steps: Option<usize>,
}

impl Default for OptimSection {
    fn default() -> Self {
        // transformers' TrainingArguments defaults (TRL's DPOConfig sets lr 1e-6).
        Self {
            learning_rate: 1e-6,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            lr_scheduler_type: SchedulerKind::Linear,
            warmup_ratio: 0.0,
            warmup_steps: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub stage: Stage,
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub num_train_epochs: f64,
    /// Overrides epochs when set.
    pub max_steps: Option<usize>,
    pub logging_steps: usize,
    /// 0 evaluates only at the end.
    pub eval_steps: usize,
    /// 0 saves only at the end.
    pub save_steps: usize,
    pub save_total_limit: Option<usize>,
    pub seed: u64,
    pub output_dir: PathBuf,
    pub reference: ReferenceStrategy,
    /// Folder of precomputed reference log-probs (`reference = "precompute"`).
    pub cache_dir: Option<PathBuf>,
    /// Skip a step whose loss or gradients are not finite instead of stopping.
    pub skip_nonfinite: bool,
    /// With `skip_nonfinite`, stop the run once more than this share of its steps so far (and
    /// more than one step) were skipped as not finite: a run that keeps diverging is not training.
    pub max_skipped_fraction: f64,
    /// Show the progress bar.
    pub progress: bool,
    /// Turn LoRA dropout off, as TRL's `disable_dropout` (default on) does for every dropout.
    pub disable_dropout: bool,
    /// At the end, greedy generations of policy and reference for this many eval prompts
    /// (`generations.jsonl`).
    pub generations: usize,
    pub max_new_tokens: usize,
    /// Sampling temperature of those generations (0 = greedy) and nucleus `top_p`; seeded by `seed`.
    pub generation_temperature: f64,
    pub generation_top_p: f64,
    /// Evaluate once before the first step too (the step-0 baseline in `metrics.jsonl`).
    pub eval_on_start: bool,
    /// Activation checkpointing (see [`GradientCheckpointing`]): `true` keeps only each decoder
    /// layer's input and runs the layer again in the backward pass, for one more forward pass of
    /// the decoder per step; `"balanced"` is burn's strategy.
    pub gradient_checkpointing: GradientCheckpointing,
    /// `no`, `bf16` or `fp16`: matmuls in half precision on f32 master weights, norms, softmax and
    /// log-probs in f32 (PyTorch autocast's split; `fp16` adds dynamic loss scaling). Pays off on
    /// GPU backends; the CPU backend converts half-precision matmuls to f32 and back, so it is slower.
    pub mixed_precision: dipole_models::MixedPrecision,
    /// Split each micro-batch's pairs into this many shards whose forward and backward passes run
    /// on parallel threads, each with its own autodiff graph; the objective still sees the whole
    /// micro-batch, so results equal the unsharded step's up to float rounding. 0 (auto): one shard
    /// per CPU thread on the CPU backend (its elementwise kernels are single-threaded), 1 on GPUs.
    pub batch_shards: usize,
    /// Run the tokens a pair's chosen and rejected rows begin with (the prompt) once per pair, both
    /// completions attending to its keys and values (prefix sharing, arXiv:2410.20305): same
    /// results up to float rounding (LoRA dropout aside: the prompt draws one mask for both rows),
    /// fewer positions through the model. Applies to a micro-batch
    /// only when it saves at least 5% of its padded positions.
    pub prefix_sharing: bool,
    /// Pack a micro-batch's sequences end to end into as few rows as hold them (padding-free: each
    /// attends only to itself, positions restarting at 0) when that runs fewer positions than
    /// prefix sharing or whole rows, by at least 5%. Same results up to float rounding.
    pub padding_free: bool,
    /// Keep no attention probabilities for the backward pass and make them again there (one more
    /// `QKᵀ` and softmax per layer in the backward pass for memory that grows with T² per layer).
    /// Same results up to float rounding.
    pub attention_recompute: bool,
    /// Run the LM head fused with the log-probs, a tile of positions × vocabulary at a time, forward
    /// and backward (`dipole_kernels::head`), so the `[rows, T, vocab]` logits never exist; off,
    /// the whole logits are made (also where a LoRA adapter sits on `lm_head`). Same results up
    /// to float rounding.
    pub fused_lm_head: bool,
    /// TR-DPO (Gorbatovski et al. 2024, arXiv:2404.09656): every `ref_model_sync_steps` steps the
    /// frozen reference becomes `alpha * policy + (1 - alpha) * reference` (`frozen-copy` only).
    pub sync_ref_model: bool,
    pub ref_model_mixup_alpha: f64,
    pub ref_model_sync_steps: usize,
    /// Where the final adapter (`adapter/`) or model (`model/`) is written; default `<output_dir>/final`.
    pub final_dir: Option<PathBuf>,
    /// Keep the weights of the evaluation with the best `metric_for_best_model` in
    /// `<output_dir>/best/` (`adapter/` or `model/`, and `best.json`: step, metric, value).
    pub save_best: bool,
    /// The eval metric `save_best` ranks by: TRL's name, with or without `eval_` (`eval_loss`,
    /// `rewards/accuracies`, `rewards/margins`, ...).
    pub metric_for_best_model: String,
    /// Whether a higher `metric_for_best_model` is better; unset: lower for names ending in
    /// `loss`, higher for any other (transformers' rule).
    pub greater_is_better: Option<bool>,
    /// The backend `cargo xtask` runs on (library callers choose the backend type themselves).
    pub backend: Backend,
}

impl TrainSection {
    /// Sets how `model` computes: `mixed_precision`, `prefix_sharing`, `padding_free`,
    /// `attention_recompute`, `fused_lm_head`, and per-layer recompute for `gradient_checkpointing = true`.
    pub fn apply_to<B: burn::tensor::backend::Backend>(&self, model: &mut dipole_models::CausalLm<B>) {
        model.set_mixed_precision(self.mixed_precision);
        model.prefix_sharing = self.prefix_sharing;
        model.padding_free = self.padding_free;
        model.attention_recompute = self.attention_recompute;
        model.layer_recompute = self.gradient_checkpointing == GradientCheckpointing::Layers;
        model.fused_head = self.fused_lm_head;
    }

    /// `metric_for_best_model` as the eval line names it (`eval_` prefixed).
    pub fn best_metric(&self) -> String {
        let name = &self.metric_for_best_model;
        if name.starts_with("eval_") { name.clone() } else { format!("eval_{name}") }
    }

    /// Whether `value` beats `best` under `metric_for_best_model` and `greater_is_better`.
    pub fn improves(&self, value: f64, best: f64) -> bool {
        let greater = self.greater_is_better.unwrap_or(!self.metric_for_best_model.ends_with("loss"));
        if greater { value > best } else { value < best }
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            stage: Stage::Dpo,
            batch_size: 8,
            gradient_accumulation_steps: 1,
            num_train_epochs: 1.0,
            max_steps: None,
            logging_steps: 10,
            eval_steps: 0,
            save_steps: 0,
            save_total_limit: None,
            seed: 42,
            output_dir: PathBuf::from("runs/dipole"),
            reference: ReferenceStrategy::Auto,
            cache_dir: None,
            skip_nonfinite: false,
            max_skipped_fraction: 0.1,
            progress: true,
            disable_dropout: true,
            generations: 0,
            max_new_tokens: 128,
            generation_temperature: 0.0,
            generation_top_p: 1.0,
            eval_on_start: false,
            gradient_checkpointing: GradientCheckpointing::Off,
            mixed_precision: dipole_models::MixedPrecision::No,
            batch_shards: 0,
            prefix_sharing: true,
            padding_free: true,
            attention_recompute: true,
            fused_lm_head: true,
            sync_ref_model: false,
            ref_model_mixup_alpha: 0.6,
            ref_model_sync_steps: 512,
            final_dir: None,
            save_best: false,
            metric_for_best_model: "eval_loss".into(),
            greater_is_better: None,
            backend: Backend::Cpu,
        }
    }
}

/// The whole run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub model: ModelSection,
    pub data: DataSection,
    pub lora: LoraSection,
    pub objective: ObjectiveConfig,
    pub optim: OptimSection,
    pub train: TrainSection,
}

impl TrainConfig {
    /// Parses TOML text; `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|source| ConfigError::Toml { origin: origin.into(), source })?;
        config.validate().map_err(|source| ConfigError::Invalid { origin: origin.into(), source })?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Applies `section.key=value` overrides (the value is TOML: `0.1`, `"cosine"`, `["q_proj"]`;
    /// a bare word is taken as a string). A key or value that does not fit is named with its override.
    pub fn with_overrides(&self, overrides: &[String]) -> Result<Self, ConfigError> {
        let mut doc = toml::Table::try_from(self).expect("a TrainConfig serialises to TOML");
        let mut config = self.clone();
        for item in overrides {
            let refused = |reason: String| ConfigError::Override { item: item.clone(), reason };
            let (key, value) = item.split_once('=').ok_or_else(|| refused("expected section.key=value".into()))?;
            let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .map(|t| t["v"].clone())
                .unwrap_or_else(|_| toml::Value::String(value.to_string()));
            let mut parts = key.split('.').collect::<Vec<_>>();
            let last = parts.pop().filter(|k| !k.is_empty()).ok_or_else(|| refused("empty key".into()))?;
            let mut table = &mut doc;
            for part in parts {
                table = table
                    .entry(part.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .ok_or_else(|| refused(format!("{part} is not a section")))?;
            }
            table.insert(last.to_string(), parsed);
            // Read back one override at a time so that the error names the one that does not fit.
            config = toml::Value::Table(doc.clone()).try_into().map_err(|e| refused(e.message().to_string()))?;
        }
        config.validate().map_err(|source| ConfigError::Invalid { origin: "--set".into(), source })?;
        Ok(config)
    }

    /// Every value in range and every combination of keys usable, checked before any work.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        self.objective.validate().map_err(InvalidConfig::Objective)?;
        self.check_counts()?;
        self.check_ranges()?;
        self.check_combinations()?;
        if self.lora.enabled {
            self.lora.lora_config(&self.model.path)?;
        }
        Ok(())
    }

    /// Counts that must be at least 1 (0 would divide by zero or loop forever).
    fn check_counts(&self) -> Result<(), InvalidConfig> {
        let t = &self.train;
        let at_least_one = [
            ("train.batch_size", t.batch_size),
            ("train.gradient_accumulation_steps", t.gradient_accumulation_steps),
            ("train.logging_steps", t.logging_steps),
            ("train.max_new_tokens", t.max_new_tokens),
            ("data.max_length", self.data.max_length),
        ];
        if let Some((key, _)) = at_least_one.iter().find(|(_, value)| *value == 0) {
            return Err(invalid(format!("{key} must be at least 1, got 0")));
        }
        let unset_instead = [
            ("train.max_steps", t.max_steps, "train for train.num_train_epochs"),
            ("data.max_prompt_length", self.data.max_prompt_length, "keep whole prompts"),
            ("train.save_total_limit", t.save_total_limit, "keep every checkpoint"),
        ];
        if let Some((key, _, unset)) = unset_instead.iter().find(|(_, value, _)| *value == Some(0)) {
            return Err(invalid(format!("{key} must be at least 1, got 0 (leave it unset to {unset})")));
        }
        if self.lora.enabled && self.lora.r == 0 {
            return Err(invalid("lora.r must be at least 1, got 0".into()));
        }
        Ok(())
    }

    /// Real-valued keys in their ranges; a NaN fails every check, as it should.
    fn check_ranges(&self) -> Result<(), InvalidConfig> {
        let (t, o) = (&self.train, &self.optim);
        let ranges: [(&str, f64, bool, &str); 12] = [
            ("train.num_train_epochs", t.num_train_epochs, t.num_train_epochs > 0.0 && t.num_train_epochs.is_finite(), "> 0"),
            ("optim.learning_rate", o.learning_rate, o.learning_rate >= 0.0 && o.learning_rate.is_finite(), ">= 0"),
            ("optim.adam_beta1", o.adam_beta1, (0.0..1.0).contains(&o.adam_beta1), "in [0, 1)"),
            ("optim.adam_beta2", o.adam_beta2, (0.0..1.0).contains(&o.adam_beta2), "in [0, 1)"),
            ("optim.adam_epsilon", o.adam_epsilon, o.adam_epsilon > 0.0 && o.adam_epsilon.is_finite(), "> 0"),
            ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0.0 && o.weight_decay.is_finite(), ">= 0"),
            ("optim.max_grad_norm", o.max_grad_norm, o.max_grad_norm >= 0.0, ">= 0 (0 turns clipping off)"),
            ("optim.warmup_ratio", o.warmup_ratio, (0.0..=1.0).contains(&o.warmup_ratio), "in [0, 1]"),
            ("train.max_skipped_fraction", t.max_skipped_fraction, (0.0..=1.0).contains(&t.max_skipped_fraction), "in [0, 1]"),
            ("lora.alpha", self.lora.alpha, self.lora.alpha > 0.0 && self.lora.alpha.is_finite(), "> 0"),
            ("lora.dropout", self.lora.dropout, (0.0..1.0).contains(&self.lora.dropout), "in [0, 1)"),
            ("data.eval_fraction", self.data.eval_fraction, (0.0..1.0).contains(&self.data.eval_fraction), "in [0, 1)"),
        ];
        if let Some((key, value, _, expected)) = ranges.iter().find(|(_, _, ok, _)| !ok) {
            return Err(invalid(format!("{key} must be {expected}, got {value}")));
        }
        let temperature_ok = t.generation_temperature >= 0.0 && t.generation_temperature.is_finite();
        let top_p_ok = t.generation_top_p > 0.0 && t.generation_top_p <= 1.0;
        if !(temperature_ok && top_p_ok) {
            return Err(invalid(format!(
                "train.generation_temperature must be >= 0 and train.generation_top_p in (0, 1], got {} and {}",
                t.generation_temperature, t.generation_top_p
            )));
        }
        Ok(())
    }

    /// Keys that only work together (or not at all together).
    fn check_combinations(&self) -> Result<(), InvalidConfig> {
        let t = &self.train;
        if let Some(prompt) = self.data.max_prompt_length.filter(|p| *p >= self.data.max_length) {
            return Err(invalid(format!(
                "data.max_prompt_length ({prompt}) must be below data.max_length ({}): no completion token would be left",
                self.data.max_length
            )));
        }
        if t.sync_ref_model && (!(0.0..=1.0).contains(&t.ref_model_mixup_alpha) || t.ref_model_sync_steps == 0) {
            return Err(invalid(format!(
                "train.ref_model_mixup_alpha must be in [0, 1] and train.ref_model_sync_steps at least 1, got {} and {}",
                t.ref_model_mixup_alpha, t.ref_model_sync_steps
            )));
        }
        if t.sync_ref_model && self.lora.enabled {
            return Err(invalid("train.sync_ref_model (TR-DPO) updates a frozen reference copy: it needs full fine-tuning (lora.enabled = false)".into()));
        }
        if t.save_best && self.data.eval.is_none() && self.data.eval_fraction == 0.0 {
            return Err(invalid("train.save_best ranks evaluations: it needs held-out data (data.eval or data.eval_fraction)".into()));
        }
        if self.model.from_scratch && self.lora.enabled {
            return Err(invalid("model.from_scratch trains every weight: set lora.enabled = false".into()));
        }
        match t.reference {
            ReferenceStrategy::AdapterOff | ReferenceStrategy::RefAdapter if !self.lora.enabled => {
                Err(invalid(format!("train.reference = {:?} needs lora.enabled = true", t.reference)))
            }
            ReferenceStrategy::RefAdapter if self.lora.reference_adapter.is_none() => {
                Err(invalid("train.reference = \"ref-adapter\" needs lora.reference_adapter".into()))
            }
            _ => Ok(()),
        }
    }
}

fn invalid(message: String) -> InvalidConfig {
    InvalidConfig::Value(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named() {
        let err = TrainConfig::from_toml("[optim]\nlearning_rat = 1e-5\n", "x.toml").unwrap_err().to_string();
        assert!(err.contains("learning_rat") && err.contains("x.toml"), "{err}");
    }

    #[test]
    fn bad_enum_value_lists_the_allowed_ones() {
        let err = TrainConfig::from_toml("[optim]\nlr_scheduler_type = \"cosin\"\n", "x.toml").unwrap_err().to_string();
        assert!(err.contains("cosin") && err.contains("cosine"), "{err}");
        let err = TrainConfig::from_toml("[objective]\nloss_type = [\"sigmoidd\"]\n", "x.toml").unwrap_err().to_string();
        assert!(err.contains("sigmoidd") && err.contains("hinge"), "{err}");
    }

    #[test]
    fn overrides_apply_typed_values() {
        let c = TrainConfig::default()
            .with_overrides(&["objective.beta=0.5".into(), "optim.lr_scheduler_type=cosine".into(), "lora.target_modules=[\"q_proj\"]".into()])
            .unwrap();
        assert_eq!(c.objective.beta, 0.5);
        assert_eq!(c.optim.lr_scheduler_type, SchedulerKind::Cosine);
        assert_eq!(c.lora.target_modules, vec!["q_proj".to_string()]);
        let err = TrainConfig::default().with_overrides(&["train.batch_size=0".into()]).unwrap_err().to_string();
        assert!(err.contains("batch_size"), "{err}");
    }

    #[test]
    fn reference_strategy_needs_lora() {
        let err = TrainConfig::from_toml("[train]\nreference = \"adapter-off\"\n", "x.toml").unwrap_err().to_string();
        assert!(err.contains("lora.enabled"), "{err}");
    }
}
