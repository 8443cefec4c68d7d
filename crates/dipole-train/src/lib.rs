//! Training and scoring over any burn backend: dataset log-probs today; SFT and the DPO family
//! build on the same batch path.

pub mod logps;
pub mod step;

pub use logps::{BatchTensors, PairLogps, pair_logps};
pub mod grads;
pub mod schedule;
pub use step::{Reference, StepOutput, preference_step};
