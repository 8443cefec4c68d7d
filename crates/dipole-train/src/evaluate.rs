//! Held-out evaluation of a run (its objective's loss and TRL's metrics, as `eval_*`) and the
//! generations of policy and reference on eval prompts.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::AutodiffModule;
use burn::tensor::ElementConversion;
use burn::tensor::backend::{AutodiffBackend, Backend};
use dipole_data::generation::Generation;
use dipole_data::{CompletionInputs, PairInputs, PreferenceBatch, SequenceBatch};
use dipole_lora::AdapterMode;
use dipole_loss::{ObjectiveConfig, ObjectiveState};
use dipole_models::CausalLm;

use crate::error::{TrainResult, at};
use crate::examples::Examples;
use crate::metrics::mean_metrics;
use crate::step::{StepContext, StepOutput, batch_shards, objective_on_batch, sft_on_batch, sharded_model_logps};
use crate::trainer::Trainer;

/// The reference of an evaluation: a model run without gradients (a clone shares the original's
/// tensors, so handing one over copies no weights), reference log-probs given per pair (in the
/// pairs' order), or none (reference-free objectives).
pub enum EvalReference<'a, B: Backend> {
    Model(Box<CausalLm<B>>),
    Values(&'a [(f32, f32)]),
    None,
}

/// How an evaluation batches and scores: the objective (and its state, for objectives that keep
/// one), pairs per batch, shards per batch (0: auto, see [`batch_shards`]) and the padding id.
pub struct EvalSettings<'a> {
    pub objective: &'a ObjectiveConfig,
    pub state: ObjectiveState,
    pub batch_size: usize,
    pub shards: usize,
    pub pad: u32,
}

/// Loss and TRL's metrics of `policy` over preference `pairs` (with KTO's `labels`), in batches of
/// `batch_size` in order, without gradients: each metric the mean over batches, as TRL's evaluation
/// loop logs it. The trainer's evaluation and `cargo xtask eval` are this function, so they agree.
pub fn evaluate_pairs<B: Backend>(
    policy: &CausalLm<B>,
    reference: EvalReference<'_, B>,
    pairs: &[PairInputs],
    labels: Option<&[bool]>,
    settings: EvalSettings<'_>,
    device: &B::Device,
) -> BTreeMap<String, f64> {
    let (mut all, mut losses) = (Vec::new(), Vec::new());
    evaluate_batches(policy, reference, pairs, labels, settings, device, |_, out| {
        losses.push(out.loss.into_scalar().elem::<f64>());
        all.push(out.metrics);
    });
    let mut out = mean_metrics(&all);
    out.insert("loss".into(), losses.iter().sum::<f64>() / losses.len().max(1) as f64);
    out
}

/// The batches of [`evaluate_pairs`], one by one: `visit` gets each batch (in order, `batch_size`
/// pairs) and its [`StepOutput`] (loss, TRL's metrics, the policy's and the reference's log-probs
/// per pair). The reference's log-probs come from [`sharded_model_logps`] (LD-DPO weighted under
/// `objective.ld_alpha`) and the objective from [`objective_on_batch`], as in training, so
/// `cargo xtask score`'s per-batch numbers are those the evaluation averages.
pub fn evaluate_batches<B: Backend>(
    policy: &CausalLm<B>,
    reference: EvalReference<'_, B>,
    pairs: &[PairInputs],
    labels: Option<&[bool]>,
    settings: EvalSettings<'_>,
    device: &B::Device,
    mut visit: impl FnMut(&PreferenceBatch, StepOutput<B>),
) {
    let EvalSettings { objective, mut state, batch_size, shards, pad } = settings;
    for start in (0..pairs.len()).step_by(batch_size.max(1)) {
        let range = start..(start + batch_size.max(1)).min(pairs.len());
        let mut batch = PreferenceBatch::new(&pairs[range.clone()], pad);
        batch.labels = labels.map(|l| l[range.clone()].to_vec());
        let shards = batch_shards::<B>(shards, batch.num_pairs(), device);
        let ref_pairs = match &reference {
            EvalReference::Model(model) => Some(sharded_model_logps(model, &batch, objective.ld_alpha, shards, device)),
            EvalReference::Values(values) => Some(values[range].to_vec()),
            EvalReference::None => None,
        };
        let out = objective_on_batch(policy, ref_pairs, &batch, StepContext { objective, state: &mut state, shards }, device);
        visit(&batch, out);
    }
}

impl<B: AutodiffBackend> Trainer<'_, B> {
    /// Loss and metrics over the eval examples (no gradients), as `eval_*` keys, batch by batch
    /// in file order.
    pub(crate) fn evaluate(&self) -> BTreeMap<String, f64> {
        let (config, device, pad) = (self.config, &self.device, self.pad);
        let inner = self.policy().valid();
        let metrics = match &self.eval_set {
            Examples::Pairs(pairs, labels) => {
                let settings = EvalSettings {
                    objective: &self.objective,
                    state: self.state.objective.clone(),
                    batch_size: config.train.batch_size,
                    shards: config.train.batch_shards,
                    pad,
                };
                evaluate_pairs(&inner, self.references.for_eval(&inner), pairs, labels.as_deref(), settings, device)
            }
            Examples::Sequences(seqs) => {
                let (mut all, mut losses) = (Vec::new(), Vec::new());
                for chunk in seqs.chunks(config.train.batch_size) {
                    let rows: Vec<&CompletionInputs> = chunk.iter().collect();
                    let shards = batch_shards::<B>(config.train.batch_shards, rows.len(), device);
                    let out = sft_on_batch(&inner, &SequenceBatch::new(&rows, pad), shards, device);
                    losses.push(out.loss.into_scalar().elem::<f64>());
                    all.push(out.metrics);
                }
                let mut out = mean_metrics(&all);
                out.insert("loss".into(), losses.iter().sum::<f64>() / losses.len().max(1) as f64);
                out
            }
        };
        metrics.into_iter().map(|(k, v)| (format!("eval_{k}"), v)).collect()
    }

    /// Continuations of the first `train.generations` eval prompts by the policy and the reference
    /// (greedy, or sampled with `train.generation_temperature`), one JSON line per prompt.
    pub(crate) fn write_generations(&self, path: &Path) -> TrainResult<()> {
        let (config, tokenizer, examples) = (self.config, &self.tokenizer, &self.eval_set);
        let policy = self.policy().valid();
        let reference = match self.references.frozen() {
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
            let text = |ids: &[u32]| tokenizer.decode(ids, true);
            let line = Generation {
                index,
                prompt: text(&prompt)?,
                policy: text(&policy.generate(&prompt, &options))?,
                reference: text(&reference.generate(&prompt, &options))?,
            };
            lines.push_str(&serde_json::to_string(&line).map_err(at(path))?);
            lines.push('\n');
        }
        std::fs::write(path, lines).map_err(at(path))
    }
}
