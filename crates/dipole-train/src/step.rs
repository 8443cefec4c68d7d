//! One preference-optimisation step on a batch, as data: policy forward -> log-probs -> reference
//! log-probs -> objective -> loss and TRL's metrics. Backward and the optimizer are the caller's.

use std::collections::BTreeMap;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use dipole_data::{PreferenceBatch, SequenceBatch};
use dipole_lora::AdapterMode;
use dipole_loss::{ObjectiveConfig, ObjectiveState, PairInputs, ld_weights, prediction_window, preference_loss, preference_metrics, sequence_logps_window, token_stats_aligned, wpo_weights_aligned};
use dipole_models::CausalLm;

use crate::logps::BatchTensors;

/// Where the reference log-probs of a batch come from.
pub enum Reference<'a, B: AutodiffBackend> {
    /// Precomputed `(chosen, rejected)` log-probs per pair, in batch order.
    Precomputed(&'a [(f32, f32)]),
    /// A separate frozen model (full fine-tuning), run without autodiff.
    Model(&'a CausalLm<B::InnerBackend>),
    /// The policy itself with adapters switched by `mode` (LoRA: `Disabled` = base, `Reference` =
    /// base + frozen SFT adapter), run without autodiff.
    Policy(AdapterMode),
    /// Reference-free objectives.
    None,
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
    /// `[2B, L, vocab]`
    logits: Tensor<B, 3>,
    /// `[2B]`
    sums: Tensor<B, 1>,
    /// `[2B, L]` labels and completion mask aligned with `logits`.
    labels: Tensor<B, 2, burn::tensor::Int>,
    mask: Tensor<B, 2>,
}

/// Summed completion log-probs of `model` on a batch, with LD-DPO weights when configured. The
/// `lm_head` runs only from the first completion position on.
fn batch_logps<B: Backend>(model: &CausalLm<B>, t: &BatchTensors<B>, start: usize, ld: Option<&Tensor<B, 2>>) -> WindowOutput<B> {
    let hidden = model.forward_hidden(t.input_ids.clone(), Some(t.attention_mask.clone()), None);
    let [rows, len, h] = hidden.dims();
    let logits = model.logits(hidden.slice([0..rows, start..len - 1, 0..h]));
    let seq = sequence_logps_window(logits.clone(), t.input_ids.clone(), t.completion_mask.clone(), start);
    let sums = match ld {
        Some(w) => (seq.per_token * w.clone()).sum_dim(1).squeeze_dim::<1>(1),
        None => seq.sum,
    };
    WindowOutput {
        logits,
        sums,
        labels: t.input_ids.clone().slice([0..rows, start + 1..len]),
        mask: seq.mask,
    }
}

fn host_pairs<B: Backend>(sums: Tensor<B, 1>, b: usize) -> Vec<(f32, f32)> {
    let v: Vec<f32> = sums.into_data().convert::<f32>().to_vec().expect("f32");
    (0..b).map(|i| (v[i], v[b + i])).collect()
}

/// Reference log-probs of a batch under `reference` (no autodiff), `None` for reference-free runs.
pub fn reference_logps<B: AutodiffBackend>(
    policy: &CausalLm<B>,
    reference: Reference<'_, B>,
    batch: &PreferenceBatch,
    ld_alpha: Option<f64>,
    device: &B::Device,
) -> Option<Vec<(f32, f32)>> {
    let b = batch.num_pairs();
    let run = |model: &CausalLm<B::InnerBackend>| {
        let t = BatchTensors::<B::InnerBackend>::new(batch, device);
        let start = prediction_window(&batch.completion_mask);
        let ld = ld_alpha.map(|a| ld_tensor::<B::InnerBackend>(batch, a, start, device));
        host_pairs(batch_logps(model, &t, start, ld.as_ref()).sums, b)
    };
    match reference {
        Reference::Precomputed(pairs) => {
            assert_eq!(pairs.len(), b, "precomputed reference log-probs for {} pairs, batch has {b}", pairs.len());
            Some(pairs.to_vec())
        }
        Reference::Model(model) => Some(run(model)),
        Reference::Policy(mode) => {
            let mut frozen = burn::module::AutodiffModule::valid(policy);
            frozen.set_adapter_mode(mode);
            Some(run(&frozen))
        }
        Reference::None => None,
    }
}

/// LD-DPO weights of a batch as a `[2B, T-1-start]` tensor aligned with the windowed log-probs.
fn ld_tensor<B: Backend>(batch: &PreferenceBatch, alpha: f64, start: usize, device: &B::Device) -> Tensor<B, 2> {
    let w = ld_weights(&batch.completion_mask, alpha);
    let flat: Vec<f32> = w.iter().flat_map(|r| r[start + 1..].to_vec()).collect();
    Tensor::from_data(TensorData::new(flat, [w.len(), batch.seq_len - 1 - start]), device)
}

/// The objective and TRL's metrics for `policy` on one batch, given reference log-probs. Works on
/// any backend: under autodiff the loss carries gradients, elsewhere it is evaluation.
pub fn objective_on_batch<B: Backend>(
    policy: &CausalLm<B>,
    ref_pairs: Option<Vec<(f32, f32)>>,
    batch: &PreferenceBatch,
    config: &ObjectiveConfig,
    state: &mut ObjectiveState,
    training: bool,
    device: &B::Device,
) -> StepOutput<B> {
    let b = batch.num_pairs();
    let t = BatchTensors::<B>::new(batch, device);
    let start = prediction_window(&batch.completion_mask);
    let ld = config.ld_alpha.map(|a| ld_tensor::<B>(batch, a, start, device));
    let out = batch_logps(policy, &t, start, ld.as_ref());
    let sums = out.sums;
    let sums_detached = sums.clone().detach();
    let stats = token_stats_aligned(out.logits.clone(), out.labels.clone(), out.mask.clone());
    let weights = config
        .use_weighting
        .then(|| wpo_weights_aligned(out.logits, out.labels, out.mask));
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
/// `num_tokens`.
pub fn sft_on_batch<B: Backend>(policy: &CausalLm<B>, batch: &SequenceBatch, device: &B::Device) -> StepOutput<B> {
    let t = BatchTensors::<B>::from_rows(&batch.input_ids, &batch.attention_mask, &batch.completion_mask, batch.seq_len, device);
    let start = prediction_window(&batch.completion_mask);
    let out = batch_logps(policy, &t, start, None);
    let tokens = out.mask.clone().sum();
    let loss = out.sums.clone().sum().neg() / tokens.clone().clamp_min(1.0);
    let (logits, mask) = (out.logits.detach(), out.mask);
    let logp = burn::tensor::activation::log_softmax(logits.clone(), 2);
    let entropy = ((logp.clone().exp() * logp).sum_dim(2).squeeze_dim::<2>(2).neg() * mask.clone()).sum();
    let correct = (logits.argmax(2).squeeze_dim::<2>(2).equal(out.labels).float() * mask).sum();
    let n = host_f64(tokens)[0];
    let per_token = |x: Tensor<B, 1>| if n > 0.0 { host_f64(x)[0] / n } else { 0.0 };
    let mut metrics = BTreeMap::new();
    metrics.insert("entropy".to_string(), per_token(entropy));
    metrics.insert("mean_token_accuracy".to_string(), per_token(correct));
    metrics.insert("num_tokens".to_string(), n);
    StepOutput {
        loss,
        metrics,
        reference_logps: None,
        policy_logps: host_f64(out.sums.detach()).into_iter().map(|v| (v as f32, 0.0)).collect(),
    }
}

/// Reference pass, then the objective on the policy: one training micro-step's forward.
pub fn preference_step<B: AutodiffBackend>(
    policy: &CausalLm<B>,
    reference: Reference<'_, B>,
    batch: &PreferenceBatch,
    config: &ObjectiveConfig,
    state: &mut ObjectiveState,
    training: bool,
    device: &B::Device,
) -> StepOutput<B> {
    let ref_pairs = reference_logps(policy, reference, batch, config.ld_alpha, device);
    objective_on_batch(policy, ref_pairs, batch, config, state, training, device)
}
