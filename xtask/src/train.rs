//! `cargo xtask train` / `sft`: run a training config on the chosen backend.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use clap::Args;
use dipole_eval::LlmJudge;
use dipole_train::{Resume, RunOptions, Stage, TrainConfig, train};

use crate::backend::BackendKind;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Run configuration (TOML).
    #[arg(long, default_value = "configs/default.toml")]
    pub config: PathBuf,
    /// Override a config key: `--set objective.beta=0.2 --set train.max_steps=50`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Continue from the latest checkpoint in the output folder, or from the given checkpoint.
    #[arg(long, num_args = 0..=1, default_missing_value = "latest")]
    pub resume: Option<String>,
    /// Backend (overrides `train.backend`).
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    #[command(flatten)]
    pub judge: JudgeArgs,
}

/// How the generations of a run are judged.
#[derive(Args, Debug, Clone)]
pub struct JudgeArgs {
    /// OpenAI-compatible chat endpoint for an LLM judge (`http://host:port/v1` or
    /// `https://host/v1`); default: the rule-based judge.
    #[arg(long)]
    pub judge_url: Option<String>,
    /// Model name sent to the judge endpoint.
    #[arg(long, default_value = "judge")]
    pub judge_model: String,
    /// Environment variable holding the judge's API key (sent as a bearer token when set).
    #[arg(long, default_value = "DIPOLE_JUDGE_API_KEY")]
    pub judge_key_env: String,
    /// Seconds to wait for each judge reply.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    pub judge_timeout: u64,
}

impl JudgeArgs {
    pub fn llm(&self) -> Option<LlmJudge> {
        self.judge_url.as_ref().map(|url| LlmJudge {
            url: url.clone(),
            model: self.judge_model.clone(),
            api_key: std::env::var(&self.judge_key_env).ok().filter(|k| !k.is_empty()),
            timeout: std::time::Duration::from_secs(self.judge_timeout),
        })
    }
}

pub fn load_config(args: &TrainArgs, stage: Option<Stage>) -> Result<TrainConfig> {
    let base = TrainConfig::from_file(&args.config).map_err(|e| anyhow!(e))?;
    let mut config = base.with_overrides(&args.overrides).map_err(|e| anyhow!(e))?;
    if let Some(stage) = stage {
        config.train.stage = stage;
    }
    Ok(config)
}

pub fn backend_of(args: &TrainArgs, config: &TrainConfig) -> Result<BackendKind> {
    if let Some(b) = args.backend {
        return Ok(b);
    }
    Ok(config.train.backend)
}

pub fn run(args: TrainArgs, stage: Option<Stage>) -> Result<()> {
    let config = load_config(&args, stage)?;
    let backend = backend_of(&args, &config)?;
    let options = RunOptions {
        resume: args.resume.as_deref().map(|r| if r == "latest" { Resume::Latest } else { Resume::Path(PathBuf::from(r)) }),
        stop_after: None,
    };
    let judge = args.judge.llm();
    crate::with_backend!(backend, run_on(&config, &options, judge.as_ref()))
}

fn run_on<B: Backend>(device: &B::Device, config: &TrainConfig, options: &RunOptions, judge: Option<&LlmJudge>) -> Result<()> {
    let started = std::time::Instant::now();
    let summary = if config.train.gradient_checkpointing == dipole_train::GradientCheckpointing::Balanced {
        train::<Autodiff<B, burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing>>(config, options, device)
    } else {
        train::<Autodiff<B>>(config, options, device)
    }
    .map_err(|e| anyhow!(e))?;
    match summary.step_losses.last() {
        Some(loss) => eprintln!(
            "{} steps in {:.1}s; final loss {loss:.4}; {} written",
            summary.steps,
            started.elapsed().as_secs_f64(),
            summary.final_dir.display()
        ),
        // resumed from the last checkpoint of a run killed before its final weights were whole
        None => eprintln!("all {} steps were already done; {} written", summary.steps, summary.final_dir.display()),
    }
    if let Some(eval) = &summary.final_eval {
        for (k, v) in eval {
            eprintln!("  {k:<36} {v:.4}");
        }
    }
    crate::report::write_plots(config, &summary).context("writing the plots")?;
    if config.train.stage == dipole_train::Stage::Dpo && (summary.initial_eval.is_some() || summary.generations.is_some()) {
        let (_, table) = crate::report::run_report(config, &summary, judge)?;
        println!("\nbefore / after ({}):\n{table}", config.train.output_dir.join("report.md").display());
    }
    Ok(())
}
