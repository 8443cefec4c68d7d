//! Gradients of the sigmoid DPO loss against PyTorch/TRL (`grad.json`), finite-difference checks of
//! every objective, and the step-0 identities.

mod common;

use common::fixtures;
use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use burn::tensor::{Tensor, TensorData};
use dipole_data::{LengthOptions, PreferenceBatch, Tokenizer, TruncationMode, load_pairs};
use dipole_loss::{CpoVariant, LossType, ObjectiveConfig, ObjectiveState, PairInputs, kto_loss, preference_loss};
use dipole_models::CausalLm;
use dipole_train::{Reference, StepContext, preference_step};
use serde_json::Value;

type AD = Autodiff<Flex>;

fn batch0() -> PreferenceBatch {
    let tokenizer = Tokenizer::from_dir(fixtures().join("tiny-llama")).unwrap();
    let lengths = LengthOptions { max_length: Some(128), truncation: TruncationMode::KeepStart, ..Default::default() };
    let prepared = load_pairs(&fixtures().join("data/prefs_standard.jsonl"), &tokenizer, lengths).unwrap();
    PreferenceBatch::new(&prepared.pairs[..4], tokenizer.pad_id())
}

/// TRL's loss and per-parameter gradient norms; `prefix_sharing` on runs each pair's prompt once
/// (this batch's prompts are long enough for it to apply), off runs every row whole.
fn check_grads(policy_dir: &str, case: &str, shards: usize, prefix_sharing: bool) {
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("goldens/tiny-llama/standard/grad.json")).unwrap()).unwrap();
    let golden = &golden[case];
    let device = Default::default();
    let (mut policy, _) = CausalLm::<AD>::load(fixtures().join(policy_dir), &device).unwrap();
    let (mut reference, _) = CausalLm::<Flex>::load(fixtures().join("tiny-llama"), &device).unwrap();
    policy.prefix_sharing = prefix_sharing;
    reference.prefix_sharing = prefix_sharing;
    let batch = batch0();
    assert_eq!(policy.prefix_plan(&batch.input_ids, &batch.lengths()).is_some(), prefix_sharing, "prefix sharing applies to this batch");
    let mut state = ObjectiveState::default();
    let out = preference_step(&policy, Reference::Model(reference.clone()), &batch, StepContext { objective: &ObjectiveConfig::default(), state: &mut state, shards }, &device);
    let loss = out.loss;
    let want_loss = golden["loss"].as_f64().unwrap();
    assert!((loss - want_loss).abs() < 1e-5, "loss {loss} vs {want_loss}");
    let grads = out.backward(1.0);
    let mut total = 0.0f64;
    for (name, id, rank) in policy.named_params() {
        let sq: f64 = match rank {
            1 => grads.get::<Flex, 1>(id).map(|g| g.powi_scalar(2).sum().into_scalar() as f64),
            _ => grads.get::<Flex, 2>(id).map(|g| g.powi_scalar(2).sum().into_scalar() as f64),
        }
        .unwrap_or_else(|| panic!("no gradient for {name}"));
        total += sq;
        let want = golden["per_param_grad_norm"][&name].as_f64().unwrap_or_else(|| panic!("golden has no {name}"));
        let got = sq.sqrt();
        assert!((got - want).abs() <= 1e-4 * want.abs() + 1e-7, "{case} {name}: grad norm {got} vs {want}");
    }
    let want = golden["grad_norm"].as_f64().unwrap();
    assert!((total.sqrt() - want).abs() <= 1e-4 * want, "{case}: total grad norm {} vs {want}", total.sqrt());
}

#[test]
fn sigmoid_gradients_match_torch_for_the_perturbed_policy() {
    check_grads("tiny-llama-perturbed", "perturbed_policy", 1, true);
}

/// Every row run whole, as TRL does, gives the same gradients as prefix sharing.
#[test]
fn whole_row_gradients_match_torch() {
    check_grads("tiny-llama-perturbed", "perturbed_policy", 1, false);
}

/// A batch split over threads (4 pairs: shards of 1, 1 and 2) still gives TRL's gradients.
#[test]
fn sharded_step_gradients_match_torch() {
    check_grads("tiny-llama-perturbed", "perturbed_policy", 3, true);
}

#[test]
fn sigmoid_gradients_match_torch_when_policy_equals_reference() {
    check_grads("tiny-llama", "policy_equals_ref", 1, true);
}

#[test]
fn step_zero_identities() {
    let device = Default::default();
    let (policy, _) = CausalLm::<AD>::load(fixtures().join("tiny-llama"), &device).unwrap();
    let (reference, _) = CausalLm::<Flex>::load(fixtures().join("tiny-llama"), &device).unwrap();
    let mut state = ObjectiveState::default();
    let out = preference_step(&policy, Reference::Model(reference.clone()), &batch0(), StepContext { objective: &ObjectiveConfig::default(), state: &mut state, shards: 2 }, &device);
    let loss = out.loss;
    assert!((loss - std::f64::consts::LN_2).abs() < 1e-6, "{loss}");
    for key in ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"] {
        assert_eq!(out.metrics[key], 0.0, "{key}");
    }
}

/// Every objective's gradient w.r.t. the policy log-probs agrees with central differences on random
/// log-probs (f32, so steps of 1e-2 and a 1e-3 relative tolerance).
#[test]
fn finite_difference_gradients_of_every_objective() {
    type F = Autodiff<Flex>;
    let device = Default::default();
    let mut seed = 12345u64;
    let mut rnd = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    };
    let b = 5;
    let pc: Vec<f64> = (0..b).map(|_| -20.0 + 5.0 * rnd()).collect();
    let pr: Vec<f64> = (0..b).map(|_| -22.0 + 5.0 * rnd()).collect();
    let rc: Vec<f64> = pc.iter().map(|x| x + 3.0 * rnd()).collect();
    let rr: Vec<f64> = pr.iter().map(|x| x + 3.0 * rnd()).collect();
    let lens: Vec<f64> = (0..b).map(|i| 5.0 + i as f64).collect();
    let t = |v: &[f64]| Tensor::<F, 1>::from_data(TensorData::new(v.iter().map(|&x| x as f32).collect::<Vec<_>>(), [v.len()]), &device);
    let cpo_variants = [CpoVariant::Hinge, CpoVariant::Ipo, CpoVariant::Simpo, CpoVariant::Alphapo].map(|v| (LossType::Cpo, v));
    let kinds = LossType::ALL.iter().filter(|k| !k.unpaired()).map(|&k| (k, CpoVariant::Sigmoid)).chain(cpo_variants);
    for (kind, cpo_loss_type) in kinds {
        let alphapo_alpha = if cpo_loss_type == CpoVariant::Alphapo { 0.05 } else { 0.0 };
        let config = ObjectiveConfig { loss_type: vec![kind], label_smoothing: 0.1, cpo_loss_type, alphapo_alpha, ..Default::default() };
        let loss_at = |pc: &[f64], pr: &[f64], track: bool| {
            let chosen = if track { t(pc).require_grad() } else { t(pc) };
            let inputs = PairInputs {
                chosen_logps: chosen.clone(),
                rejected_logps: t(pr),
                ref_chosen_logps: Some(t(&rc)),
                ref_rejected_logps: Some(t(&rr)),
                chosen_lengths: t(&lens),
                rejected_lengths: t(&lens),
                weights: None,
            };
            let out = preference_loss(&config, &inputs, &mut ObjectiveState::default(), false);
            (out.loss, chosen)
        };
        let (loss, chosen) = loss_at(&pc, &pr, true);
        let grads = loss.backward();
        let analytic: Vec<f32> = chosen.grad(&grads).unwrap().into_data().to_vec().unwrap();
        for i in 0..b {
            let h = 1e-2;
            let (mut up, mut down) = (pc.clone(), pc.clone());
            up[i] += h;
            down[i] -= h;
            let f = |v: &[f64]| -> f64 { loss_at(v, &pr, false).0.into_scalar() as f64 };
            let numeric = (f(&up) - f(&down)) / (2.0 * h);
            assert!(
                (numeric - analytic[i] as f64).abs() <= 1e-4 + 1e-3 * numeric.abs(),
                "{}: d loss / d chosen[{i}] analytic {} vs numeric {numeric}",
                kind.name(),
                analytic[i]
            );
        }
    }
}

#[test]
fn kto_gradient_matches_finite_differences() {
    type F = Autodiff<Flex>;
    let device = Default::default();
    let logps = [-12.0f64, -9.5, -20.0, -7.25];
    let refs = [-11.0f32, -10.0, -18.0, -7.0];
    let desirable = [true, false, true, false];
    let config = ObjectiveConfig { loss_type: vec![LossType::Kto], beta: 0.3, desirable_weight: 1.0, undesirable_weight: 1.5, ..Default::default() };
    let t = |v: &[f64]| Tensor::<F, 1>::from_data(TensorData::new(v.iter().map(|&x| x as f32).collect::<Vec<_>>(), [v.len()]), &device);
    let r = Tensor::<F, 1>::from_data(TensorData::new(refs.to_vec(), [4]), &device);
    let x = t(&logps).require_grad();
    let loss = kto_loss(&config, x.clone(), r.clone(), &desirable, 0.7).loss;
    let analytic: Vec<f32> = x.grad(&loss.backward()).unwrap().into_data().to_vec().unwrap();
    for i in 0..4 {
        let h = 1e-2;
        let (mut up, mut down) = (logps, logps);
        up[i] += h;
        down[i] -= h;
        let f = |v: &[f64]| kto_loss(&config, t(v), r.clone(), &desirable, 0.7).loss.into_scalar() as f64;
        let numeric = (f(&up) - f(&down)) / (2.0 * h);
        assert!((numeric - analytic[i] as f64).abs() <= 1e-5 + 1e-3 * numeric.abs(), "row {i}: {} vs {numeric}", analytic[i]);
    }
}

#[test]
fn kto_pair_matches_hand_computed_values() {
    let device = Default::default();
    let t = |v: Vec<f32>| Tensor::<Flex, 1>::from_data(TensorData::new(v, [2]), &device);
    // chosen log-ratios [1, -1] (mean 0 -> KL 0), rejected [0.5, -2.5] (mean -1 -> KL 0)
    let losses: Vec<f32> = dipole_loss::objectives::kto_pair(t(vec![1.0, -1.0]), t(vec![0.5, -2.5]), 0.5).into_data().to_vec().unwrap();
    let s = |x: f32| 1.0 / (1.0 + (-x).exp());
    let want = [1.0 - s(0.5), 1.0 - s(-0.5), 1.0 - s(-0.25), 1.0 - s(1.25)];
    for (g, w) in losses.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{losses:?} vs {want:?}");
    }
    // a positive mean is the clamp's other branch: chosen mean 2 -> rejected side compares to 2
    let losses: Vec<f32> = dipole_loss::objectives::kto_pair(t(vec![3.0, 1.0]), t(vec![1.0, 0.0]), 1.0).into_data().to_vec().unwrap();
    let want = [1.0 - s(3.0 - 0.5), 1.0 - s(1.0 - 0.5), 1.0 - s(2.0 - 1.0), 1.0 - s(2.0 - 0.0)];
    for (g, w) in losses.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{losses:?} vs {want:?}");
    }
}

/// The reference pass makes its vocabulary-sized logits a few rows at a time (and on its own
/// thread); it must still equal the policy's one-piece pass bit for bit, or step 0 of DPO would not
/// have rewards exactly 0. The vocabulary here is large enough that the pass is cut into 4 chunks.
#[test]
fn chunked_reference_pass_equals_the_policy_pass_exactly() {
    use dipole_data::{PairInputs as Pair, Sequence};
    let device = Default::default();
    let config = dipole_models::ModelConfig::llama(dipole_models::LlamaShape { vocab_size: 8192, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 512 }).unwrap();
    let policy = CausalLm::<AD>::init(config, 7, &device);
    let mut seed = 99u64;
    let mut token = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        3 + (seed >> 33) as u32 % 8000
    };
    let pairs: Vec<Pair> = (0..4)
        .map(|index| {
            let prompt: Vec<u32> = (0..20).map(|_| token()).collect();
            let mut side = || {
                let mut ids = prompt.clone();
                ids.extend((0..200).map(|_| token()));
                Sequence { completion_mask: (0..ids.len()).map(|i| (i >= 20) as u8).collect(), input_ids: ids }
            };
            Pair { index, chosen: side(), rejected: side() }
        })
        .collect();
    let batch = PreferenceBatch::new(&pairs, 0);
    let mut state = ObjectiveState::default();
    let out = preference_step(&policy, Reference::Policy(dipole_lora::AdapterMode::Active), &batch, StepContext { objective: &ObjectiveConfig::default(), state: &mut state, shards: 1 }, &device);
    assert_eq!(out.reference_logps.as_ref(), Some(&out.policy_logps), "reference and policy log-probs differ");
    for key in ["rewards/chosen", "rewards/rejected", "rewards/accuracies"] {
        assert_eq!(out.metrics[key], 0.0, "{key}");
    }
}

/// A step's loss, metrics and gradients by parameter name.
struct StepResult {
    loss: f64,
    metrics: std::collections::BTreeMap<String, f64>,
    grads: Vec<(String, Vec<f32>)>,
}

fn step_result(policy: &CausalLm<AD>, reference: &CausalLm<Flex>, batch: &PreferenceBatch, config: &ObjectiveConfig, shards: usize) -> StepResult {
    let device = Default::default();
    let mut state = ObjectiveState::default();
    let out = preference_step(policy, Reference::Model(reference.clone()), batch, StepContext { objective: config, state: &mut state, shards }, &device);
    let (loss, metrics) = (out.loss, out.metrics.clone());
    let grads = out.backward(1.0);
    let grads = policy
        .named_params()
        .into_iter()
        .filter_map(|(name, id, rank)| {
            let values = match rank {
                1 => grads.get::<Flex, 1>(id).map(|t| t.into_data().to_vec().unwrap()),
                _ => grads.get::<Flex, 2>(id).map(|t| t.into_data().to_vec().unwrap()),
            };
            values.map(|v| (name, v))
        })
        .collect();
    StepResult { loss, metrics, grads }
}

/// The same step computed another way: loss and metrics within f32 rounding of their sums,
/// gradients within 1e-4 of the largest one of each parameter.
fn assert_same_step(got: &StepResult, want: &StepResult, what: &str) {
    assert!((got.loss - want.loss).abs() <= 1e-6 * want.loss.abs().max(1.0), "{what}: loss {} vs {}", got.loss, want.loss);
    assert_eq!(got.metrics.keys().collect::<Vec<_>>(), want.metrics.keys().collect::<Vec<_>>(), "{what}: metric names");
    for (key, w) in &want.metrics {
        let g = got.metrics[key];
        assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{what}: {key} {g} vs {w}");
    }
    assert_eq!(got.grads.iter().map(|g| &g.0).collect::<Vec<_>>(), want.grads.iter().map(|g| &g.0).collect::<Vec<_>>(), "{what}: parameters with gradients");
    for ((name, g), (_, w)) in got.grads.iter().zip(&want.grads) {
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
        let worst = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= 1e-4 * scale, "{what}: {name} differs by {worst} (largest gradient {scale})");
    }
}

/// Shards change where the work runs, not the step: a LoRA policy with a coupled objective (WPO
/// weights, LD-DPO, batch-level metrics) and KTO's batch-mean KL give the unsharded step's loss,
/// metrics and gradients.
#[test]
fn sharded_steps_equal_the_whole_batch_step() {
    let device = Default::default();
    let (mut policy, _) = CausalLm::<AD>::load(fixtures().join("tiny-llama-perturbed"), &device).unwrap();
    policy.add_lora(&dipole_lora::LoraConfig { r: 4, ..Default::default() }, 7).unwrap();
    let (reference, _) = CausalLm::<Flex>::load(fixtures().join("tiny-llama"), &device).unwrap();
    let mut kto_batch = batch0();
    kto_batch.labels = Some(vec![true, false, false, true]);
    let cases = [
        (ObjectiveConfig { use_weighting: true, ld_alpha: Some(0.5), ..Default::default() }, batch0()),
        (ObjectiveConfig { loss_type: vec![LossType::Kto], ..Default::default() }, kto_batch),
    ];
    for (config, batch) in cases {
        let whole = step_result(&policy, &reference, &batch, &config, 1);
        assert!(!whole.grads.is_empty() && whole.grads.iter().all(|(name, _)| name.contains("lora")), "only the adapters train");
        for shards in [2, 4] {
            assert_same_step(&step_result(&policy, &reference, &batch, &config, shards), &whole, &format!("{shards} shards"));
        }
    }
}

/// The fused LM head (tiles of logits, forward and backward) against the whole logits, in full
/// fine-tuning so the head's weight trains too: tied (Qwen2, the embeddings) and untied (Llama),
/// with WPO's weights and LD-DPO's, which read the head's `log Σ p²` and per-token log-probs.
#[test]
fn fused_head_steps_equal_whole_logits_steps() {
    let device = Default::default();
    let config = ObjectiveConfig { use_weighting: true, ld_alpha: Some(0.5), ..Default::default() };
    for (policy_dir, reference_dir) in [("tiny-qwen2-perturbed", "tiny-qwen2"), ("tiny-llama-perturbed", "tiny-llama")] {
        let (mut policy, _) = CausalLm::<AD>::load(fixtures().join(policy_dir), &device).unwrap();
        let (mut reference, _) = CausalLm::<Flex>::load(fixtures().join(reference_dir), &device).unwrap();
        assert!(policy.fuses_head(), "{policy_dir}: the head is fused by default");
        let fused = step_result(&policy, &reference, &batch0(), &config, 1);
        assert!(fused.grads.iter().any(|(name, _)| name == "model.embed_tokens.weight"), "{policy_dir}: the embeddings train");
        policy.fused_head = false;
        reference.fused_head = false;
        assert!(!policy.fuses_head());
        assert_same_step(&fused, &step_result(&policy, &reference, &batch0(), &config, 1), &format!("{policy_dir}: fused head"));
    }
}

/// Per-layer recompute (`layer_recompute`, `train.gradient_checkpointing = true`): the step's loss,
/// metrics and gradients equal the whole graph's, in full fine-tuning (tied and untied heads, whole
/// and sharded steps, prefix sharing on and off) and with LoRA.
#[test]
fn layer_recompute_steps_equal_whole_graph_steps() {
    let device = Default::default();
    let config = ObjectiveConfig { use_weighting: true, ld_alpha: Some(0.5), ..Default::default() };
    for (policy_dir, reference_dir) in [("tiny-qwen2-perturbed", "tiny-qwen2"), ("tiny-llama-perturbed", "tiny-llama")] {
        let (mut policy, _) = CausalLm::<AD>::load(fixtures().join(policy_dir), &device).unwrap();
        let (reference, _) = CausalLm::<Flex>::load(fixtures().join(reference_dir), &device).unwrap();
        for (shards, prefix_sharing) in [(1, true), (2, true), (1, false)] {
            policy.prefix_sharing = prefix_sharing;
            policy.layer_recompute = false;
            let want = step_result(&policy, &reference, &batch0(), &config, shards);
            policy.layer_recompute = true;
            let got = step_result(&policy, &reference, &batch0(), &config, shards);
            assert_eq!(got.grads.len(), policy.named_params().len(), "{policy_dir}: every parameter has a gradient");
            assert_same_step(&got, &want, &format!("{policy_dir}, {shards} shards, prefix sharing {prefix_sharing}: layer recompute"));
        }
    }
    let (mut policy, _) = CausalLm::<AD>::load(fixtures().join("tiny-llama-perturbed"), &device).unwrap();
    policy.add_lora(&dipole_lora::LoraConfig { r: 4, ..Default::default() }, 7).unwrap();
    policy.freeze_base();
    let (reference, _) = CausalLm::<Flex>::load(fixtures().join("tiny-llama"), &device).unwrap();
    let want = step_result(&policy, &reference, &batch0(), &config, 1);
    policy.layer_recompute = true;
    assert_same_step(&step_result(&policy, &reference, &batch0(), &config, 1), &want, "LoRA: layer recompute");
}

/// SFT rows split over threads, or run under per-layer recompute: the same loss over the whole
/// batch's tokens, the same metrics and gradients as one pass.
#[test]
fn sharded_sft_step_equals_the_whole_batch_step() {
    let device = Default::default();
    let (policy, _) = CausalLm::<AD>::load(fixtures().join("tiny-llama-perturbed"), &device).unwrap();
    let pairs = batch0();
    let b = pairs.num_pairs();
    // the pairs' rows as SFT rows of uneven lengths
    let examples: Vec<dipole_data::CompletionInputs> = (0..2 * b)
        .map(|row| {
            let len = pairs.attention_mask[row].iter().filter(|&&m| m == 1).count();
            dipole_data::CompletionInputs {
                index: row,
                sequence: dipole_data::Sequence { input_ids: pairs.input_ids[row][..len].to_vec(), completion_mask: pairs.completion_mask[row][..len].to_vec() },
                label: None,
                source: (PathBuf::from("rows"), dipole_data::Location::Line(row + 1)),
            }
        })
        .collect();
    let batch = dipole_data::SequenceBatch::new(&examples.iter().collect::<Vec<_>>(), 0);
    let run = |policy: &CausalLm<AD>, shards: usize| {
        let out = dipole_train::sft_step(policy, &batch, shards, &device);
        let (loss, metrics) = (out.loss, out.metrics.clone());
        let grads = out.backward(1.0);
        let norms: Vec<f64> = policy
            .named_params()
            .into_iter()
            .map(|(_, id, rank)| match rank {
                1 => grads.get::<Flex, 1>(id).map_or(0.0, |g| g.powi_scalar(2).sum().into_scalar() as f64),
                _ => grads.get::<Flex, 2>(id).map_or(0.0, |g| g.powi_scalar(2).sum().into_scalar() as f64),
            })
            .collect();
        (loss, metrics, norms)
    };
    let (loss, metrics, norms) = run(&policy, 1);
    assert!(norms.iter().all(|&n| n > 0.0), "every parameter has a gradient");
    let mut checkpointed = policy.clone();
    checkpointed.layer_recompute = true;
    for (what, model, shards) in [("3 shards", &policy, 3), ("layer recompute", &checkpointed, 1), ("layer recompute, 3 shards", &checkpointed, 3)] {
        let (sharded_loss, sharded_metrics, sharded_norms) = run(model, shards);
        assert!((sharded_loss - loss).abs() <= 1e-6 * loss.abs(), "{what}: loss {sharded_loss} vs {loss}");
        for (key, want) in &metrics {
            assert!((sharded_metrics[key] - want).abs() <= 1e-6 * want.abs().max(1.0), "{what}: {key}: {} vs {want}", sharded_metrics[key]);
        }
        for (got, want) in sharded_norms.iter().zip(&norms) {
            assert!((got - want).abs() <= 1e-4 * want, "{what}: gradient norm² {got} vs {want}");
        }
    }
}

/// Evaluation (no autodiff) splits batches over threads too: reference log-probs, loss and
/// metrics equal the one-piece pass's.
#[test]
fn sharded_evaluation_equals_the_whole_batch() {
    let device = Default::default();
    let (policy, _) = CausalLm::<AD>::load(fixtures().join("tiny-llama-perturbed"), &device).unwrap();
    let (reference, _) = CausalLm::<Flex>::load(fixtures().join("tiny-llama"), &device).unwrap();
    let inner = burn::module::AutodiffModule::valid(&policy);
    let batch = batch0();
    let config = ObjectiveConfig { use_weighting: true, ..Default::default() };
    let run = |shards: usize| {
        let refs = dipole_train::reference_logps(&policy, Reference::Model(reference.clone()), &batch, None, shards, &device).unwrap();
        let out = dipole_train::objective_on_batch(&inner, Some(refs.clone()), &batch, StepContext { objective: &config, state: &mut ObjectiveState::default(), shards }, &device);
        (refs, out.loss.into_scalar() as f64, out.metrics)
    };
    let (refs, loss, metrics) = run(1);
    let (sharded_refs, sharded_loss, sharded_metrics) = run(3);
    for ((c, r), (sc, sr)) in refs.iter().zip(&sharded_refs) {
        assert!((c - sc).abs() < 1e-4 && (r - sr).abs() < 1e-4, "reference ({c}, {r}) vs ({sc}, {sr})");
    }
    assert!((sharded_loss - loss).abs() <= 1e-6 * loss.abs().max(1.0), "loss {sharded_loss} vs {loss}");
    assert_eq!(sharded_metrics.len(), metrics.len());
    for (key, want) in &metrics {
        assert!((sharded_metrics[key] - want).abs() <= 1e-5 * want.abs().max(1.0), "{key}: {} vs {want}", sharded_metrics[key]);
    }
}
