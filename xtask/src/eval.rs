//! `cargo xtask eval`: held-out preference metrics of a model (optionally with an adapter) against a
//! reference, and sampled generations of policy and reference on the held-out prompts.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use burn::tensor::backend::Backend;
use clap::Args;
use dipole_data::{ChatTemplate, Content, PreparedPairs, ReadOptions, Tokenizer, read_preferences};
use dipole_loss::{ObjectiveConfig, ObjectiveState};
use dipole_models::{CausalLm, GenerateOptions};
use dipole_eval::{Generation, JudgeReport, format_table, judge_with_rules, rubrics_of};
use dipole_train::{EvalReference, EvalSettings, Stage, TrainConfig, evaluate_pairs};

use crate::pairs::{Loaded, ModelAndPairs};

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub input: ModelAndPairs,
    /// The run's config (TOML): its objective (loss types, beta, rpo_alpha, ...), `data.max_length`,
    /// `train.batch_size`, `train.batch_shards`, precision and prefix sharing, so the numbers are the
    /// run's own evaluation's; flags given explicitly override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// DPO beta (default 0.1, or the config's).
    #[arg(long, value_parser = crate::flags::positive)]
    pub beta: Option<f64>,
    /// Write the metrics as JSON (`{"metrics": {..}, "objective": [..], "pairs": N, ...}`, TRL's names).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Generate for the first N prompts (policy and reference) into --generations-out, judge them
    /// and print the before/after table.
    #[arg(long, default_value_t = 0)]
    pub generations: usize,
    /// Sampling temperature of the generations (0 = greedy).
    #[arg(long, default_value_t = 0.7, value_parser = crate::flags::non_negative)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0, value_parser = crate::flags::top_p)]
    pub top_p: f64,
    /// Seed of the sampling (prompt i uses seed + record index, for both models).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[command(flatten)]
    pub judge: crate::train::JudgeArgs,
    #[arg(long, default_value = "generations.jsonl")]
    pub generations_out: PathBuf,
    #[arg(long, default_value_t = 128, value_parser = crate::flags::at_least_one)]
    pub max_new_tokens: usize,
}

pub fn run(mut args: EvalArgs) -> Result<()> {
    let config = match &args.config {
        Some(path) => TrainConfig::from_file(path).map_err(|e| anyhow!(e))?,
        None => TrainConfig::default(),
    };
    if args.config.is_some() {
        args.input.max_length = args.input.max_length.or(Some(config.data.max_length));
        args.input.batch_size = args.input.batch_size.or(Some(config.train.batch_size));
    }
    crate::with_backend!(args.input.backend, run_on(&args, &config))
}

/// The objective an evaluation scores: the config's stage objective (SFT runs score as DPO does
/// with the default objective), with `--beta` over it.
fn objective_of(args: &EvalArgs, config: &TrainConfig) -> ObjectiveConfig {
    let mut objective = match (args.config.is_some(), config.train.stage) {
        (true, Stage::Dpo) => config.objective.clone(),
        _ => ObjectiveConfig::default(),
    };
    if let Some(beta) = args.beta {
        objective.beta = beta;
    }
    objective
}

/// What an evaluation runs on: the tokenised held-out pairs and the two models, set up as the run's.
struct EvalInputs<B: Backend> {
    tokenizer: Tokenizer,
    prepared: PreparedPairs,
    policy: CausalLm<B>,
    reference: CausalLm<B>,
}

impl<B: Backend> EvalInputs<B> {
    /// Loads the pairs and models, with the config's precision and prefix sharing; without --ref or
    /// --adapter the model is judged against itself.
    fn load(device: &B::Device, args: &EvalArgs, config: &TrainConfig) -> Result<Self> {
        let Loaded { tokenizer, prepared, mut policy, reference } = args.input.load::<B>(device)?;
        let mut reference = reference.unwrap_or_else(|| policy.clone());
        for model in [&mut policy, &mut reference] {
            config.train.apply_to(model);
        }
        Ok(EvalInputs { tokenizer, prepared, policy, reference })
    }
}

fn run_on<B: Backend>(device: &B::Device, args: &EvalArgs, config: &TrainConfig) -> Result<()> {
    let inputs = EvalInputs::<B>::load(device, args, config)?;
    let objective = objective_of(args, config);
    objective.validate().map_err(|e| anyhow!("objective: {e}"))?;
    if objective.loss_type.iter().any(|t| t.unpaired()) {
        return Err(anyhow!("eval scores preference pairs; a KTO run's evaluation is the one `cargo xtask train` logs"));
    }
    if inputs.prepared.pairs.is_empty() {
        return Err(anyhow!("{}: no pairs left to evaluate", args.input.data.display()));
    }
    let settings = EvalSettings {
        objective: &objective,
        state: ObjectiveState::default(),
        batch_size: args.input.batch_size(),
        shards: config.train.batch_shards,
        pad: inputs.tokenizer.pad_id(),
    };
    let reference = if objective.reference_free() { EvalReference::None } else { EvalReference::Model(Box::new(inputs.reference.clone())) };
    let metrics = evaluate_pairs(&inputs.policy, reference, &inputs.prepared.pairs, None, settings, device);
    report_metrics(args, &objective, &inputs.prepared, &metrics)?;
    let report = if args.generations > 0 { Some(generate_and_judge(args, &inputs)?) } else { None };
    // The base against itself: every reward margin is 0, a coin flip.
    let accuracy_after = metrics.get("rewards/accuracies_ties_half").copied();
    println!("\n{}", format_table(Some(0.5), accuracy_after, report.as_ref()));
    Ok(())
}

/// Prints the metrics and, with --out, writes them as JSON.
fn report_metrics(args: &EvalArgs, objective: &ObjectiveConfig, prepared: &PreparedPairs, metrics: &BTreeMap<String, f64>) -> Result<()> {
    let n = prepared.pairs.len();
    let names: Vec<&str> = objective.loss_type.iter().map(|t| t.name()).collect();
    println!("{} pairs from {} ({} dropped at max_length {})", n, args.input.data.display(), prepared.dropped.len(), args.input.max_length());
    println!("  objective: {} (beta {}{})", names.join(" + "), objective.beta, objective.rpo_alpha.map_or(String::new(), |a| format!(", rpo_alpha {a}")));
    for (k, v) in metrics {
        println!("  {k:<24} {v:>10.4}");
    }
    if let Some(path) = &args.out {
        let json = serde_json::json!({
            "metrics": metrics,
            "objective": names,
            "beta": objective.beta,
            "pairs": n,
            "dropped_indices": prepared.dropped,
            "data": args.input.data,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Generations of policy and reference for the first --generations prompts (written to
/// --generations-out), judged by the LLM judge when one is configured, else by the rules.
fn generate_and_judge<B: Backend>(args: &EvalArgs, inputs: &EvalInputs<B>) -> Result<JudgeReport> {
    let generations = write_generations(args, inputs)?;
    println!("wrote {} generations to {}", generations.len(), args.generations_out.display());
    let rubrics = rubrics_of(&args.input.data)?;
    let (report, _) = match args.judge.llm() {
        Some(judge) => judge.judge(&generations, &rubrics)?,
        None => judge_with_rules(&generations, &rubrics),
    };
    Ok(report)
}

/// Samples both models on the first --generations prompts (the same seed per prompt for both),
/// one JSON line each into --generations-out.
fn write_generations<B: Backend>(args: &EvalArgs, inputs: &EvalInputs<B>) -> Result<Vec<Generation>> {
    let EvalInputs { tokenizer, policy, reference, .. } = inputs;
    let (records, _) = read_preferences(&args.input.data, ReadOptions::default())?;
    let template = ChatTemplate::from_tokenizer(tokenizer).map_err(|e| anyhow!(e))?;
    let stop: Vec<u32> = tokenizer.eos.iter().map(|t| t.id).collect();
    let mut generations = Vec::new();
    let mut out = std::io::BufWriter::new(std::fs::File::create(&args.generations_out)?);
    for record in records.iter().take(args.generations) {
        let (prompt_text, ids) = encode_prompt(&record.prompt, tokenizer, template.as_ref())?;
        let options = GenerateOptions {
            max_new_tokens: args.max_new_tokens,
            temperature: args.temperature,
            top_p: args.top_p,
            stop_tokens: stop.clone(),
            seed: args.seed.wrapping_add(record.index as u64),
        };
        let generation = Generation {
            index: record.index,
            prompt: prompt_text,
            policy: tokenizer.decode(&policy.generate(&ids, &options), true)?,
            reference: tokenizer.decode(&reference.generate(&ids, &options), true)?,
        };
        writeln!(out, "{}", serde_json::to_string(&generation)?)?;
        generations.push(generation);
    }
    out.flush()?;
    Ok(generations)
}

/// A prompt's text and ids: plain text encoded with the tokenizer's special tokens, a conversation
/// rendered with the chat template (for a generation turn) and encoded as rendered.
fn encode_prompt(prompt: &Content, tokenizer: &Tokenizer, template: Option<&ChatTemplate>) -> Result<(String, Vec<u32>)> {
    match prompt {
        Content::Text(p) => Ok((p.clone(), tokenizer.encode(p, true)?)),
        Content::Messages(m) => {
            let t = template.ok_or_else(|| anyhow!("conversational prompts need a chat template"))?;
            let text = t.render(m, true).map_err(|e| anyhow!(e))?;
            let ids = tokenizer.encode(&text, false)?;
            Ok((text, ids))
        }
    }
}
