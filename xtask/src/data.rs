//! `cargo xtask data check|stats|convert|pairs`: look at a preference dataset before training on it.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use clap::{Args, Subcommand, ValueEnum};
use dipole_data::ratings::{PairMode, ratings_to_pairs, thumbs_to_unpaired};
use dipole_data::record::{read_values, write_rows};
use dipole_data::{ChatTemplate, Content, Format, LengthOptions, ReadOptions, Tokenizer, TruncationMode, prepare_records, read_rows};

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Validate every row (and, with --model, tokenise it); report what is invalid, dropped or truncated.
    Check(CheckArgs),
    /// Token-length statistics of prompts, chosen and rejected completions at a max_length.
    Stats(CheckArgs),
    /// Convert between JSONL, JSON and Parquet, and between standard and conversational.
    Convert(ConvertArgs),
    /// Rated responses -> preference pairs; thumbs up/down -> unpaired KTO rows.
    Pairs(PairsArgs),
    /// Seeded train/test split by a fraction: writes `train.<ext>` and `test.<ext>`.
    Split(SplitArgs),
    /// Generate the shipped customer-support task (SFT corpus, pairs, held-out set, tokenizer).
    Demo(crate::demo::DemoArgs),
}

#[derive(Args, Debug)]
pub struct SplitArgs {
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub format: Option<String>,
    /// Fraction of rows for the test split.
    #[arg(long, default_value_t = 0.1, value_parser = crate::flags::open_unit)]
    pub test_fraction: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Folder for train.<ext> and test.<ext> (extension of the input unless --to).
    #[arg(long)]
    pub out_dir: PathBuf,
    #[arg(long)]
    pub to: Option<String>,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[arg(long)]
    pub data: PathBuf,
    /// jsonl, json or parquet (default: by extension).
    #[arg(long)]
    pub format: Option<String>,
    /// Model folder whose tokenizer (and chat template) to check against.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value_t = 1024, value_parser = crate::flags::at_least_one)]
    pub max_length: usize,
    /// Report every bad row instead of stopping at the first.
    #[arg(long)]
    pub skip_invalid: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum Style {
    Standard,
    Conversational,
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub format: Option<String>,
    /// Output file; its extension picks the format unless --to is given.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub to: Option<String>,
    /// Rewrite records as standard (text, via the model's chat template) or conversational (messages).
    #[arg(long, value_enum)]
    pub style: Option<Style>,
    /// Model folder whose chat template renders conversations as text (`--style standard`).
    #[arg(long)]
    pub model: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum PairsMode {
    BestWorst,
    AllPairs,
    Thumbs,
}

#[derive(Args, Debug)]
pub struct PairsArgs {
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub format: Option<String>,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = PairsMode::BestWorst)]
    pub mode: PairsMode,
    /// all-pairs: minimum rating difference between chosen and rejected.
    #[arg(long, default_value_t = 1.0, value_parser = crate::flags::non_negative)]
    pub min_gap: f64,
}

fn format_arg(s: &Option<String>) -> Result<Option<Format>> {
    s.as_deref()
        .map(|f| Format::parse(f).ok_or_else(|| anyhow!("--format {f:?}: expected jsonl, json or parquet")))
        .transpose()
}

pub fn run(command: DataCommand) -> Result<()> {
    match command {
        DataCommand::Check(a) => check(&a, false),
        DataCommand::Stats(a) => check(&a, true),
        DataCommand::Convert(a) => convert(&a),
        DataCommand::Pairs(a) => pairs(&a),
        DataCommand::Split(a) => split(&a),
        DataCommand::Demo(a) => crate::demo::run(a),
    }
}

fn percentile(sorted: &[usize], p: f64) -> usize {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn check(args: &CheckArgs, stats: bool) -> Result<()> {
    let options = ReadOptions { format: format_arg(&args.format)?, skip_invalid: args.skip_invalid };
    let rows = read_rows(&args.data, options)?;
    println!("{}: {} rows", args.data.display(), rows.total);
    println!("  preference pairs: {}", rows.preference.len());
    if !rows.unpaired.is_empty() {
        let good = rows.unpaired.iter().filter(|r| r.label == Some(true)).count();
        let bad = rows.unpaired.iter().filter(|r| r.label == Some(false)).count();
        let plain = rows.unpaired.len() - good - bad;
        println!("  prompt-completion rows: {} ({good} desirable, {bad} undesirable, {plain} unlabelled (SFT))", rows.unpaired.len());
    }
    let conversational = rows.preference.iter().filter(|r| r.prompt.is_conversational()).count();
    println!("  conversational: {conversational}, standard: {}", rows.preference.len() - conversational);
    println!("  invalid (skipped): {}", rows.skipped.len());
    for e in rows.skipped.iter().take(50) {
        println!("    {e}");
    }
    if rows.skipped.len() > 50 {
        println!("    ... and {} more", rows.skipped.len() - 50);
    }
    let Some(model) = &args.model else {
        if stats {
            bail!("stats needs --model (token lengths depend on the tokenizer)");
        }
        return Ok(());
    };
    let tokenizer = Tokenizer::from_dir(model)?;
    let lengths = LengthOptions { max_length: Some(args.max_length), truncation: TruncationMode::KeepStart, ..Default::default() };
    let prepared = prepare_records(&rows.preference, &tokenizer, lengths, args.skip_invalid)?;
    println!("  tokenised with {}: {} pairs", model.display(), prepared.tokenized.len());
    for e in &prepared.skipped {
        println!("    {e}");
    }
    println!("  dropped at max_length {} (prompt alone too long): {} {:?}", args.max_length, prepared.dropped.len(), prepared.dropped);
    println!("  truncated to max_length {}: {}", args.max_length, prepared.truncated);
    if stats {
        let mut prompt: Vec<usize> = prepared.tokenized.iter().map(|t| t.prompt_ids.len()).collect();
        let mut chosen: Vec<usize> = prepared.tokenized.iter().map(|t| t.chosen_ids.len()).collect();
        let mut rejected: Vec<usize> = prepared.tokenized.iter().map(|t| t.rejected_ids.len()).collect();
        let mut total: Vec<usize> = prepared.tokenized.iter().map(|t| t.prompt_ids.len() + t.chosen_ids.len().max(t.rejected_ids.len())).collect();
        println!("\n  tokens      min    p50    p90    p99    max   mean");
        for (name, v) in [("prompt", &mut prompt), ("chosen", &mut chosen), ("rejected", &mut rejected), ("longest", &mut total)] {
            v.sort_unstable();
            let mean = v.iter().sum::<usize>() as f64 / v.len().max(1) as f64;
            println!(
                "  {name:<9} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6.1}",
                v.first().copied().unwrap_or(0),
                percentile(v, 0.5),
                percentile(v, 0.9),
                percentile(v, 0.99),
                v.last().copied().unwrap_or(0),
                mean
            );
        }
        println!("\n  histogram of prompt + longest completion:");
        let mut edge = 16;
        let max = total.last().copied().unwrap_or(0);
        let mut lo = 0;
        while lo <= max {
            let n = total.iter().filter(|&&x| x >= lo && x < edge).count();
            println!("  [{lo:>6}, {edge:>6}) {n:>6} {}", "#".repeat((60 * n).div_ceil(total.len().max(1))));
            lo = edge;
            edge *= 2;
        }
    }
    Ok(())
}

/// Renders a message list as text with the chat template (prompt with the generation prompt).
fn as_text(template: &ChatTemplate, prompt: &[dipole_data::Message], completion: Option<&[dipole_data::Message]>) -> Result<String> {
    match completion {
        None => template.render(prompt, true).map_err(|e| anyhow!(e)),
        Some(c) => {
            let head = template.render(prompt, true).map_err(|e| anyhow!(e))?;
            let mut all = prompt.to_vec();
            all.extend_from_slice(c);
            let full = template.render(&all, false).map_err(|e| anyhow!(e))?;
            Ok(full.strip_prefix(&head).map(str::to_string).unwrap_or(full))
        }
    }
}

fn convert(args: &ConvertArgs) -> Result<()> {
    let to = match &args.to {
        Some(t) => Format::parse(t).ok_or_else(|| anyhow!("--to {t:?}: expected jsonl, json or parquet"))?,
        None => Format::of(&args.out).ok_or_else(|| anyhow!("{}: cannot tell the format from the extension; pass --to", args.out.display()))?,
    };
    let Some(style) = args.style else {
        // Format change only: every column is kept.
        let values: Vec<_> = read_values(&args.data, format_arg(&args.format)?)?.into_iter().map(|(_, _, v)| v).collect();
        write_rows(&args.out, to, &values)?;
        println!("wrote {} rows to {}", values.len(), args.out.display());
        return Ok(());
    };
    let rows = read_rows(&args.data, ReadOptions { format: format_arg(&args.format)?, skip_invalid: false })?;
    let template = match (&args.model, style) {
        (Some(m), Style::Standard) => Some(
            ChatTemplate::from_tokenizer(&Tokenizer::from_dir(m)?)
                .map_err(|e| anyhow!(e))?
                .ok_or_else(|| anyhow!("{}: no chat_template to render conversations with", m.display()))?,
        ),
        (None, Style::Standard) if rows.preference.iter().any(|r| r.prompt.is_conversational()) => {
            bail!("--style standard needs --model (its chat template renders the conversations as text)")
        }
        _ => None,
    };
    let mut out = Vec::new();
    for r in &rows.preference {
        let (p, c, j) = match (style, &r.prompt, &r.chosen, &r.rejected) {
            (Style::Conversational, Content::Text(p), Content::Text(c), Content::Text(j)) => {
                let user = serde_json::json!([{"role": "user", "content": p}]);
                let asst = |t: &str| serde_json::json!([{"role": "assistant", "content": t.trim_start()}]);
                (user, asst(c), asst(j))
            }
            (Style::Standard, Content::Messages(p), Content::Messages(c), Content::Messages(j)) => {
                let t = template.as_ref().expect("checked above");
                (as_text(t, p, None)?.into(), as_text(t, p, Some(c))?.into(), as_text(t, p, Some(j))?.into())
            }
            _ => (r.prompt.to_json(), r.chosen.to_json(), r.rejected.to_json()),
        };
        out.push(serde_json::json!({"prompt": p, "chosen": c, "rejected": j}));
    }
    for r in &rows.unpaired {
        out.push(r.to_json());
    }
    write_rows(&args.out, to, &out)?;
    println!("wrote {} rows ({:?}) to {}", out.len(), style, args.out.display());
    Ok(())
}

fn pairs(args: &PairsArgs) -> Result<()> {
    let values = read_values(&args.data, format_arg(&args.format)?)?;
    let path: &Path = &args.data;
    let located: Vec<_> = values.into_iter().map(|(_, loc, v)| (loc, v)).collect();
    let to = Format::of(&args.out).unwrap_or(Format::Jsonl);
    match args.mode {
        PairsMode::Thumbs => {
            let rows = thumbs_to_unpaired(&located, path)?;
            write_rows(&args.out, to, &rows)?;
            println!("wrote {} unpaired rows to {}", rows.len(), args.out.display());
        }
        mode => {
            let mode = if mode == PairsMode::AllPairs { PairMode::AllPairs { min_gap: args.min_gap } } else { PairMode::BestWorst };
            let report = ratings_to_pairs(&located, path, mode)?;
            write_rows(&args.out, to, &report.pairs)?;
            println!(
                "wrote {} pairs to {}; {} prompts had no two differently rated responses",
                report.pairs.len(),
                args.out.display(),
                report.prompts_without_pair
            );
        }
    }
    Ok(())
}

fn split(args: &SplitArgs) -> Result<()> {
    if !(0.0..1.0).contains(&args.test_fraction) || args.test_fraction == 0.0 {
        bail!("--test-fraction must be in (0, 1), got {}", args.test_fraction);
    }
    let values: Vec<serde_json::Value> = read_values(&args.data, format_arg(&args.format)?)?.into_iter().map(|(_, _, v)| v).collect();
    let to = match &args.to {
        Some(t) => Format::parse(t).ok_or_else(|| anyhow!("--to {t:?}: expected jsonl, json or parquet"))?,
        None => Format::of(&args.data).unwrap_or(Format::Jsonl),
    };
    let (train, test) = dipole_data::split::split_indices(values.len(), args.test_fraction, args.seed);
    std::fs::create_dir_all(&args.out_dir)?;
    let ext = match to { Format::Jsonl => "jsonl", Format::Json => "json", Format::Parquet => "parquet" };
    for (name, idx) in [("train", &train), ("test", &test)] {
        let rows: Vec<_> = idx.iter().map(|&i| values[i].clone()).collect();
        let path = args.out_dir.join(format!("{name}.{ext}"));
        write_rows(&path, to, &rows)?;
        println!("{}: {} rows", path.display(), rows.len());
    }
    Ok(())
}
