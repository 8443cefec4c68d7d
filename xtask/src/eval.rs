//! `cargo xtask eval`: held-out preference metrics of a model (optionally with an adapter) against a
//! reference, and sampled generations of policy and reference on the held-out prompts.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Result, anyhow};
use burn::tensor::ElementConversion;
use burn::tensor::backend::Backend;
use clap::Args;
use dipole_data::{ChatTemplate, Content, PreferenceBatch, ReadOptions, read_preferences};
use dipole_loss::{ObjectiveConfig, ObjectiveState};
use dipole_models::GenerateOptions;
use dipole_train::{Generation, objective_on_batch, pair_logps};

use crate::pairs::{Loaded, ModelAndPairs};

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub input: ModelAndPairs,
    #[arg(long, default_value_t = 0.1, value_parser = crate::flags::positive)]
    pub beta: f64,
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

pub fn run(args: EvalArgs) -> Result<()> {
    crate::with_backend!(args.input.backend, run_on(&args))
}

fn run_on<B: Backend>(device: &B::Device, args: &EvalArgs) -> Result<()> {
    let Loaded { tokenizer, prepared, policy, reference } = args.input.load::<B>(device)?;
    // without --ref or --adapter the model is judged against itself
    let reference = reference.unwrap_or_else(|| policy.clone());
    let objective = ObjectiveConfig { beta: args.beta, ..Default::default() };
    let pad = tokenizer.pad_id();
    let mut state = ObjectiveState::default();
    let (mut sums, mut n, mut loss) = (std::collections::BTreeMap::<String, f64>::new(), 0usize, 0.0);
    for chunk in prepared.pairs.chunks(args.input.batch_size) {
        let batch = PreferenceBatch::new(chunk, pad);
        let r = pair_logps(&reference, chunk, chunk.len(), pad, device);
        let ref_pairs: Vec<(f32, f32)> = r.iter().map(|p| (p.chosen as f32, p.rejected as f32)).collect();
        let out = objective_on_batch(&policy, Some(ref_pairs), &batch, &objective, &mut state, false, dipole_train::batch_shards::<B>(0, chunk.len(), device), device);
        loss += out.loss.into_scalar().elem::<f64>() * chunk.len() as f64;
        for (k, v) in out.metrics {
            *sums.entry(k).or_default() += v * chunk.len() as f64;
        }
        n += chunk.len();
    }
    if n == 0 {
        return Err(anyhow!("{}: no pairs left to evaluate", args.input.data.display()));
    }
    println!("{} pairs from {} ({} dropped at max_length {})", n, args.input.data.display(), prepared.dropped.len(), args.input.max_length);
    println!("  {:<24} {:>10.4}", "loss (sigmoid)", loss / n as f64);
    for (k, v) in &sums {
        println!("  {k:<24} {:>10.4}", v / n as f64);
    }

    let accuracy_after = sums.get("rewards/accuracies_ties_half").map(|v| v / n as f64);
    if args.generations > 0 {
        let (records, _) = read_preferences(&args.input.data, ReadOptions::default())?;
        let template = ChatTemplate::from_tokenizer(&tokenizer).map_err(|e| anyhow!(e))?;
        let stop: Vec<u32> = tokenizer.eos.iter().map(|t| t.id).collect();
        let mut generations = Vec::new();
        let mut out = std::io::BufWriter::new(std::fs::File::create(&args.generations_out)?);
        for record in records.iter().take(args.generations) {
            let (prompt_text, ids) = match &record.prompt {
                Content::Text(p) => (p.clone(), tokenizer.encode(p, true)?),
                Content::Messages(m) => {
                    let t = template.as_ref().ok_or_else(|| anyhow!("conversational prompts need a chat template"))?;
                    let text = t.render(m, true).map_err(|e| anyhow!(e))?;
                    let ids = tokenizer.encode(&text, false)?;
                    (text, ids)
                }
            };
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
        println!("wrote {} generations to {}", generations.len(), args.generations_out.display());
        let rubrics = dipole_train::judge::rubrics_of(&args.input.data).map_err(|e| anyhow!(e))?;
        let (report, _) = match args.judge.llm() {
            Some(judge) => judge.judge(&generations, &rubrics).map_err(|e| anyhow!(e))?,
            None => dipole_train::judge_with_rules(&generations, &rubrics),
        };
        // The base against itself: every reward margin is 0, a coin flip.
        println!("\n{}", dipole_train::judge::format_table(Some(0.5), accuracy_after, Some(&report)));
    } else {
        println!("\n{}", dipole_train::judge::format_table(Some(0.5), accuracy_after, None));
    }
    Ok(())
}
