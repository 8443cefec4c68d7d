//! One preference-optimisation step on a batch, as data: policy forward -> log-probs -> reference
//! log-probs -> objective -> loss and TRL's metrics. Backward and the optimizer are the caller's.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use dipole_data::{PreferenceBatch, SequenceBatch};
use dipole_lora::AdapterMode;
use dipole_loss::{ObjectiveConfig, ObjectiveState, PairInputs, PositionScores, TokenStats, ld_weights, prediction_window, preference_loss, preference_metrics, token_stats_from_positions, wpo_weights_from};
use dipole_models::{CausalLm, GradientSink, LayerTape, give_gradients};

use crate::logps::BatchTensors;

/// Where the reference log-probs of a batch come from.
// One value per step, moved, never stored in bulk: boxing the model would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Reference<B: AutodiffBackend> {
    /// Precomputed `(chosen, rejected)` log-probs per pair, in batch order.
    Precomputed(Vec<(f32, f32)>),
    /// A separate frozen model (full fine-tuning), run without autodiff. Modules share their
    /// tensors, so passing a clone costs no copy.
    Model(CausalLm<B::InnerBackend>),
    /// The policy itself with adapters switched by `mode` (LoRA: `Disabled` = base, `Reference` =
    /// base + frozen SFT adapter), run without autodiff.
    Policy(AdapterMode),
    /// Reference-free objectives.
    None,
}

/// A reference with its model picked: values at hand, or a no-autodiff model to run.
#[allow(clippy::large_enum_variant)]
enum Resolved<B: Backend> {
    Values(Option<Vec<(f32, f32)>>),
    Model(CausalLm<B>),
}

fn resolve<B: AutodiffBackend>(policy: &CausalLm<B>, reference: Reference<B>, pairs: usize) -> Resolved<B::InnerBackend> {
    match reference {
        Reference::Precomputed(values) => {
            assert_eq!(values.len(), pairs, "precomputed reference log-probs for {} pairs, batch has {pairs}", values.len());
            Resolved::Values(Some(values))
        }
        Reference::Model(model) => Resolved::Model(model),
        Reference::Policy(mode) => {
            let mut frozen = burn::module::AutodiffModule::valid(policy);
            frozen.set_adapter_mode(mode);
            Resolved::Model(frozen)
        }
        Reference::None => Resolved::Values(None),
    }
}

pub struct StepOutput<B: Backend> {
    /// Scalar loss `[1]` (before any accumulation scaling).
    pub loss: Tensor<B, 1>,
    pub metrics: BTreeMap<String, f64>,
    /// Reference log-probs used, per pair (for caching).
    pub reference_logps: Option<Vec<(f32, f32)>>,
    /// The policy's summed completion log-probs, per pair.
    pub policy_logps: Vec<(f32, f32)>,
}

/// Policy outputs on a batch, over the prediction window only (see `prediction_window`).
struct WindowOutput<B: Backend> {
    /// `[2B, L]` log-probs and the statistics the metrics need.
    scores: PositionScores<B>,
    /// `[2B]`
    sums: Tensor<B, 1>,
    /// `[2B, L]` labels and completion mask aligned with `scores`.
    labels: Tensor<B, 2, burn::tensor::Int>,
    mask: Tensor<B, 2>,
}

/// Final hidden states `[2B, T, hidden]` of a preference batch's rows, each pair's shared prompt
/// run once when that saves positions (see `CausalLm::forward_hidden_pairs`).
fn pair_hidden<B: Backend>(model: &CausalLm<B>, batch: &PreferenceBatch, device: &B::Device) -> Tensor<B, 3> {
    model.forward_hidden_pairs(&batch.input_ids, &batch.lengths(), device)
}

/// Whether a training forward pass of `model` keeps only its layers' inputs (see `LayerTape`).
fn checkpoints<B: Backend>(model: &CausalLm<B>, device: &B::Device) -> bool {
    model.layer_recompute && B::ad_enabled(device)
}

/// Summed completion log-probs from a batch's final hidden states, with LD-DPO weights when
/// configured. The LM head runs only from the first completion position on, fused with the
/// log-probs where the model allows it (`CausalLm::head_logps`: no `[rows, L, vocab]` logits);
/// `log Σ p²` is made only `with_log_sum_sq` when the logits are whole.
fn batch_logps<B: Backend>(model: &CausalLm<B>, hidden: Tensor<B, 3>, t: &BatchTensors<B>, start: usize, ld: Option<&Tensor<B, 2>>, with_log_sum_sq: bool) -> WindowOutput<B> {
    let [rows, len, h] = hidden.dims();
    let width = len - 1 - start;
    let hidden = hidden.slice([0..rows, start..len - 1, 0..h]);
    let labels = t.input_ids.clone().slice([0..rows, start + 1..len]);
    let mask = t.completion_mask.clone().slice([0..rows, start + 1..len]);
    let scores = match model.head_logps(hidden.clone().reshape([rows * width, h]), labels.clone().reshape([rows * width])) {
        Some(out) => PositionScores::from_head(out, rows, width),
        None => PositionScores::from_logits(model.logits(hidden), labels.clone(), with_log_sum_sq),
    };
    let per_token = scores.logps.clone() * mask.clone();
    let per_token = match ld {
        Some(w) => per_token * w.clone(),
        None => per_token,
    };
    WindowOutput { scores, sums: per_token.sum_dim(1).squeeze_dim::<1>(1), labels, mask }
}

fn host_pairs<B: Backend>(sums: Tensor<B, 1>, b: usize) -> Vec<(f32, f32)> {
    let v: Vec<f32> = sums.into_data().convert::<f32>().to_vec().expect("f32");
    (0..b).map(|i| (v[i], v[b + i])).collect()
}

/// Summed completion log-probs `(chosen, rejected)` per pair of `model` on a batch, with LD-DPO
/// weights when `ld_alpha` is set.
///
/// Without autodiff nothing is kept for a backward pass; where the LM head is not fused (see
/// [`batch_logps`]) the vocabulary-sized logits are made a few rows at a time (at most
/// `LOGITS_CHUNK` elements), so the pass's peak stays near one layer's activations, which matters
/// when it runs beside, or just before, the policy's forward (`preference_step`). Rows are
/// independent, so the values equal the unchunked pass's.
pub fn model_logps<B: Backend>(model: &CausalLm<B>, batch: &PreferenceBatch, ld_alpha: Option<f64>, device: &B::Device) -> Vec<(f32, f32)> {
    const LOGITS_CHUNK: usize = 1 << 22;
    let t = BatchTensors::<B>::new(batch, device);
    let start = prediction_window(&batch.completion_mask);
    let ld = ld_alpha.map(|a| ld_tensor::<B>(batch, a, start, device));
    let hidden = pair_hidden(model, batch, device);
    let [rows, len, h] = hidden.dims();
    let width = len - 1 - start;
    let per_chunk = if model.fuses_head() { rows } else { (LOGITS_CHUNK / (width * model.config.vocab_size).max(1)).max(1) };
    let mut sums = Vec::with_capacity(rows);
    for r0 in (0..rows).step_by(per_chunk) {
        let r = r0..(r0 + per_chunk).min(rows);
        let part = t.rows(r.clone());
        let ld = ld.as_ref().map(|w| w.clone().slice([r.clone(), 0..width]));
        sums.push(batch_logps(model, hidden.clone().slice([r, 0..len, 0..h]), &part, start, ld.as_ref(), false).sums);
    }
    host_pairs(Tensor::cat(sums, 0), batch.num_pairs())
}

/// Reference log-probs of a batch under `reference` (no autodiff), `None` for reference-free runs;
/// a model's pass runs on `shards` parallel threads.
pub fn reference_logps<B: AutodiffBackend>(
    policy: &CausalLm<B>,
    reference: Reference<B>,
    batch: &PreferenceBatch,
    ld_alpha: Option<f64>,
    shards: usize,
    device: &B::Device,
) -> Option<Vec<(f32, f32)>> {
    match resolve(policy, reference, batch.num_pairs()) {
        Resolved::Values(values) => values,
        Resolved::Model(model) => Some(sharded_model_logps(&model, batch, ld_alpha, shards, device)),
    }
}

/// [`model_logps`] with the batch's pairs split over `shards` parallel threads (each shard padded
/// to its own longest row).
pub fn sharded_model_logps<B: Backend>(model: &CausalLm<B>, batch: &PreferenceBatch, ld_alpha: Option<f64>, shards: usize, device: &B::Device) -> Vec<(f32, f32)> {
    let ranges = shard_ranges(batch.num_pairs(), shards);
    if ranges.len() == 1 {
        return model_logps(model, batch, ld_alpha, device);
    }
    let subs: Vec<PreferenceBatch> = ranges.into_iter().map(|r| batch.shard(r)).collect();
    parallel(&subs, |sub| model_logps(model, sub, ld_alpha, device)).concat()
}

/// LD-DPO weights of a batch as a `[2B, T-1-start]` tensor aligned with the windowed log-probs.
fn ld_tensor<B: Backend>(batch: &PreferenceBatch, alpha: f64, start: usize, device: &B::Device) -> Tensor<B, 2> {
    let w = ld_weights(&batch.completion_mask, alpha);
    let flat: Vec<f32> = w.iter().flat_map(|r| r[start + 1..].to_vec()).collect();
    Tensor::from_data(TensorData::new(flat, [w.len(), batch.seq_len - 1 - start]), device)
}

/// What a step needs besides the models and the batch: the objective, its state (the running
/// statistics some objectives keep), and how many parallel shards the batch's pairs are split into
/// (resolved, see [`batch_shards`]).
pub struct StepContext<'a> {
    pub objective: &'a ObjectiveConfig,
    pub state: &'a mut ObjectiveState,
    pub shards: usize,
}

/// The objective and TRL's metrics for `policy` on one batch, given reference log-probs. Works on
/// any backend: under autodiff it is training (the loss carries gradients, objective state moves),
/// elsewhere evaluation, and there the policy's pass runs on `ctx.shards` parallel threads (see
/// [`preference_step`]; under autodiff it runs in one piece, as training needs
/// [`preference_step`]'s graphs for more).
pub fn objective_on_batch<B: Backend>(
    policy: &CausalLm<B>,
    ref_pairs: Option<Vec<(f32, f32)>>,
    batch: &PreferenceBatch,
    ctx: StepContext<'_>,
    device: &B::Device,
) -> StepOutput<B> {
    let StepContext { objective: config, state, shards } = ctx;
    let training = B::ad_enabled(device);
    let b = batch.num_pairs();
    let ranges = shard_ranges(b, if B::ad_enabled(device) { 1 } else { shards });
    let pass = if ranges.len() == 1 {
        policy_pass(policy, batch, config, false, device)
    } else {
        let subs: Vec<PreferenceBatch> = ranges.iter().map(|r| batch.shard(r.clone())).collect();
        let passes = parallel(&subs, |sub| policy_pass(policy, sub, config, false, device));
        let merged = MergedPasses::new(passes, &ranges, b);
        let sums = Tensor::from_data(TensorData::new(merged.values, [2 * b]), device);
        PolicyPass { sums, stats: merged.stats, weights: merged.weights, tape: None }
    };
    finish(pass, ref_pairs, batch, config, state, training, device)
}

/// `items` split into `shards` near-equal ranges in order (at least one, never an empty one).
fn shard_ranges(items: usize, shards: usize) -> Vec<std::ops::Range<usize>> {
    let n = shards.clamp(1, items.max(1));
    (0..n).map(|k| k * items / n..(k + 1) * items / n).collect()
}

/// `f` on every item on its own thread, results in order; the CPU threads are split between them
/// (see [`with_threads`]).
fn parallel<I, R>(items: I, f: impl Fn(I::Item) -> R + Sync) -> Vec<R>
where
    I: IntoIterator<IntoIter: ExactSizeIterator, Item: Send>,
    R: Send,
{
    let (items, f) = (items.into_iter(), &f);
    let n = items.len();
    std::thread::scope(|scope| {
        let handles: Vec<_> = items.enumerate().map(|(k, item)| scope.spawn(move || with_threads(shard_threads(n, k), || f(item)))).collect();
        handles.into_iter().map(join).collect()
    })
}

/// Shards' policy passes as one pass over the whole batch.
struct MergedPasses<B: Backend> {
    /// `[2B]` summed log-probs in the batch's row order (chosen rows, then rejected rows).
    values: Vec<f32>,
    stats: TokenStats,
    /// WPO weights per pair, in batch order.
    weights: Option<Tensor<B, 1>>,
    /// Each shard's own pass and its rows in `values`.
    shards: Vec<(ShardSums<B>, Vec<usize>)>,
}

impl<B: Backend> MergedPasses<B> {
    fn new(passes: Vec<PolicyPass<B>>, ranges: &[std::ops::Range<usize>], b: usize) -> Self {
        let mut values = vec![0f32; 2 * b];
        let mut stats = Vec::with_capacity(passes.len());
        let mut weights = Vec::new();
        let mut shards = Vec::with_capacity(passes.len());
        for (pass, range) in passes.into_iter().zip(ranges) {
            let rows: Vec<usize> = range.clone().chain(b + range.start..b + range.end).collect();
            let shard_values: Vec<f32> = pass.sums.clone().detach().into_data().convert::<f32>().to_vec().expect("f32");
            for (&row, v) in rows.iter().zip(shard_values) {
                values[row] = v;
            }
            stats.push(pass.stats);
            weights.extend(pass.weights);
            shards.push((ShardSums { sums: pass.sums, tape: pass.tape }, rows));
        }
        MergedPasses {
            values,
            stats: TokenStats::merge(&stats),
            weights: (!weights.is_empty()).then(|| Tensor::cat(weights, 0)),
            shards,
        }
    }
}

/// A shard's summed log-probs (carrying its graph under autodiff) and its tape under per-layer
/// recompute.
struct ShardSums<B: Backend> {
    sums: Tensor<B, 1>,
    tape: Option<LayerTape<B>>,
}

/// What the objective needs from the policy's forward pass.
struct PolicyPass<B: Backend> {
    /// `[2B]` summed completion log-probs (carrying gradients under autodiff).
    sums: Tensor<B, 1>,
    stats: TokenStats,
    weights: Option<Tensor<B, 1>>,
    /// The layers' part of the backward pass, under per-layer recompute.
    tape: Option<LayerTape<B>>,
}

/// The policy's pass on a batch; with `checkpoint`, under per-layer recompute (`LayerTape`), whose
/// tape the caller must run for the layers' gradients.
fn policy_pass<B: Backend>(policy: &CausalLm<B>, batch: &PreferenceBatch, config: &ObjectiveConfig, checkpoint: bool, device: &B::Device) -> PolicyPass<B> {
    let t = BatchTensors::<B>::new(batch, device);
    let start = prediction_window(&batch.completion_mask);
    let ld = config.ld_alpha.map(|a| ld_tensor::<B>(batch, a, start, device));
    let (hidden, tape) = if checkpoint {
        let (hidden, tape) = policy.forward_hidden_pairs_checkpointed(&batch.input_ids, &batch.lengths(), device);
        (hidden, Some(tape))
    } else {
        (pair_hidden(policy, batch, device), None)
    };
    let out = batch_logps(policy, hidden, &t, start, ld.as_ref(), config.use_weighting);
    let scores = &out.scores;
    let stats = token_stats_from_positions(scores.logit_mean.clone(), scores.entropy.clone(), scores.argmax.clone(), out.labels.clone(), out.mask.clone());
    let weights = config.use_weighting.then(|| {
        let log_sum_sq = scores.log_sum_sq.clone().expect("log Σ p² is made when WPO weights are asked for");
        wpo_weights_from(scores.logps.clone(), log_sum_sq, out.mask.clone())
    });
    PolicyPass { sums: out.sums, stats, weights, tape }
}

/// The objective and metrics from the policy's pass and the reference log-probs.
fn finish<B: Backend>(
    pass: PolicyPass<B>,
    ref_pairs: Option<Vec<(f32, f32)>>,
    batch: &PreferenceBatch,
    config: &ObjectiveConfig,
    state: &mut ObjectiveState,
    training: bool,
    device: &B::Device,
) -> StepOutput<B> {
    let b = batch.num_pairs();
    let PolicyPass { sums, stats, weights, tape } = pass;
    debug_assert!(tape.is_none(), "the caller keeps the tape for the backward pass");
    let sums_detached = sums.clone().detach();
    if let Some(labels) = &batch.labels {
        return kto_on_logps(sums, ref_pairs, labels, config);
    }
    let lens: Vec<f32> = batch.completion_lengths().iter().map(|&l| l as f32).collect();
    let lens = Tensor::<B, 1>::from_data(TensorData::new(lens, [2 * b]), device);
    let ref_tensor = |f: fn(&(f32, f32)) -> f32| -> Option<Tensor<B, 1>> {
        ref_pairs.as_ref().map(|p| Tensor::from_data(TensorData::new(p.iter().map(f).collect::<Vec<_>>(), [b]), device))
    };
    let inputs = PairInputs {
        chosen_logps: sums.clone().narrow(0, 0, b),
        rejected_logps: sums.narrow(0, b, b),
        ref_chosen_logps: ref_tensor(|p| p.0),
        ref_rejected_logps: ref_tensor(|p| p.1),
        chosen_lengths: lens.clone().narrow(0, 0, b),
        rejected_lengths: lens.narrow(0, b, b),
        weights,
    };
    let policy_logps = host_pairs(sums_detached, b);
    let out = preference_loss(config, &inputs, state, training);
    let mut metrics = preference_metrics(&out, &inputs, Some(&stats));
    // Reward accuracy counting exact ties (every pair at step 0, when policy = reference) as half
    // right: the coin-flip baseline that TRL's strict `rewards/accuracies` reports as 0.
    let margins = host_f64((out.chosen_rewards.clone() - out.rejected_rewards.clone()).detach());
    let half_ties = margins.iter().map(|&m| if m > 0.0 { 1.0 } else if m == 0.0 { 0.5 } else { 0.0 }).sum::<f64>();
    metrics.insert("rewards/accuracies_ties_half".into(), half_ties / margins.len().max(1) as f64);
    StepOutput {
        loss: out.loss,
        metrics,
        reference_logps: ref_pairs,
        policy_logps,
    }
}

/// KTO on a batch of unpaired examples (rows `0..B`) and their KL sequences (rows `B..2B`).
fn kto_on_logps<B: Backend>(sums: Tensor<B, 1>, ref_pairs: Option<Vec<(f32, f32)>>, labels: &[bool], config: &ObjectiveConfig) -> StepOutput<B> {
    let b = labels.len();
    let device = sums.device();
    let refs = ref_pairs.expect("KTO needs reference log-probs");
    let policy_logps = host_pairs(sums.clone().detach(), b);
    // the KL estimate: policy vs reference on the mismatched sequences, without gradient
    let kl = policy_logps.iter().zip(&refs).map(|(p, r)| (p.1 - r.1) as f64).sum::<f64>() / b.max(1) as f64;
    let ref_main = Tensor::<B, 1>::from_data(TensorData::new(refs.iter().map(|r| r.0).collect::<Vec<_>>(), [b]), &device);
    let out = dipole_loss::kto_loss(config, sums.narrow(0, 0, b), ref_main, labels, kl);
    let rewards = host_f64(out.rewards);
    let mut metrics = BTreeMap::new();
    metrics.insert("kl".to_string(), out.kl);
    let mut class_means = |name: &str, want: bool| -> Option<f64> {
        let rows: Vec<usize> = (0..b).filter(|&i| labels[i] == want).collect();
        if rows.is_empty() {
            return None;
        }
        let n = rows.len() as f64;
        let reward = rows.iter().map(|&i| rewards[i]).sum::<f64>() / n;
        metrics.insert(format!("rewards/{name}"), reward);
        metrics.insert(format!("logps/{name}"), rows.iter().map(|&i| policy_logps[i].0 as f64).sum::<f64>() / n);
        metrics.insert(format!("count/{name}"), n);
        Some(reward)
    };
    if let (Some(c), Some(r)) = (class_means("chosen", true), class_means("rejected", false)) {
        metrics.insert("rewards/margins".to_string(), c - r);
    }
    StepOutput { loss: out.loss, metrics, reference_logps: Some(refs), policy_logps }
}

fn host_f64<B: Backend>(t: Tensor<B, 1>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec().expect("f64")
}

/// SFT on a batch of sequences: the mean negative log-likelihood over every completion token of the
/// batch (TRL's `SFTTrainer` with a completion-only loss), with `mean_token_accuracy`, `entropy` and
/// `num_tokens`. Without autodiff the rows are split over `shards` parallel threads.
pub fn sft_on_batch<B: Backend>(policy: &CausalLm<B>, batch: &SequenceBatch, shards: usize, device: &B::Device) -> StepOutput<B> {
    let ranges = shard_ranges(batch.len(), if B::ad_enabled(device) { 1 } else { shards });
    if ranges.len() == 1 {
        let pass = sft_pass(policy, batch, false, device);
        return sft_output(pass.sums, pass.counts);
    }
    let subs: Vec<SequenceBatch> = ranges.into_iter().map(|r| batch.shard(r)).collect();
    let (values, counts, _) = merge_sft(parallel(&subs, |sub| sft_pass(policy, sub, false, device)));
    let n = values.len();
    sft_output(Tensor::from_data(TensorData::new(values, [n]), device), counts)
}

/// Shards' SFT passes in row order: the summed log-probs' values, the summed counts, and each
/// shard's own summed log-probs and tape.
fn merge_sft<B: Backend>(passes: Vec<SftPass<B>>) -> (Vec<f32>, SftCounts, Vec<ShardSums<B>>) {
    let mut values = Vec::new();
    let mut counts = SftCounts::default();
    let mut sums = Vec::with_capacity(passes.len());
    for pass in passes {
        values.extend(pass.sums.clone().detach().into_data().convert::<f32>().to_vec::<f32>().expect("f32"));
        counts.tokens += pass.counts.tokens;
        counts.entropy += pass.counts.entropy;
        counts.correct += pass.counts.correct;
        sums.push(ShardSums { sums: pass.sums, tape: pass.tape });
    }
    (values, counts, sums)
}

/// Token counts of an SFT batch: the loss's denominator and the metrics' numerators.
#[derive(Clone, Copy, Default)]
struct SftCounts {
    tokens: f64,
    entropy: f64,
    correct: f64,
}

struct SftPass<B: Backend> {
    /// `[rows]` summed completion log-probs (carrying gradients under autodiff).
    sums: Tensor<B, 1>,
    counts: SftCounts,
    tape: Option<LayerTape<B>>,
}

fn sft_pass<B: Backend>(policy: &CausalLm<B>, batch: &SequenceBatch, checkpoint: bool, device: &B::Device) -> SftPass<B> {
    let t = BatchTensors::<B>::from_rows(&batch.input_ids, &batch.attention_mask, &batch.completion_mask, batch.seq_len, device);
    let start = prediction_window(&batch.completion_mask);
    let (hidden, tape) = if checkpoint {
        let (hidden, tape) = policy.forward_hidden_checkpointed(t.input_ids.clone(), Some(t.attention_mask.clone()));
        (hidden, Some(tape))
    } else {
        (policy.forward_hidden(t.input_ids.clone(), Some(t.attention_mask.clone()), None), None)
    };
    let out = batch_logps(policy, hidden, &t, start, None, false);
    let mask = out.mask;
    let entropy = (out.scores.entropy * mask.clone()).sum();
    let correct = (out.scores.argmax.equal(out.labels).float() * mask.clone()).sum();
    let host = Tensor::cat(vec![mask.sum(), entropy, correct], 0).detach();
    let v = host_f64(host);
    SftPass { sums: out.sums, counts: SftCounts { tokens: v[0], entropy: v[1], correct: v[2] }, tape }
}

fn sft_output<B: Backend>(sums: Tensor<B, 1>, counts: SftCounts) -> StepOutput<B> {
    let n = counts.tokens;
    let loss = sums.clone().sum().neg().div_scalar(n.max(1.0));
    let per_token = |x: f64| if n > 0.0 { x / n } else { 0.0 };
    let mut metrics = BTreeMap::new();
    metrics.insert("entropy".to_string(), per_token(counts.entropy));
    metrics.insert("mean_token_accuracy".to_string(), per_token(counts.correct));
    metrics.insert("num_tokens".to_string(), n);
    StepOutput {
        loss,
        metrics,
        reference_logps: None,
        policy_logps: host_f64(sums.detach()).into_iter().map(|v| (v as f32, 0.0)).collect(),
    }
}

/// A training micro-step's forward pass: the loss and metrics, and what its backward pass needs.
pub struct TrainStep<B: AutodiffBackend> {
    /// The loss (before any accumulation or loss scaling).
    pub loss: f64,
    pub metrics: BTreeMap<String, f64>,
    /// Reference log-probs used, per pair (for caching).
    pub reference_logps: Option<Vec<(f32, f32)>>,
    /// The policy's summed completion log-probs, per pair.
    pub policy_logps: Vec<(f32, f32)>,
    graph: StepGraph<B>,
}

enum StepGraph<B: AutodiffBackend> {
    /// One graph from the policy's parameters to the loss (from the last layer's output, with
    /// the tape for the layers, under per-layer recompute).
    Whole { policy: Box<CausalLm<B>>, loss: Tensor<B, 1>, tape: Option<LayerTape<B>> },
    /// Each shard's graph ends at its rows' summed log-probs; the loss's graph starts from a
    /// detached copy of all of them (`merged`, a leaf).
    Sharded { loss: Tensor<B, 1>, merged: Tensor<B, 1>, shards: Vec<ShardGraph<B>> },
}

struct ShardGraph<B: AutodiffBackend> {
    /// The policy with its own parameter leaves (same ids and values), so this shard's graph is
    /// separate from the others' and its backward pass can run beside theirs.
    policy: CausalLm<B>,
    /// `[2b]` summed log-probs of the shard's rows, carrying gradients.
    sums: Tensor<B, 1>,
    /// Where those rows sit in the whole batch's `[2B]`.
    rows: Vec<usize>,
    tape: Option<LayerTape<B>>,
}

impl<B: AutodiffBackend> TrainStep<B> {
    fn new(out: StepOutput<B>, graph: impl FnOnce(Tensor<B, 1>) -> StepGraph<B>) -> Self {
        TrainStep {
            loss: out.loss.clone().into_scalar().elem::<f64>(),
            metrics: out.metrics,
            reference_logps: out.reference_logps,
            policy_logps: out.policy_logps,
            graph: graph(out.loss),
        }
    }

    fn whole(policy: &CausalLm<B>, out: StepOutput<B>, tape: Option<LayerTape<B>>) -> Self {
        Self::new(out, |loss| StepGraph::Whole { policy: Box::new(policy.clone()), loss, tape })
    }

    fn sharded(out: StepOutput<B>, merged: Tensor<B, 1>, shards: Vec<ShardGraph<B>>) -> Self {
        Self::new(out, |loss| StepGraph::Sharded { loss, merged, shards })
    }

    /// Gradients of `factor * loss` for the policy's trainable parameters (see
    /// [`backward_into`](Self::backward_into)).
    pub fn backward(self, factor: f64) -> GradientsParams {
        let mut grads = GradientsParams::new();
        self.backward_into(factor, &mut grads);
        grads
    }

    /// Adds the gradients of `factor * loss` for the policy's trainable parameters to `acc`
    /// (gradient accumulation over micro-batches holds one set). A sharded step runs its shards'
    /// backward passes on parallel threads and sums their gradients as they come (see
    /// [`ShardedSum`]): by the chain rule through the summed log-probs, the same gradients as one
    /// backward pass over the whole batch.
    pub fn backward_into(self, factor: f64, acc: &mut GradientsParams) {
        match self.graph {
            StepGraph::Whole { policy, loss, tape } => parameter_gradients(policy.as_ref(), loss.mul_scalar(factor).backward(), tape, acc),
            StepGraph::Sharded { loss, merged, shards } => {
                let grads = loss.mul_scalar(factor).backward();
                let upstream = merged.grad(&grads);
                debug_assert!(upstream.is_some(), "the loss does not depend on the policy's log-probs");
                let Some(upstream) = upstream else { return };
                let sum = ShardedSum::new(std::mem::take(acc), shards.len());
                let jobs = shards.into_iter().map(|shard| (shard, upstream.clone())).enumerate();
                parallel(jobs, |(k, (shard, upstream))| {
                    let device = upstream.device();
                    let rows: Vec<i64> = shard.rows.iter().map(|&r| r as i64).collect();
                    let n = rows.len();
                    let index = Tensor::<B::InnerBackend, 1, Int>::from_data(TensorData::new(rows, [n]), &device);
                    let upstream = Tensor::<B, 1>::from_inner(upstream.select(0, index));
                    let mut sink = ShardSink { sum: &sum, shard: k };
                    parameter_gradients(&shard.policy, (shard.sums * upstream).sum().backward(), shard.tape, &mut sink);
                    sum.shard_done(k, &shard.policy);
                });
                *acc = sum.finish();
            }
        }
    }
}

/// Gives `sink` the gradients of `policy`'s trainable parameters from a backward pass, carried
/// down the layers by the tape under per-layer recompute.
fn parameter_gradients<B: AutodiffBackend>(policy: &CausalLm<B>, mut grads: B::Gradients, tape: Option<LayerTape<B>>, sink: &mut impl GradientSink<B>) {
    match tape {
        Some(tape) => tape.backward_into(policy, grads, sink),
        None => give_gradients(policy, &mut grads, sink),
    }
}

/// Shards' gradients summed as they come, parameter by parameter, each parameter's in shard order
/// (float addition is not associative: completion order would make runs of three or more shards
/// differ in their last bits). A shard's gradient waits only until every shard before it has given
/// that parameter's or finished, so the sum holds one set of gradients and the few still waiting,
/// not a set per shard.
struct ShardedSum {
    state: std::sync::Mutex<SumState>,
}

struct SumState {
    total: GradientsParams,
    /// Per parameter, the shard whose gradient is added next (absent: shard 0).
    next: std::collections::HashMap<ParamId, usize>,
    /// Per shard, its gradients that arrived before their turn.
    waiting: Vec<GradientsParams>,
    done: Vec<bool>,
}

/// Shard `shard`'s way into a [`ShardedSum`].
struct ShardSink<'a> {
    sum: &'a ShardedSum,
    shard: usize,
}

impl ShardedSum {
    /// A sum over `shards` shards added to what `total` holds.
    fn new(total: GradientsParams, shards: usize) -> Self {
        let state = SumState { total, next: Default::default(), waiting: (0..shards).map(|_| GradientsParams::new()).collect(), done: vec![false; shards] };
        ShardedSum { state: std::sync::Mutex::new(state) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SumState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Shard `shard` has given every gradient it has: parameters it gave none of go on to the next shard.
    fn shard_done<B: AutodiffBackend, M: Module<B>>(&self, shard: usize, module: &M) {
        struct Advance<'a>(&'a mut SumState);
        impl<B: AutodiffBackend> ModuleVisitor<B> for Advance<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                self.0.advance::<B, D>(param.id);
            }
        }
        let mut state = self.lock();
        state.done[shard] = true;
        module.visit(&mut Advance(&mut state));
    }

    /// The sum; panics if a shard never finished.
    fn finish(self) -> GradientsParams {
        let state = self.state.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner());
        assert!(state.done.iter().all(|&d| d) && state.waiting.iter().all(GradientsParams::is_empty), "a shard's gradients never arrived");
        state.total
    }
}

impl SumState {
    /// Adds parameter `id`'s waiting gradients whose turn has come.
    fn advance<B: AutodiffBackend, const D: usize>(&mut self, id: ParamId) {
        let next = self.next.entry(id).or_default();
        while *next < self.waiting.len() {
            match self.waiting[*next].remove::<B::InnerBackend, D>(id) {
                Some(grad) => GradientSink::<B>::give(&mut self.total, id, grad),
                None if self.done[*next] => {}
                None => break,
            }
            *next += 1;
        }
    }
}

impl<B: AutodiffBackend> GradientSink<B> for ShardSink<'_> {
    fn give<const D: usize>(&mut self, id: ParamId, grad: Tensor<B::InnerBackend, D>) {
        let mut state = self.sum.lock();
        debug_assert!(state.waiting[self.shard].get::<B::InnerBackend, D>(id).is_none() && state.next.get(&id).is_none_or(|&next| next <= self.shard), "shard {} gave parameter {id} twice", self.shard);
        state.waiting[self.shard].register::<B::InnerBackend, D>(id, grad);
        state.advance::<B, D>(id);
    }
}

/// Runs `f` in a rayon pool of its own with `threads` threads, so that the CPU backend's kernels
/// (gemm, rayon-parallel elementwise ops) of parallel shards each run on their own share of the
/// cores: on the one global pool every shard's kernels split into tasks on all cores and wait on
/// each other's (measured on 2 cores, 2 shards: 6% faster full fine-tuning steps, 16-18% LoRA and
/// precomputed-reference steps; 12% for full fine-tuning with each shard's reference pass moved onto
/// its thread, see [`preference_step`]). Where no pool can be made, `f` runs on the global one.
fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    match rayon_core::ThreadPoolBuilder::new().num_threads(threads).build() {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}

/// Shard `k`'s share of the CPU threads when `shards` run in parallel: an even split, the remainder
/// to the first shards (8 threads, 3 shards: 3, 3, 2), and at least one.
fn shard_threads(shards: usize, k: usize) -> usize {
    let (cpu, n) = (cpu_threads(), shards.max(1));
    (cpu / n + usize::from(k < cpu % n)).max(1)
}

fn join<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Gives every trainable parameter a fresh autodiff leaf (same id, same values, no copy).
struct FreshLeaves;

impl<B: AutodiffBackend> ModuleMapper<B> for FreshLeaves {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        // detach keeps `require_grad`, as a new leaf outside every existing graph
        Param::from_mapped_value(id, tensor.detach(), mapper)
    }
}

/// How many shards a micro-batch of `pairs` pairs (or SFT rows) is split into: `requested`, or for 0 (auto) one
/// per CPU thread on the CPU backends and 1 elsewhere (a GPU runs one batch's kernels at a time
/// anyway); never more than the pairs.
pub fn batch_shards<B: Backend>(requested: usize, pairs: usize, device: &B::Device) -> usize {
    let wanted = match requested {
        0 => {
            if dipole_models::is_cpu_backend::<B>(device) { cpu_threads() } else { 1 }
        }
        n => n,
    };
    wanted.clamp(1, pairs.max(1))
}

/// The threads of the CPU backend's pool: `RAYON_NUM_THREADS`, else the machine's.
fn cpu_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// One training micro-step's forward: the reference's pass and the policy's, then the objective.
///
/// With `shards > 1` the batch's pairs are split into that many shards (see [`batch_shards`]),
/// each running its reference pass, then its policy pass (with its own autodiff graph), on a thread
/// of its own with its share of the CPU threads.
/// The objective still sees the whole batch (losses that couple pairs, batch-level metrics), so
/// the loss, metrics and gradients are those of the unsharded step up to float rounding. On the
/// CPU backend this is what keeps both cores busy: its elementwise kernels run on one thread.
///
/// With one shard, a reference model (no autodiff) runs on a second thread while the policy's
/// forward runs on this one, each on half of the CPU threads (results are the same as running them
/// one after the other).
pub fn preference_step<B: AutodiffBackend>(
    policy: &CausalLm<B>,
    reference: Reference<B>,
    batch: &PreferenceBatch,
    ctx: StepContext<'_>,
    device: &B::Device,
) -> TrainStep<B> {
    let StepContext { objective: config, state, shards } = ctx;
    let training = true;
    let b = batch.num_pairs();
    let resolved = resolve(policy, reference, b);
    let n = shards.clamp(1, b.max(1));
    let checkpoint = checkpoints(policy, device);
    if n == 1 {
        let (mut pass, ref_pairs) = match resolved {
            Resolved::Values(values) => (policy_pass(policy, batch, config, checkpoint, device), values),
            Resolved::Model(model) => std::thread::scope(|scope| {
                let ld_alpha = config.ld_alpha;
                // each pass on its own half of the CPU threads (see `with_threads`)
                let pending = scope.spawn(move || with_threads(shard_threads(2, 0), || model_logps(&model, batch, ld_alpha, device)));
                let pass = with_threads(shard_threads(2, 1), || policy_pass(policy, batch, config, checkpoint, device));
                (pass, Some(join(pending)))
            }),
        };
        let tape = pass.tape.take();
        let out = finish(pass, ref_pairs, batch, config, state, training, device);
        return TrainStep::whole(policy, out, tape);
    }

    let ranges = shard_ranges(b, n);
    let subs: Vec<PreferenceBatch> = ranges.iter().map(|r| batch.shard(r.clone())).collect();
    let own: Vec<CausalLm<B>> = subs.iter().map(|_| policy.clone().map(&mut FreshLeaves)).collect();
    let jobs: Vec<(&CausalLm<B>, &PreferenceBatch)> = own.iter().zip(&subs).collect();
    // A shard's reference pass runs on its thread before its policy pass (whose graph then grows
    // after the reference's activations are gone), one thread per share of the cores.
    let (shard_refs, passes): (Vec<_>, Vec<_>) = parallel(&jobs, |(policy, sub)| {
        let refs = match &resolved {
            Resolved::Model(model) => model_logps(model, sub, config.ld_alpha, device),
            Resolved::Values(_) => Vec::new(),
        };
        (refs, policy_pass(*policy, sub, config, checkpoint, device))
    })
    .into_iter()
    .unzip();
    let ref_pairs = match resolved {
        Resolved::Values(values) => values,
        Resolved::Model(_) => Some(shard_refs.concat()),
    };
    let merged = MergedPasses::new(passes, &ranges, b);
    let leaf = Tensor::<B, 1>::from_data(TensorData::new(merged.values, [2 * b]), device).require_grad();
    let shards = own.into_iter().zip(merged.shards).map(|(policy, (ShardSums { sums, tape }, rows))| ShardGraph { policy, sums, rows, tape }).collect();
    let pass = PolicyPass { sums: leaf.clone(), stats: merged.stats, weights: merged.weights, tape: None };
    let out = finish(pass, ref_pairs, batch, config, state, training, device);
    TrainStep::sharded(out, leaf, shards)
}

/// SFT's micro-step ([`sft_on_batch`]), its rows split over `shards` parallel threads as
/// [`preference_step`] splits pairs; the loss is over the whole batch's tokens either way.
pub fn sft_step<B: AutodiffBackend>(policy: &CausalLm<B>, batch: &SequenceBatch, shards: usize, device: &B::Device) -> TrainStep<B> {
    let rows = batch.len();
    let ranges = shard_ranges(rows, shards);
    let checkpoint = checkpoints(policy, device);
    if ranges.len() == 1 {
        let pass = sft_pass(policy, batch, checkpoint, device);
        return TrainStep::whole(policy, sft_output(pass.sums, pass.counts), pass.tape);
    }
    let subs: Vec<SequenceBatch> = ranges.iter().map(|r| batch.shard(r.clone())).collect();
    let own: Vec<CausalLm<B>> = subs.iter().map(|_| policy.clone().map(&mut FreshLeaves)).collect();
    let jobs: Vec<(&CausalLm<B>, &SequenceBatch)> = own.iter().zip(&subs).collect();
    let (merged, counts, sums) = merge_sft(parallel(&jobs, |(policy, sub)| sft_pass(*policy, sub, checkpoint, device)));
    let shards = own.into_iter().zip(sums).zip(ranges).map(|((policy, ShardSums { sums, tape }), range)| ShardGraph { policy, sums, rows: range.collect(), tape }).collect();
    let merged = Tensor::<B, 1>::from_data(TensorData::new(merged, [rows]), device).require_grad();
    let out = sft_output(merged.clone(), counts);
    TrainStep::sharded(out, merged, shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_shard_runs_in_a_pool_of_its_share_of_the_threads() {
        assert_eq!(with_threads(1, rayon_core::current_num_threads), 1);
        assert_eq!(with_threads(3, rayon_core::current_num_threads), 3);
        let pools = parallel(&[(); 3], |_| rayon_core::current_num_threads());
        assert_eq!(pools, (0..3).map(|k| shard_threads(3, k)).collect::<Vec<_>>());
        assert_eq!(shard_threads(1, 0), cpu_threads());
        assert_eq!(shard_threads(usize::MAX, 0), 1, "never fewer than one thread");
        for n in 1..=2 * cpu_threads() {
            let total: usize = (0..n).map(|k| shard_threads(n, k)).sum();
            assert_eq!(total, cpu_threads().max(n), "{n} shards share every thread, one each at least");
        }
    }

    type AD = burn::backend::Autodiff<burn::backend::Flex>;

    /// One parameter's gradients from shards arriving in `arrival` order, each shard done right
    /// after it gives its own (`None`: it gives none), summed by a [`ShardedSum`] onto `start`.
    fn summed(param: &Param<Tensor<AD, 1>>, start: Option<f32>, grads: &[Option<f32>], arrival: &[usize]) -> Option<f32> {
        let device = Default::default();
        let mut total = GradientsParams::new();
        if let Some(v) = start {
            total.register::<burn::backend::Flex, 1>(param.id, Tensor::from_floats([v], &device));
        }
        let sum = ShardedSum::new(total, grads.len());
        for &k in arrival {
            if let Some(g) = grads[k] {
                GradientSink::<AD>::give::<1>(&mut ShardSink { sum: &sum, shard: k }, param.id, Tensor::from_floats([g], &device));
            }
            sum.shard_done::<AD, _>(k, param);
        }
        let total = sum.finish().remove::<burn::backend::Flex, 1>(param.id);
        total.map(|t| t.into_scalar())
    }

    #[test]
    fn shard_gradients_are_summed_in_shard_order_whatever_order_they_finish_in() {
        let param = Param::from_tensor(Tensor::<AD, 1>::zeros([1], &Default::default()));
        // non-associative in f32: (1e8 + -1e8) + 1 = 1, but 1e8 + (-1e8 + 1) = 0
        let items = [Some(1e8f32), Some(-1e8), Some(1.0), Some(0.5)];
        let in_order = ((1e8f32 + -1e8) + 1.0) + 0.5;
        for arrival in [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]] {
            assert_eq!(summed(&param, None, &items, &arrival).map(f32::to_bits), Some(in_order.to_bits()), "arrival order {arrival:?}");
        }
        // a shard without this parameter's gradient is passed over once it is done
        assert_eq!(summed(&param, None, &[Some(1e8), None, Some(-1e8), Some(1.0)], &[3, 2, 1, 0]), Some(1.0));
        // micro-batches accumulate: the sum is added onto what the accumulator holds
        assert_eq!(summed(&param, Some(2.0), &[Some(1.0), Some(0.5)], &[1, 0]), Some(3.5));
        assert_eq!(summed(&param, None, &[None, None], &[0, 1]), None);
    }

    #[test]
    #[should_panic(expected = "a shard's gradients never arrived")]
    fn a_missing_shard_is_an_error_not_a_partial_sum() {
        let param = Param::from_tensor(Tensor::<AD, 1>::zeros([1], &Default::default()));
        let device = Default::default();
        let sum = ShardedSum::new(GradientsParams::new(), 2);
        GradientSink::<AD>::give::<1>(&mut ShardSink { sum: &sum, shard: 1 }, param.id, Tensor::from_floats([1.0], &device));
        sum.shard_done::<AD, _>(1, &param);
        sum.finish();
    }

    #[test]
    fn shard_ranges_cover_the_items_in_order_without_empty_ones() {
        assert_eq!(shard_ranges(5, 2), vec![0..2, 2..5]);
        assert_eq!(shard_ranges(2, 4), vec![0..1, 1..2]);
        assert_eq!(shard_ranges(0, 3), vec![0..0]);
    }
}
