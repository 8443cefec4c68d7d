//! The memory a training run will need, worked out before it runs (`cargo xtask plan`): the
//! weights as they will be held, the trained parameters' gradients and AdamW moments, the
//! activations a step keeps at its batch size, row lengths and checkpointing, the reference, and
//! the phase of the step (forward, backward, optimizer) where they add up to the peak.
//!
//! The counts follow what the code keeps: per decoder layer, the tensors its backward pass needs
//! (burn's autodiff saves an op's inputs only for the operands that carry gradients; a frozen
//! matmul keeps none, `dipole_kernels::frozen`), the attention probabilities unless they are made
//! again, and under per-layer recompute one `[rows, T, hidden]` input per layer plus one layer's
//! graph. `cargo xtask bench` prints the plan beside the measured peak.

use std::fmt;

use burn::tensor::DType;
use dipole_data::Tokenizer;
use dipole_lora::LoraConfig;
use dipole_kernels::recompute::RecomputeOptions;
use dipole_models::checkpointing::KEPT_PROBABILITIES;
use dipole_models::{Checkpoint, ModelConfig, ParamKind};

use crate::config::{GradientCheckpointing, ReferenceStrategy, Stage, TrainConfig, WeightDtype};
use crate::error::TrainResult;
use crate::examples::Examples;

/// The longest rows a batch holds, in tokens: the prompt, and a completion after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowLengths {
    pub prompt: usize,
    pub completion: usize,
}

/// What a plan needs besides the config.
#[derive(Clone, Copy, Debug)]
pub struct PlanInputs<'a> {
    pub config: &'a TrainConfig,
    pub model: &'a ModelConfig,
    /// Bytes per value of the frozen matrices as held (`model.dtype` resolved against the checkpoint).
    pub frozen_bytes: usize,
    /// Every row of the batch at these lengths (the longest the data has: an upper bound).
    pub rows: RowLengths,
    /// Parallel shards each batch is split into (`train.batch_shards` resolved).
    pub shards: usize,
}

/// One part of a plan: what it is and its bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanPart {
    pub name: String,
    pub bytes: f64,
}

/// The memory of a run by part, and the peak: what stays resident through the run, plus the most
/// the step's phases add to it.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    /// Held from the first step to the last: weights, moments, the process itself.
    pub resident: Vec<PlanPart>,
    /// What each phase adds at its highest, resident aside.
    pub phases: Vec<PlanPart>,
    /// Bytes at the peak.
    pub peak: f64,
    /// The phase where the peak is reached.
    pub peak_phase: String,
}

/// The program, its allocator's arenas, tokenizer and tables besides the tensors: `cargo xtask
/// bench`'s setup peak less its weights is 43 MiB; the trainer's data and tokenizer come on top.
const PROCESS_BYTES: f64 = 64.0 * (1 << 20) as f64;

const F32: f64 = 4.0;

/// The run's parameters: how many values are trained (f32 weights, gradients and AdamW moments) and
/// the bytes of the rest as the policy holds them, and of the model as a frozen copy holds it.
struct Parameters {
    trained: f64,
    /// The policy's parameters that are not trained.
    untrained_bytes: f64,
    /// The whole model with its matrices in the frozen dtype (a frozen reference copy).
    copy_bytes: f64,
    /// The largest trained tensor (the optimizer updates one at a time).
    largest_trained: f64,
    /// How many vocabulary-sized matrices (embedding, untied LM head) are trained: their gradients
    /// wait in each shard until the end of the backward pass.
    trained_vocab_matrices: usize,
    /// Trained values in the decoder layer that has the most.
    trained_per_layer: f64,
}

fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

fn parameters(inputs: &PlanInputs<'_>, lora: Option<&LoraConfig>) -> Parameters {
    let config = inputs.config;
    let frozen = inputs.frozen_bytes as f64;
    let mut p = Parameters { trained: 0.0, untrained_bytes: 0.0, copy_bytes: 0.0, largest_trained: 0.0, trained_vocab_matrices: 0, trained_per_layer: 0.0 };
    let mut per_layer = vec![0.0; inputs.model.num_hidden_layers];
    for (spec, kind) in inputs.model.hf_tensors() {
        let values = spec.shape.iter().product::<usize>() as f64;
        // a LoRA base keeps its matrices in the frozen dtype; full fine-tuning's policy is all f32
        let as_frozen = values * if kind == ParamKind::Matrix { frozen } else { F32 };
        p.copy_bytes += as_frozen;
        let layer = layer_of(&spec.name);
        let module = spec.name.strip_suffix(".weight").unwrap_or(&spec.name);
        let mut train = |p: &mut Parameters, n: f64| {
            p.trained += n;
            p.largest_trained = p.largest_trained.max(n);
            if let Some(i) = layer {
                per_layer[i] += n;
            }
        };
        match lora {
            Some(lora) => {
                p.untrained_bytes += as_frozen;
                if kind == ParamKind::Matrix && module != "model.embed_tokens" && lora.targets(module) {
                    let [out, input] = [spec.shape[0], spec.shape[1]];
                    train(&mut p, (lora.r * (out + input)) as f64);
                }
            }
            None => {
                let frozen_layer = layer.is_some_and(|i| config.model.freeze_layers.contains(&i));
                let frozen_embedding = module == "model.embed_tokens" && config.model.freeze_embeddings;
                if frozen_layer || frozen_embedding {
                    p.untrained_bytes += values * F32;
                } else {
                    train(&mut p, values);
                    if module == "model.embed_tokens" || module == "lm_head" {
                        p.trained_vocab_matrices += 1;
                    }
                }
            }
        }
    }
    p.trained_per_layer = per_layer.into_iter().fold(0.0, f64::max);
    p
}

/// The streams a batch runs as, each `rows` rows of `queries` positions attending to `keys`
/// keys (see `CausalLm::prefix_plan`).
struct Stream {
    rows: f64,
    queries: f64,
    keys: f64,
}

fn streams(inputs: &PlanInputs<'_>, rows: usize, paired: bool) -> Vec<Stream> {
    let RowLengths { prompt, completion } = inputs.rows;
    let t = prompt + completion;
    let shared = rows / 2 * prompt + rows * completion;
    let stream = |rows: usize, queries: usize, keys: usize| Stream { rows: rows as f64, queries: queries as f64, keys: keys as f64 };
    if paired && inputs.config.train.prefix_sharing && prompt > 0 && dipole_models::worth_rearranging(shared, rows * t) {
        vec![stream(rows / 2, prompt, prompt), stream(rows, completion, t)]
    } else {
        vec![stream(rows, t, t)]
    }
}

/// Bytes decoder layer `layer`'s training graph keeps per position, attention probabilities aside:
/// the residual after attention, queries, keys and values for attention, the MLP's gate and up
/// outputs, and the norms' outputs and projections' inputs where a trained weight needs them
/// (a frozen matmul keeps no input).
fn layer_graph_per_position(model: &ModelConfig, compute: f64, lora: Option<&LoraConfig>, layer: usize) -> f64 {
    let (h, i) = (model.hidden_size as f64, model.intermediate_size as f64);
    let q = (model.num_attention_heads * model.head_dim) as f64;
    let targets = |name: &str| lora.is_none_or(|l| l.targets(&format!("model.layers.{layer}.{name}")));
    let mut bytes = h * F32 + 3.0 * q * compute + 2.0 * i * compute;
    match lora {
        // the norms' normalised inputs and their outputs, both times
        None => bytes += 4.0 * h * compute,
        Some(lora) => {
            if targets("self_attn.q_proj") || targets("self_attn.k_proj") || targets("self_attn.v_proj") {
                bytes += h * compute;
            }
            if targets("mlp.gate_proj") || targets("mlp.up_proj") {
                bytes += h * compute;
            }
            // dropout keeps its mask and the dropped input of every adapted projection
            if lora.lora_dropout > 0.0 {
                let inputs = [("self_attn.q_proj", h), ("self_attn.k_proj", h), ("self_attn.v_proj", h), ("self_attn.o_proj", q), ("mlp.gate_proj", h), ("mlp.up_proj", h), ("mlp.down_proj", i)];
                bytes += inputs.iter().filter(|(name, _)| targets(name)).map(|(_, width)| 2.0 * width * compute).sum::<f64>();
            }
        }
    }
    if targets("self_attn.o_proj") {
        bytes += q * compute;
    }
    if targets("mlp.down_proj") {
        bytes += i * compute;
    }
    bytes
}

impl MemoryPlan {
    /// The plan of `inputs`' run; an error for a config the run would refuse (see
    /// [`TrainConfig::validate`]).
    pub fn new(inputs: &PlanInputs<'_>) -> TrainResult<MemoryPlan> {
        let (config, model) = (inputs.config, inputs.model);
        let train = &config.train;
        let lora = if config.lora.enabled { Some(config.lora.lora_config(&config.model.path)?) } else { None };
        let params = parameters(inputs, lora.as_ref());
        let compute = if train.mixed_precision.compute_dtype().is_some() { 2.0 } else { F32 };
        let strategy = crate::reference::resolve_reference(config)?;
        let paired = train.stage != Stage::Sft;
        // each shard has its share of the pairs (SFT: rows), as `shard_ranges` splits them
        let items = train.batch_size.max(1);
        let shard_count = inputs.shards.clamp(1, items);
        let rows_per_shard = items.div_ceil(shard_count) * if paired { 2 } else { 1 };
        let shards = shard_count as f64;
        let streams = streams(inputs, rows_per_shard, paired);

        let (h, v, layers) = (model.hidden_size as f64, model.vocab_size as f64, model.num_hidden_layers);
        let positions: f64 = streams.iter().map(|s| s.rows * s.queries).sum();
        // one layer's attention probabilities over every stream, as kept (compute dtype) and as made (f32)
        let probs: f64 = streams.iter().map(|s| s.rows * model.num_attention_heads as f64 * s.queries * s.keys).sum();
        let (probs_kept, probs_made) = (probs * compute, probs * F32);

        let mut resident = vec![PlanPart { name: "process (program, allocator, data)".into(), bytes: PROCESS_BYTES }];
        resident.push(PlanPart { name: "untrained weights".into(), bytes: params.untrained_bytes });
        resident.push(PlanPart { name: format!("trained weights ({:.1} M values, f32)", params.trained / 1e6), bytes: params.trained * F32 });
        resident.push(PlanPart { name: "AdamW moments (2 x f32)".into(), bytes: 2.0 * params.trained * F32 });
        if strategy == ReferenceStrategy::FrozenCopy {
            resident.push(PlanPart { name: "reference model (frozen copy)".into(), bytes: params.copy_bytes });
        }
        let resident_bytes: f64 = resident.iter().map(|p| p.bytes).sum();

        let recompute = train.gradient_checkpointing == GradientCheckpointing::Layers;
        let graphs: Vec<f64> = (0..layers).map(|l| layer_graph_per_position(model, compute, lora.as_ref(), l) * positions).collect();
        let (graph_sum, graph_max) = (graphs.iter().sum::<f64>(), graphs.iter().copied().fold(0.0, f64::max));
        // Attention is materialised unless `attention_recompute` makes its probabilities again in
        // tiles (per-layer recompute materialises them anyway while they fit its limit). Materialised,
        // the forward pass holds the scores beside the kept probabilities, and the backward pass
        // their gradient and the scores'.
        let materialised = !train.attention_recompute || (recompute && probs_made <= KEPT_PROBABILITIES as f64);
        let tile = probs_made.min(F32 * RecomputeOptions::default().tile_elements as f64);
        let probs_in_graph = if materialised { probs_kept } else { 0.0 };
        let (forward_extra, backward_extra) = if materialised { (probs_made, 2.0 * probs_made) } else { (2.0 * tile, 3.0 * tile) };
        let (layer_forward, layer_backward) = (graph_max + probs_in_graph + forward_extra, graph_max + probs_in_graph + backward_extra);
        // every layer's input (f32), and without recompute its graph
        let inputs_kept = layers as f64 * positions * h * F32;
        let kept_per_shard = if recompute { inputs_kept } else { inputs_kept + graph_sum + layers as f64 * probs_in_graph };
        // the LM head: the fused head keeps its input rows and per-row statistics; otherwise the logits
        let head = if train.fused_lm_head { positions * h * F32 * 2.0 } else { 3.0 * positions * v * F32 };
        let reference_pass = match strategy {
            ReferenceStrategy::None | ReferenceStrategy::Precompute => 0.0,
            _ => shards * (positions * (4.0 * h + 3.0 * model.intermediate_size as f64) * compute + 2.0 * if train.attention_recompute { tile } else { probs_made }),
        };

        let forward = shards * (kept_per_shard + head) + (shards * layer_forward).max(reference_pass);
        // Backward: the head's gradient (a trained LM head's, or a tied embedding's first part)
        // waits in each shard until the end, when a trained embedding's lookup part is added (into
        // a tied table's head part in place under per-layer recompute; the whole graph's lookup
        // gradient is dense, then summed with the head's: three copies); the shards' are then summed.
        let vocab_matrix = v * h * F32;
        let trained_vocab = params.trained_vocab_matrices as f64 * vocab_matrix;
        let vocab_at_start = vocab_matrix.min(trained_vocab);
        let tied_copies = if recompute { 1.0 } else { 3.0 };
        let vocab_at_end = if model.tie_word_embeddings { tied_copies * trained_vocab } else { trained_vocab };
        let vocab_sum = if shards > 1.0 { trained_vocab } else { 0.0 };
        let layer_grads = params.trained * F32 - trained_vocab;
        let backward = if recompute {
            // layer by layer, top first: the shared sum of the layers' gradients grows as their
            // kept inputs go; one layer's graph and gradients at a time in each shard
            let start = shards * (kept_per_shard + head + vocab_at_start);
            let end = layer_grads + shards * vocab_at_end + vocab_sum;
            shards * (layer_backward + params.trained_per_layer * F32) + start.max(end)
        } else {
            // each shard's whole graph; its gradients, all of them, are handed over at the end
            shards * (layer_backward + (kept_per_shard + head + vocab_at_start).max(layer_grads + vocab_at_end))
        };
        // the gradients, and one tensor's new value and moments while the old ones are alive
        let optimizer = params.trained * F32 + 3.0 * params.largest_trained * F32;

        let phases = vec![
            PlanPart { name: "forward".into(), bytes: forward },
            PlanPart { name: "backward".into(), bytes: backward },
            PlanPart { name: "optimizer".into(), bytes: optimizer },
        ];
        let top = phases.iter().max_by(|a, b| a.bytes.total_cmp(&b.bytes)).expect("three phases");
        Ok(MemoryPlan { peak: resident_bytes + top.bytes, peak_phase: top.name.clone(), resident, phases })
    }
}

fn gib(bytes: f64) -> f64 {
    bytes / (1u64 << 30) as f64
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "held through the run:")?;
        for part in &self.resident {
            writeln!(f, "  {:<44} {:>8.2} GiB", part.name, gib(part.bytes))?;
        }
        writeln!(f, "added at each phase's highest:")?;
        for part in &self.phases {
            writeln!(f, "  {:<44} {:>8.2} GiB", part.name, gib(part.bytes))?;
        }
        writeln!(f, "peak phase: {}, {:.0} MiB", self.peak_phase, self.peak / (1u64 << 20) as f64)?;
        write!(f, "peak: {:.1} GiB", gib(self.peak))
    }
}

/// What a run's plan reads before it runs: the model's config and the bytes its frozen matrices
/// will be held in, the longest rows of its data as tokenised for it, and the shards it splits a
/// batch into (at most one per pair).
#[derive(Clone, Debug)]
pub struct RunShape {
    pub model: ModelConfig,
    pub frozen_bytes: usize,
    pub rows: RowLengths,
    /// `train.batch_shards`, resolved on the CPU backend before it is capped by the batch's pairs.
    pub shards: usize,
}

impl RunShape {
    /// `config`'s model (`config.json`, and the stored dtype of its first layer's matrices under
    /// `model.dtype = "auto"`) and data (training and eval rows, tokenised and truncated as the run
    /// will).
    pub fn of(config: &TrainConfig) -> TrainResult<RunShape> {
        config.validate()?;
        let dir = &config.model.path;
        let model = ModelConfig::from_dir(dir)?;
        let frozen_bytes = match config.model.dtype {
            WeightDtype::F32 => 4,
            WeightDtype::Bf16 | WeightDtype::F16 => 2,
            WeightDtype::Auto if config.model.from_scratch => 4,
            WeightDtype::Auto => {
                let checkpoint = Checkpoint::open(dir)?;
                let name = model.hf_tensors().into_iter().map(|(spec, _)| spec.name).find(|n| n.starts_with("model.layers.0.")).unwrap_or_default();
                match checkpoint.dtype(&name) {
                    Some(DType::BF16 | DType::F16) => 2,
                    _ => 4,
                }
            }
        };
        let tokenizer = Tokenizer::from_dir(dir)?;
        let (train, eval) = crate::examples::load(config, &crate::reference::stage_objective(config), &tokenizer)?;
        let rows = longest_rows(&[&train, &eval]);
        let shards = crate::batch_shards::<burn::backend::Flex>(config.train.batch_shards, usize::MAX, &Default::default());
        Ok(RunShape { model, frozen_bytes, rows, shards })
    }

    /// The plan of `config` (this shape's config, or one with another batch size).
    pub fn plan(&self, config: &TrainConfig) -> TrainResult<MemoryPlan> {
        self.plan_at(config, self.rows)
    }

    /// The plan of `config` with every row at `rows`.
    fn plan_at(&self, config: &TrainConfig, rows: RowLengths) -> TrainResult<MemoryPlan> {
        MemoryPlan::new(&PlanInputs { config, model: &self.model, frozen_bytes: self.frozen_bytes, rows, shards: self.shards })
    }

    /// Within `budget` bytes: whether `config`'s run fits, the largest batch size (up to 1,024) that
    /// does at these rows, and the longest rows (`data.max_length`, in steps of 16 tokens up to the
    /// model's positions) that do at this batch size. Every size is planned: memory need not grow
    /// monotonically (per-layer recompute stops keeping attention probabilities past 1 GiB).
    pub fn fit(&self, config: &TrainConfig, budget: f64) -> TrainResult<Fit> {
        let fits = |config: &TrainConfig, rows: RowLengths| -> TrainResult<bool> { Ok(self.plan_at(config, rows)?.peak <= budget) };
        let mut batch_size = None;
        let mut at_batch = config.clone();
        for b in (1..=1024).rev() {
            at_batch.train.batch_size = b;
            if fits(&at_batch, self.rows)? {
                batch_size = Some(b);
                break;
            }
        }
        let longest = (self.rows.prompt + self.rows.completion).max(1);
        let mut max_length = None;
        for t in (1..=self.model.max_position_embeddings.max(longest) / 16).rev().map(|k| 16 * k) {
            // rows stretched or cut to `t` tokens, the prompt keeping its share
            let prompt = (self.rows.prompt * t / longest).min(t - 1);
            if fits(config, RowLengths { prompt, completion: t - prompt })? {
                max_length = Some(t);
                break;
            }
        }
        Ok(Fit { fits: fits(config, self.rows)?, batch_size, max_length })
    }
}

/// Whether a run fits a memory budget, and what would (see [`RunShape::fit`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fit {
    pub fits: bool,
    pub batch_size: Option<usize>,
    pub max_length: Option<usize>,
}

/// The longest prompt and the longest completion after it over every example of `sets`, the
/// completion cut so that the two fit the longest row.
fn longest_rows(sets: &[&Examples]) -> RowLengths {
    let (mut prompt, mut completion, mut row) = (0, 0, 0);
    for set in sets {
        for i in 0..set.len() {
            let (p, len) = set.lengths(i);
            prompt = prompt.max(p);
            completion = completion.max(len - p);
            row = row.max(len);
        }
    }
    RowLengths { prompt, completion: completion.min(row.saturating_sub(prompt)).max(1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(name: &str) -> ModelConfig {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../xtask/shapes").join(format!("{name}.json"));
        ModelConfig::from_json_str(&std::fs::read_to_string(&path).unwrap(), &path).unwrap()
    }

    /// A `cargo xtask bench` configuration's run as a config: LoRA r 16 / alpha 32 on q, v or full
    /// fine-tuning, `_gc` per-layer recompute, `_precompute` a precomputed reference.
    fn bench_config(name: &str, pairs: usize) -> TrainConfig {
        let mut config = TrainConfig::default();
        config.lora.enabled = name.starts_with("lora");
        (config.lora.r, config.lora.alpha) = (16, 32.0);
        config.lora.target_modules = vec!["q_proj".into(), "v_proj".into()];
        config.train.batch_size = pairs;
        config.train.gradient_checkpointing = if name.ends_with("_gc") { GradientCheckpointing::Layers } else { GradientCheckpointing::Off };
        config.train.reference = if name.ends_with("_precompute") { ReferenceStrategy::Precompute } else { ReferenceStrategy::Auto };
        config
    }

    /// Peaks `cargo xtask bench --steps 1 --warmup 1 --threads 2` measured (Intel Xeon, AVX-512, 2
    /// threads, random init in f32; a quarter of T prompt): (shape, config, T, pairs, peak MiB).
    const MEASURED: [(&str, &str, usize, usize, f64); 13] = [
        ("bench-17m", "full", 256, 4, 652.3),
        ("bench-17m", "lora", 256, 4, 352.4),
        ("bench-17m", "full_precompute", 256, 4, 596.2),
        ("bench-17m", "lora_precompute", 256, 4, 352.3),
        ("smollm2-135m", "full_gc", 512, 4, 3327.4),
        ("smollm2-135m", "lora_gc", 512, 4, 1062.5),
        ("smollm2-135m", "lora", 512, 4, 3653.9),
        ("smollm2-135m", "full", 512, 4, 7172.9),
        ("qwen2.5-0.5b", "lora_gc", 512, 1, 2143.3),
        ("qwen2.5-0.5b", "lora_gc", 1024, 1, 2496.5),
        ("qwen2.5-0.5b", "lora_gc", 2048, 1, 3895.5),
        ("qwen2.5-0.5b", "lora_gc", 512, 4, 2726.4),
        ("qwen2.5-0.5b", "full_gc", 512, 4, 12834.5),
    ];

    #[test]
    fn plans_are_within_15_percent_of_the_measured_peaks() {
        let mut report = String::new();
        let mut worst: f64 = 0.0;
        for (name, config, t, pairs, measured) in MEASURED {
            let model = shape(name);
            let train = bench_config(config, pairs);
            let prompt = t / 4;
            let inputs = PlanInputs { config: &train, model: &model, frozen_bytes: 4, rows: RowLengths { prompt, completion: t - prompt }, shards: 2.min(pairs) };
            let planned = MemoryPlan::new(&inputs).unwrap().peak / (1 << 20) as f64;
            let error = planned / measured - 1.0;
            worst = worst.max(error.abs());
            report += &format!("{name} {config} T{t} {pairs} pairs: planned {planned:.0} MiB, measured {measured:.0} ({:+.1}%)\n", 100.0 * error);
        }
        assert!(worst <= 0.15, "a plan is off by more than 15%:\n{report}");
        println!("{report}");
    }
}
