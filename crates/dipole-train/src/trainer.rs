//! The training loop: SFT or any preference objective, LoRA or full fine-tuning, on any autodiff
//! backend. [`train`] reads top to bottom: set up, then step, log, evaluate and save until done,
//! then finish; each is a method of [`Trainer`] (docs/design.md draws one step's data flow).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{GradientsParams, Optimizer};
use crate::optim::FusedAdamW;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use dipole_data::{CompletionInputs, PairInputs, PreferenceBatch, SequenceBatch, Tokenizer};
use dipole_loss::{ObjectiveConfig, ObjectiveState};
use dipole_models::{CausalLm, MixedPrecision};
use serde::{Deserialize, Serialize};

use crate::error::{TrainError, TrainResult, at};
use crate::checkpoint::{RunLock, check_resume_config, checkpoint_dirs, is_sealed, save_checkpoint, save_final, verify, weights_dir};
use crate::config::TrainConfig;
use crate::examples::{Examples, mask_tokens};
use crate::manifest::{ManifestInputs, RunManifest};
use crate::grads::{clip_global_norm, scale};
use crate::metrics::{Window, open_metrics};
use crate::reference::{References, build_policy, resolve_reference, stage_objective};
use crate::sampler::DataOrder;
use crate::scaler::LossScaler;
use crate::schedule::Schedule;
use crate::step::{StepContext, batch_shards, preference_step, sft_step};

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
    /// The best evaluation so far under `train.metric_for_best_model` (`train.save_best`).
    #[serde(default)]
    pub best: Option<BestEval>,
}

/// An evaluation kept by `train.save_best`, as `best/best.json` records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BestEval {
    pub step: usize,
    pub metric: String,
    pub value: f64,
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
    /// The evaluation whose weights `train.save_best` kept in `<output_dir>/best`.
    pub best: Option<BestEval>,
}

/// Runs the configured training. Prints a progress bar (when enabled) and writes
/// `metrics.jsonl`, checkpoints and the final adapter or model under `train.output_dir`.
pub fn train<B: AutodiffBackend>(config: &TrainConfig, options: &RunOptions, device: &B::Device) -> TrainResult<TrainSummary> {
    let mut trainer = Trainer::<B>::new(config, options, device)?;
    if config.train.eval_on_start && trainer.state.step == 0 && !trainer.eval_set.is_empty() {
        let eval = trainer.log_eval()?;
        trainer.summary.initial_eval = Some(eval);
    }
    while trainer.state.step < trainer.total_steps && options.stop_after.is_none_or(|n| trainer.steps_this_run < n) {
        // a skipped step (not finite, with `train.skip_nonfinite`) logs and saves nothing
        let Some(step) = trainer.step()? else { continue };
        trainer.log_step(&step)?;
        if trainer.due(config.train.eval_steps) && !trainer.eval_set.is_empty() {
            trainer.log_eval()?;
        }
        if trainer.due(config.train.save_steps) {
            trainer.save_checkpoint()?;
        }
    }
    trainer.finish()
}

/// What one optimizer step did, for its log line.
pub(crate) struct StepReport {
    /// Global gradient norm before clipping.
    grad_norm: f64,
    lr: f64,
}

/// A run in progress: its data, models, optimizer and state, and where it writes.
pub(crate) struct Trainer<'a, B: AutodiffBackend> {
    pub(crate) config: &'a TrainConfig,
    pub(crate) device: B::Device,
    pub(crate) objective: ObjectiveConfig,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) pad: u32,
    train_set: Examples,
    pub(crate) eval_set: Examples,
    order: DataOrder,
    schedule: Schedule,
    total_steps: usize,
    /// `None` only inside `step`, while the optimizer holds it (it takes the model by value, so
    /// the update can reuse the weights' memory).
    policy: Option<CausalLm<B>>,
    optimizer: OptimizerAdaptor<FusedAdamW, CausalLm<B>, B>,
    recorder: NamedMpkFileRecorder<FullPrecisionSettings>,
    pub(crate) references: References<B>,
    pub(crate) state: TrainerState,
    metrics: std::fs::File,
    window: Window,
    progress: Option<indicatif::ProgressBar>,
    summary: TrainSummary,
    steps_this_run: usize,
    final_dir: PathBuf,
    _lock: RunLock,
}

impl<'a, B: AutodiffBackend> Trainer<'a, B> {
    /// Checks the config, takes the output folder, reads the data, and builds (or resumes) the
    /// policy, its reference and the optimizer.
    fn new(config: &'a TrainConfig, options: &RunOptions, device: &B::Device) -> TrainResult<Self> {
        config.validate()?;
        let objective = stage_objective(config);
        let strategy = resolve_reference(config)?;
        let out_dir = config.train.output_dir.clone();
        std::fs::create_dir_all(&out_dir).map_err(at(&out_dir))?;
        let lock = RunLock::acquire(&out_dir)?;
        let tokenizer = Tokenizer::from_dir(&config.model.path)?;
        let (train_set, eval_set) = crate::examples::load(config, &objective, &tokenizer)?;
        let pad = tokenizer.pad_id();

        let (resume_dir, mut state) = resume(config, options, &train_set)?;
        write_manifest::<B>(config, resume_dir.as_deref(), (&train_set, &eval_set), device)?;
        let order = data_order(config, &train_set);
        let steps_per_epoch = (order.batches_per_epoch() / config.train.gradient_accumulation_steps).max(1);
        let total_steps = config.train.max_steps.unwrap_or_else(|| (config.train.num_train_epochs * steps_per_epoch as f64).ceil() as usize);
        let final_dir = config.train.final_dir.clone().unwrap_or_else(|| out_dir.join("final"));
        if let Some(dir) = &resume_dir {
            refuse_finished(dir, state.step, total_steps, &weights_dir(config, &final_dir))?;
        }
        config.train.mixed_precision.check_backend::<B>(device).map_err(TrainError::key("train.mixed_precision"))?;
        // fp16 scales the loss; a run resumed in another precision drops the scaler
        state.loss_scaler = (config.train.mixed_precision == MixedPrecision::Fp16).then(|| state.loss_scaler.take().unwrap_or_default());

        let policy = build_policy::<B>(config, resume_dir.as_deref(), device)?;
        check_memory::<B>(config, &policy, (&train_set, &eval_set), device)?;
        let references = References::new(config, strategy, resume_dir.as_deref(), (&train_set, &eval_set), pad, device)?;
        let schedule = Schedule {
            kind: config.optim.lr_scheduler_type,
            peak_lr: config.optim.learning_rate,
            warmup_steps: Schedule::warmup_from(config.optim.warmup_steps, config.optim.warmup_ratio, total_steps),
            total_steps,
        };
        let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
        let optimizer = adamw::<B>(config, resume_dir.as_deref(), &recorder, device)?;
        if let Some(dir) = &resume_dir {
            tracing::info!("resumed from {} at step {}", dir.display(), state.step);
        }
        // Auto shards follow the machine's cores; a different count changes results by float rounding only.
        let shards = batch_shards::<B>(config.train.batch_shards, config.train.batch_size, device);
        if resume_dir.is_some() && state.batch_shards != 0 && state.batch_shards != shards {
            tracing::info!("note: the run used {} batch shards, this machine uses {shards}: results differ from an uninterrupted run by float rounding", state.batch_shards);
        }
        state.batch_shards = shards;
        let metrics = open_metrics(&out_dir.join("metrics.jsonl"), state.step)?;
        let progress = config.train.progress.then(|| progress_bar(total_steps, state.step));
        Ok(Self {
            config,
            device: device.clone(),
            objective,
            tokenizer,
            pad,
            train_set,
            eval_set,
            order,
            schedule,
            total_steps,
            policy: Some(policy),
            optimizer,
            recorder,
            references,
            state,
            metrics,
            window: Window::default(),
            progress,
            summary: TrainSummary::default(),
            steps_this_run: 0,
            final_dir,
            _lock: lock,
        })
    }

    pub(crate) fn policy(&self) -> &CausalLm<B> {
        self.policy.as_ref().expect("the policy is back after each step")
    }

    /// Whether an every-`interval`-steps action is due now (0: never during the run).
    fn due(&self, interval: usize) -> bool {
        interval > 0 && self.state.step.is_multiple_of(interval)
    }

    /// One optimizer step: forward and backward over `gradient_accumulation_steps` micro-batches,
    /// clipping, the update. `None` when the step was skipped as not finite.
    fn step(&mut self) -> TrainResult<Option<StepReport>> {
        let (config, accum) = (self.config, self.config.train.gradient_accumulation_steps);
        let lr = self.schedule.lr(self.state.step);
        let mut grads = GradientsParams::new();
        let (mut loss, mut tokens, mut batches) = (0.0, 0u64, Vec::new());
        for _ in 0..accum {
            let indices = self.order.batch(self.state.batches_seen);
            let (out, batch_tokens, records) = self.forward(&indices);
            if !out.loss.is_finite() {
                let (what, micro_batch) = (format!("loss is {} on records {records:?}", out.loss), self.state.batches_seen);
                self.state.batches_seen += 1;
                return self.skip_or_stop(&what, Some(micro_batch));
            }
            // Accumulation averages, as PyTorch's loss / accumulation_steps does.
            let factor = self.state.loss_scaler.as_ref().map_or(1.0, |scaler| scaler.scale) / accum as f64;
            loss += out.loss / accum as f64;
            self.window.add_batch(out.metrics.clone());
            out.backward_into(factor, &mut grads);
            tokens += batch_tokens;
            batches.push(indices);
            self.state.batches_seen += 1;
        }
        if let Some(scaler) = &self.state.loss_scaler {
            scale::<B, CausalLm<B>>(self.policy(), &mut grads, 1.0 / scaler.scale);
        }
        let max_norm = (config.optim.max_grad_norm > 0.0).then_some(config.optim.max_grad_norm);
        let grad_norm = clip_global_norm::<B, CausalLm<B>>(self.policy(), &mut grads, max_norm);
        // fp16 overflow is routine: the update is skipped and the scale halved, but the step counts
        // and is logged and saved like any other (weights unchanged). Gradients still not finite at
        // a scale below 1 are not an overflow: they take the non-finite path.
        let overflowed = self.state.loss_scaler.as_mut().is_some_and(|scaler| !scaler.update(grad_norm.is_finite()) && scaler.scale >= 1.0);
        if let Some(scaler) = self.state.loss_scaler.as_ref().filter(|_| overflowed) {
            tracing::info!("step {}: fp16 gradients overflowed; update skipped, loss scale now {}", self.state.step + 1, scaler.scale);
        }
        if !grad_norm.is_finite() && !overflowed {
            return self.skip_or_stop(&format!("gradient norm is {grad_norm} (batches {batches:?})"), None);
        }
        if overflowed {
            self.state.skipped_steps += 1;
        } else {
            let policy = self.policy.take().expect("the policy is back after each step");
            self.policy = Some(self.optimizer.step(lr, policy, grads));
        }
        self.state.step += 1;
        if !overflowed && config.train.sync_ref_model && self.state.step.is_multiple_of(config.train.ref_model_sync_steps) {
            let policy = self.policy.as_ref().expect("the policy is back after each step");
            self.references.sync(policy, config.train.ref_model_mixup_alpha)?;
        }
        self.steps_this_run += 1;
        self.state.num_tokens += tokens;
        self.window.add_step(loss, tokens);
        self.summary.step_losses.push(loss);
        self.summary.grad_norms.push(grad_norm);
        Ok(Some(StepReport { grad_norm, lr }))
    }

    /// One micro-batch's forward pass: the step's output, its non-padding tokens, its records.
    fn forward(&mut self, indices: &[usize]) -> (crate::step::TrainStep<B>, u64, Vec<usize>) {
        let (config, device, pad) = (self.config, &self.device, self.pad);
        let policy = self.policy.as_ref().expect("the policy is back after each step");
        match &self.train_set {
            Examples::Pairs(all, labels) => {
                let pairs: Vec<PairInputs> = indices.iter().map(|&i| all[i].clone()).collect();
                let mut batch = PreferenceBatch::new(&pairs, pad);
                batch.labels = labels.as_ref().map(|l| indices.iter().map(|&i| l[i]).collect());
                let shards = batch_shards::<B>(config.train.batch_shards, batch.num_pairs(), device);
                let reference = self.references.for_batch(indices, false);
                let out = preference_step(policy, reference, &batch, StepContext { objective: &self.objective, state: &mut self.state.objective, shards }, device);
                (out, mask_tokens(&batch.attention_mask), batch.indices)
            }
            Examples::Sequences(all) => {
                let examples: Vec<&CompletionInputs> = indices.iter().map(|&i| &all[i]).collect();
                let batch = SequenceBatch::new(&examples, pad);
                let shards = batch_shards::<B>(config.train.batch_shards, batch.len(), device);
                (sft_step(policy, &batch, shards, device), mask_tokens(&batch.attention_mask), batch.indices)
            }
        }
    }

    /// A step whose loss or gradients are not finite: skipped with `train.skip_nonfinite` (until
    /// more than `train.max_skipped_fraction` of the steps were), an error naming it otherwise.
    fn skip_or_stop(&mut self, what: &str, micro_batch: Option<usize>) -> TrainResult<Option<StepReport>> {
        let step = self.state.step + 1;
        if !self.config.train.skip_nonfinite {
            let at = micro_batch.map_or(String::new(), |m| format!(" (micro-batch {m})"));
            return Err(TrainError::Run(format!("step {step}{at}: {what}; no checkpoint was written for this step")));
        }
        tracing::warn!("step {step}: {what}; step skipped");
        self.state.nonfinite_steps += 1;
        let limit = self.config.train.max_skipped_fraction;
        if self.state.nonfinite_steps > 1 && self.state.nonfinite_steps as f64 > limit * step as f64 {
            return Err(TrainError::Run(format!(
                "step {step}: {} of {step} steps were skipped as not finite, more than train.max_skipped_fraction = {limit}; the run is diverging (lower optim.learning_rate, or check the data)",
                self.state.nonfinite_steps
            )));
        }
        self.state.skipped_steps += 1;
        self.state.step += 1;
        Ok(None)
    }

    /// After a step: its `metrics.jsonl` line at logging steps (and the last), the progress bar.
    fn log_step(&mut self, step: &StepReport) -> TrainResult<()> {
        let (state, total) = (&self.state, self.total_steps);
        if state.step.is_multiple_of(self.config.train.logging_steps) || state.step == total {
            let mut line = self.window.close();
            line.insert("grad_norm".into(), step.grad_norm);
            line.insert("learning_rate".into(), step.lr);
            line.insert("epoch".into(), state.batches_seen as f64 / self.order.batches_per_epoch() as f64);
            line.insert("step".into(), state.step as f64);
            line.insert("num_tokens".into(), state.num_tokens as f64);
            self.write_line(&line)?;
            if let Some(bar) = &self.progress {
                let accuracy = line.get("rewards/accuracies").copied().unwrap_or(0.0);
                bar.set_message(format!("loss {:.4} acc {accuracy:.2} {:.0} tok/s", line["loss"], line["tokens_per_second"]));
            }
            self.summary.log_history.push(line);
        }
        if let Some(bar) = &self.progress {
            bar.set_position(self.state.step as u64);
        }
        Ok(())
    }

    /// Evaluates now and logs the `eval_*` line (with its step); keeps the weights when they are
    /// the best so far (`train.save_best`).
    fn log_eval(&mut self) -> TrainResult<BTreeMap<String, f64>> {
        let mut eval = self.evaluate();
        eval.insert("step".into(), self.state.step as f64);
        self.write_line(&eval)?;
        self.summary.log_history.push(eval.clone());
        if self.config.train.save_best {
            self.keep_if_best(&eval)?;
        }
        Ok(eval)
    }

    /// Writes the weights to `<output_dir>/best` when `eval` beats the best evaluation so far.
    fn keep_if_best(&mut self, eval: &BTreeMap<String, f64>) -> TrainResult<()> {
        let train = &self.config.train;
        let metric = train.best_metric();
        let Some(&value) = eval.get(&metric) else {
            let names: Vec<&str> = eval.keys().map(String::as_str).filter(|k| k.starts_with("eval_")).collect();
            return Err(TrainError::invalid(format!(
                "train.metric_for_best_model = {:?}: the evaluation has no {metric:?}; it has {}",
                train.metric_for_best_model,
                names.join(", ")
            )));
        };
        let better = match &self.state.best {
            Some(best) if best.metric == metric => value.is_finite() && train.improves(value, best.value),
            _ => value.is_finite(),
        };
        if better {
            let best = BestEval { step: self.state.step, metric, value };
            crate::checkpoint::save_best(self.config, self.policy(), &best)?;
            self.state.best = Some(best);
        }
        Ok(())
    }

    fn write_line(&mut self, line: &BTreeMap<String, f64>) -> TrainResult<()> {
        let path = self.config.train.output_dir.join("metrics.jsonl");
        let text = serde_json::to_string(line).map_err(at(&path))?;
        writeln!(self.metrics, "{text}").map_err(at(&path))
    }

    fn save_checkpoint(&self) -> TrainResult<()> {
        let moving = self.references.frozen().filter(|_| self.config.train.sync_ref_model);
        save_checkpoint(self.config, self.policy(), moving, &self.optimizer, &self.state, &self.recorder)
    }

    /// At the end of a run: the final evaluation, the final weights and generations. A run
    /// stopped early (`RunOptions::stop_after`) ends with its checkpoints only.
    fn finish(mut self) -> TrainResult<TrainSummary> {
        if let Some(bar) = &self.progress {
            bar.finish();
        }
        self.summary.steps = self.state.step;
        self.summary.best = self.state.best.clone();
        if self.state.step < self.total_steps {
            return Ok(self.summary);
        }
        if !self.eval_set.is_empty() {
            let eval = self.log_eval()?;
            self.summary.final_eval = Some(eval);
        }
        let out_dir = &self.config.train.output_dir;
        save_final(self.config, self.policy(), &self.final_dir)?;
        self.summary.final_dir = self.final_dir.clone();
        if self.config.train.generations > 0 && !self.eval_set.is_empty() {
            let path = out_dir.join("generations.jsonl");
            self.write_generations(&path)?;
            self.summary.generations = Some(path);
        }
        Ok(self.summary)
    }
}

/// The order of the training examples: shuffled per epoch (seeded), optionally grouped by length.
fn data_order(config: &TrainConfig, train_set: &Examples) -> DataOrder {
    DataOrder {
        num_pairs: train_set.len(),
        batch_size: config.train.batch_size,
        shuffle: config.data.shuffle,
        seed: config.train.seed,
        lengths: config.data.group_by_length.then(|| (0..train_set.len()).map(|i| train_set.row_len(i)).collect()),
    }
}

/// A resume from a run that already finished: its last checkpoint is at the end and its final
/// weights are whole (a run killed between the two still ends).
fn refuse_finished(dir: &Path, step: usize, total_steps: usize, final_weights: &Path) -> TrainResult<()> {
    if step < total_steps || !is_sealed(final_weights) {
        return Ok(());
    }
    Err(TrainError::resume(
        dir,
        format!(
            "the run finished there (step {step} of {total_steps}; its weights are in {}); nothing left to train (raise train.max_steps or train.num_train_epochs to go on)",
            final_weights.display()
        ),
    ))
}

fn progress_bar(total_steps: usize, step: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total_steps as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed}<{eta}] {msg}").expect("a valid template"));
    bar.set_position(step as u64);
    bar
}

/// `output_dir/manifest.json` for this start of the run (see [`crate::manifest`]).
fn write_manifest<B: AutodiffBackend>(config: &TrainConfig, resumed_from: Option<&Path>, (train, eval): (&Examples, &Examples), device: &B::Device) -> TrainResult<()> {
    let manifest = RunManifest::new(ManifestInputs {
        config,
        resumed_from,
        backend: std::any::type_name::<B>(),
        device: format!("{device:?}"),
        examples: (train.len(), eval.len()),
        train_examples_blake3: train.digest(),
    })?;
    manifest.write(&config.train.output_dir)
}

/// The checkpoint `options.resume` names (the latest in `output_dir` for `Latest`), checked
/// against the run's config before any of it is loaded.
fn resume_point(config: &TrainConfig, options: &RunOptions) -> TrainResult<Option<PathBuf>> {
    let out_dir = &config.train.output_dir;
    let dir = match &options.resume {
        None => return Ok(None),
        Some(Resume::Path(p)) => p.clone(),
        Some(Resume::Latest) => checkpoint_dirs(out_dir)
            .pop()
            .map(|(_, p)| p)
            .ok_or_else(|| TrainError::Run(format!("--resume: {} holds no checkpoint-* folder to resume from", out_dir.display())))?,
    };
    if !dir.join("trainer_state.json").exists() {
        return Err(TrainError::resume(&dir, "not a checkpoint (no trainer_state.json)"));
    }
    let saved = dir.join("config.json");
    let text = std::fs::read_to_string(&saved).map_err(at(&saved))?;
    let saved: TrainConfig = serde_json::from_str(&text).map_err(at(&saved))?;
    check_resume_config(&saved, config, &dir)?;
    verify(&dir)?;
    Ok(Some(dir))
}

/// The checkpoint to resume from, if any, and the state to start with: the checkpoint's, which
/// must have seen the same training examples, or a fresh one.
fn resume(config: &TrainConfig, options: &RunOptions, train_set: &Examples) -> TrainResult<(Option<PathBuf>, TrainerState)> {
    let resume_dir = resume_point(config, options)?;
    let mut state = match &resume_dir {
        Some(dir) => load_state(dir)?,
        None => TrainerState::default(),
    };
    let train_data = train_set.digest();
    if let (Some(dir), Some(saved)) = (&resume_dir, &state.train_data)
        && *saved != train_data
    {
        return Err(TrainError::resume(
            dir,
            format!(
                "the training examples differ from the checkpoint's (data.train, data.eval_fraction or the tokenisation changed; {} examples now)",
                train_set.len()
            ),
        ));
    }
    state.train_data = Some(train_data);
    Ok((resume_dir, state))
}

/// AdamW with the config's hyper-parameters (PyTorch's semantics), its moments loaded from a
/// checkpoint when resuming.
fn adamw<B: AutodiffBackend>(
    config: &TrainConfig,
    checkpoint: Option<&Path>,
    recorder: &NamedMpkFileRecorder<FullPrecisionSettings>,
    device: &B::Device,
) -> TrainResult<OptimizerAdaptor<FusedAdamW, CausalLm<B>, B>> {
    let optimizer = FusedAdamW::of(&config.optim).init::<B, CausalLm<B>>();
    let Some(dir) = checkpoint else { return Ok(optimizer) };
    let record = recorder.load(dir.join("optimizer"), device).map_err(at(&dir.join("optimizer.mpk")))?;
    Ok(optimizer.load_record(record))
}

fn load_state(dir: &Path) -> TrainResult<TrainerState> {
    let path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&path).map_err(at(&path))?;
    serde_json::from_str(&text).map_err(at(&path))
}

/// Refuses a run whose longest rows cannot fit in memory at all (see `memory::check_batch_fits`).
fn check_memory<B: AutodiffBackend>(config: &TrainConfig, policy: &CausalLm<B>, (train, eval): (&Examples, &Examples), device: &B::Device) -> TrainResult<()> {
    let longest = (0..train.len()).map(|i| train.row_len(i)).chain((0..eval.len()).map(|i| eval.row_len(i))).max().unwrap_or(0);
    // each shard pads to its own longest row: only the longest row's shard is surely that long
    let batch = config.train.batch_size.min(train.len().max(eval.len()));
    let per_shard = batch.div_ceil(batch_shards::<B>(config.train.batch_shards, batch, device).max(1));
    crate::memory::check_batch_fits::<B>(device, &policy.config, per_shard, longest, "data.max_length")
}
