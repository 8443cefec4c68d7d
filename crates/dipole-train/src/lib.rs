//! Training and scoring over any burn backend: SFT and every preference objective of dipole-loss,
//! LoRA or full fine-tuning, with TRL's optimisation semantics.

pub mod alloc;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod evaluate;
mod examples;
pub mod grads;
pub mod logps;
pub mod manifest;
pub mod metrics;
pub mod memory;
pub mod optim;
pub mod plan;
pub mod precompute;
mod reference;
pub mod sampler;
pub mod scaler;
pub mod schedule;
pub mod step;
pub mod trainer;

pub use error::{TrainError, TrainResult};
pub use config::{GradientCheckpointing, ReferenceStrategy, Stage, TrainConfig, WeightDtype};
pub use evaluate::{EvalReference, EvalSettings, evaluate_pairs};
pub use optim::FusedAdamW;
pub use logps::{BatchTensors, PairLogps, pair_logps};
pub use step::{Reference, StepContext, StepOutput, TrainStep, batch_shards, objective_on_batch, preference_step, reference_logps, sft_on_batch, sft_step, sharded_model_logps};
pub use trainer::{Resume, RunOptions, TrainSummary, train};
