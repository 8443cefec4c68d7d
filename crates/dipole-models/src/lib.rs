//! Llama, Mistral and Qwen2 decoder-only language models for burn, loaded from Hugging Face model
//! folders (`config.json` + safetensors) by their HF tensor names, generic over the backend.
//!
//! ```no_run
//! use burn::backend::Flex;
//! use dipole_models::CausalLm;
//! let device = Default::default();
//! let (model, _report) = CausalLm::<Flex>::load("path/to/hf-model", &device).unwrap();
//! ```

pub mod adapters;
pub mod checkpointing;
pub mod config;
pub mod error;
pub mod export;
pub mod fused;
pub mod generate;
pub mod hf_writer;
pub mod llama;
pub mod load;
pub mod packing;
pub mod precision;
pub mod rng;
pub mod rope;
pub mod weights;

pub use checkpointing::{GradientSink, LayerTape, give_gradients};
pub use config::{Architecture, LlamaShape, ModelConfig, RopeConfig, RopeScaling};
pub use error::{ModelError, Result};
pub use export::{ExportDtype, merge_checkpoint};
pub use generate::GenerateOptions;
pub use hf_writer::{HfWriter, TensorSpec, write_random_init};
pub use llama::{CausalLm, KvCache, PrefixPlan, ids_tensor, is_cpu_backend, shared_prefixes, worth_rearranging};
pub use precision::MixedPrecision;
pub use packing::PackPlan;
pub use load::{LoadReport, MatrixDtype, ParamKind, RandomInit, WeightSource};
pub use weights::Checkpoint;
