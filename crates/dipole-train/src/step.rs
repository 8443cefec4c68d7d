//! One preference-optimisation step on a batch, as data: policy forward -> log-probs -> reference
//! log-probs -> objective -> loss and TRL's metrics. Backward and the optimizer are the caller's.

use std::collections::BTreeMap;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use dipole_data::PreferenceBatch;
use dipole_lora::AdapterMode;
use dipole_loss::{ObjectiveConfig, ObjectiveState, PairInputs, ld_weights, preference_loss, preference_metrics, sequence_logps, token_stats, wpo_weights};
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
}

/// Summed completion log-probs of `model` on a batch, with LD-DPO weights when configured.
fn batch_logps<B: Backend>(
    model: &CausalLm<B>,
    t: &BatchTensors<B>,
    ld: Option<&Tensor<B, 2>>,
) -> (Tensor<B, 3>, Tensor<B, 1>) {
    let logits = model.forward(t.input_ids.clone(), Some(t.attention_mask.clone()));
    let seq = sequence_logps(logits.clone(), t.input_ids.clone(), t.completion_mask.clone());
    let sums = match ld {
        Some(w) => (seq.per_token * w.clone()).sum_dim(1).squeeze_dim::<1>(1),
        None => seq.sum,
    };
    (logits, sums)
}

fn host_pairs<B: Backend>(sums: Tensor<B, 1>, b: usize) -> Vec<(f32, f32)> {
    let v: Vec<f32> = sums.into_data().convert::<f32>().to_vec().expect("f32");
    (0..b).map(|i| (v[i], v[b + i])).collect()
}

/// Runs the objective on one batch. `training` updates stateful objectives.
pub fn preference_step<B: AutodiffBackend>(
    policy: &CausalLm<B>,
    reference: Reference<'_, B>,
    batch: &PreferenceBatch,
    config: &ObjectiveConfig,
    state: &mut ObjectiveState,
    training: bool,
    device: &B::Device,
) -> StepOutput<B> {
    let b = batch.num_pairs();
    let t = BatchTensors::<B>::new(batch, device);
    let ld_host = config.ld_alpha.map(|a| ld_weights(&batch.completion_mask, a));
    let ld_tensor = |rows: &Vec<Vec<f32>>| -> Vec<f32> { rows.iter().flat_map(|r| r[1..].to_vec()).collect() };
    let shape = [2 * b, batch.seq_len - 1];
    let ld_policy = ld_host.as_ref().map(|w| Tensor::<B, 2>::from_data(TensorData::new(ld_tensor(w), shape), device));

    let (logits, sums) = batch_logps(policy, &t, ld_policy.as_ref());
    let stats = token_stats(logits.clone(), t.input_ids.clone(), t.completion_mask.clone());
    let weights = config
        .use_weighting
        .then(|| wpo_weights(logits.clone(), t.input_ids.clone(), t.completion_mask.clone()));

    let inner_device = device.clone();
    let ref_pairs: Option<Vec<(f32, f32)>> = match reference {
        Reference::Precomputed(pairs) => {
            assert_eq!(pairs.len(), b, "precomputed reference log-probs for {} pairs, batch has {b}", pairs.len());
            Some(pairs.to_vec())
        }
        Reference::Model(model) => {
            let ti = BatchTensors::<B::InnerBackend>::new(batch, &inner_device);
            let ld = ld_host.as_ref().map(|w| Tensor::from_data(TensorData::new(ld_tensor(w), shape), &inner_device));
            let (_, s) = batch_logps(model, &ti, ld.as_ref());
            Some(host_pairs(s, b))
        }
        Reference::Policy(mode) => {
            let mut frozen = burn::module::AutodiffModule::valid(policy);
            frozen.set_adapter_mode(mode);
            let ti = BatchTensors::<B::InnerBackend>::new(batch, &inner_device);
            let ld = ld_host.as_ref().map(|w| Tensor::from_data(TensorData::new(ld_tensor(w), shape), &inner_device));
            let (_, s) = batch_logps(&frozen, &ti, ld.as_ref());
            Some(host_pairs(s, b))
        }
        Reference::None => None,
    };
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
    let out = preference_loss(config, &inputs, state, training);
    let metrics = preference_metrics(&out, &inputs, Some(&stats));
    StepOutput {
        loss: out.loss,
        metrics,
        reference_logps: ref_pairs,
    }
}
