//! Held-out evaluation of a run (its objective's loss and TRL's metrics, as `eval_*`) and the
//! generations of policy and reference on eval prompts.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::AutodiffModule;
use burn::tensor::ElementConversion;
use burn::tensor::backend::AutodiffBackend;
use dipole_data::{CompletionInputs, PreferenceBatch, SequenceBatch};
use dipole_lora::AdapterMode;

use crate::examples::Examples;
use crate::metrics::mean_metrics;
use crate::step::{StepOutput, batch_shards, objective_on_batch, reference_logps, sft_on_batch};
use crate::trainer::Trainer;

impl<B: AutodiffBackend> Trainer<'_, B> {
    /// Loss and metrics over the eval examples (no gradients), as `eval_*` keys, batch by batch
    /// in file order.
    pub(crate) fn evaluate(&self) -> BTreeMap<String, f64> {
        let (config, device, pad) = (self.config, &self.device, self.pad);
        let policy = self.policy();
        let inner = policy.valid();
        let mut state = self.state.objective.clone();
        let examples = &self.eval_set;
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
                    let ref_pairs = reference_logps(policy, self.references.for_batch(&indices, true), &batch, self.objective.ld_alpha, shards, device);
                    objective_on_batch(&inner, ref_pairs, &batch, &self.objective, &mut state, false, shards, device)
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
    pub(crate) fn write_generations(&self, path: &Path) -> Result<(), String> {
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
}
