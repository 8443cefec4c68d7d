//! `cargo xtask train` / `sft`: run a training config on the chosen backend.

use std::path::PathBuf;

use anyhow::{Result, anyhow};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use clap::Args;
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
    <BackendKind as clap::ValueEnum>::from_str(&config.train.backend, true)
        .map_err(|_| anyhow!("train.backend = {:?}: expected cpu, ndarray, wgpu, vulkan, metal or cuda", config.train.backend))
}

pub fn run(args: TrainArgs, stage: Option<Stage>) -> Result<()> {
    let config = load_config(&args, stage)?;
    let backend = backend_of(&args, &config)?;
    let options = RunOptions {
        resume: args.resume.as_deref().map(|r| if r == "latest" { Resume::Latest } else { Resume::Path(PathBuf::from(r)) }),
        stop_after: None,
    };
    crate::with_backend!(backend, run_on(&config, &options))
}

fn run_on<B: Backend>(device: &B::Device, config: &TrainConfig, options: &RunOptions) -> Result<()> {
    let started = std::time::Instant::now();
    let summary = train::<Autodiff<B>>(config, options, device).map_err(|e| anyhow!(e))?;
    eprintln!(
        "{} steps in {:.1}s; final loss {:.4}; {} written",
        summary.steps,
        started.elapsed().as_secs_f64(),
        summary.step_losses.last().copied().unwrap_or(f64::NAN),
        summary.final_dir.display()
    );
    if let Some(eval) = &summary.final_eval {
        for (k, v) in eval {
            eprintln!("  {k:<28} {v:.4}");
        }
    }
    Ok(())
}
