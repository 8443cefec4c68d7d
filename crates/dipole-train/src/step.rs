//! One preference-optimisation step on a batch, as data: policy forward -> log-probs -> reference
//! log-probs -> objective -> loss and TRL's metrics. Backward and the optimizer are the caller's.

use std::collections::BTreeMap;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use dipole_data::PreferenceBatch;
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
    let metrics = preference_metrics(&out, &inputs, Some(&stats));
    StepOutput {
        loss: out.loss,
        metrics,
        reference_logps: ref_pairs,
        policy_logps,
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
