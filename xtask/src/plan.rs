//! `cargo xtask plan`: the memory a training config's run will need, before it runs.

use std::path::PathBuf;

use anyhow::{Result, anyhow};
use clap::Args;
use dipole_train::TrainConfig;
use dipole_train::plan::RunShape;

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Run configuration (TOML), as `cargo xtask train` takes it.
    #[arg(long, default_value = "configs/default.toml")]
    pub config: PathBuf,
    /// Override a config key: `--set train.batch_size=4 --set data.max_length=2048`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Memory to fit in (`24GiB`, `40GB`, `16000MiB`): says whether the run fits, and the largest
    /// batch size and `data.max_length` that do.
    #[arg(long, value_parser = crate::flags::memory_size)]
    pub budget: Option<f64>,
}

pub fn run(args: PlanArgs) -> Result<()> {
    let config = TrainConfig::from_file(&args.config).and_then(|c| c.with_overrides(&args.overrides)).map_err(|e| anyhow!(e))?;
    let shape = RunShape::of(&config).map_err(|e| anyhow!(e))?;
    let rows = shape.rows;
    println!(
        "{} ({:.2} B parameters), batch_size {}, {} shard(s), longest rows {} + {} tokens",
        config.model.path.display(),
        shape.model.num_parameters() as f64 / 1e9,
        config.train.batch_size,
        shape.shards.clamp(1, config.train.batch_size),
        rows.prompt,
        rows.completion
    );
    let plan = shape.plan(&config).map_err(|e| anyhow!(e))?;
    println!("{plan}");
    if let Some(budget) = args.budget {
        let fit = shape.fit(&config, budget).map_err(|e| anyhow!(e))?;
        let gib = budget / (1u64 << 30) as f64;
        let or_none = |v: Option<usize>| v.map_or("none".to_string(), |v| v.to_string());
        println!(
            "budget {gib:.1} GiB: {}; largest train.batch_size that fits {}, largest data.max_length {}",
            if fit.fits { "fits" } else { "does not fit" },
            or_none(fit.batch_size),
            or_none(fit.max_length)
        );
    }
    Ok(())
}
