//! LoRA for burn models, compatible with Python's `peft` in both directions: the linear layer every
//! dipole projection is built from, adapter configuration with PEFT's targeting rules, and PEFT's
//! `adapter_config.json` + `adapter_model.safetensors` format.

pub mod config;
pub mod error;
pub mod linear;
pub mod peft;
pub mod rng;

pub use config::{LoraConfig, LoraInit, TargetModules};
pub use error::{LoraError, Result};
pub use linear::{AdapterMode, LoraAdapter, LoraLinear, cast_to, transpose};
pub use peft::{PeftAdapter, PeftMatrices, decode_f32, write_atomic};
