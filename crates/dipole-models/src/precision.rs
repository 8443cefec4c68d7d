//! Mixed precision the way PyTorch's autocast does it: the parameters (the master copy the optimiser
//! updates) stay f32; every matmul runs on half-precision casts of its input and weights; RMSNorm,
//! the attention softmax, the residual stream and the logits handed to the log-probs stay f32.
//! Gradients flow back through the casts, so the parameters' gradients arrive in f32.

use std::fmt;
use std::str::FromStr;

use burn::tensor::DType;
use serde::{Deserialize, Serialize};

/// `train.mixed_precision`: which dtype the matmuls compute in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixedPrecision {
    /// Everything in the weights' dtype (f32 for trained models).
    #[default]
    No,
    /// bfloat16 matmuls: f32's exponent range, so no loss scaling is needed.
    Bf16,
    /// float16 matmuls: needs dynamic loss scaling against gradient underflow (the trainer does it).
    Fp16,
}

impl MixedPrecision {
    pub const NAMES: [&'static str; 3] = ["no", "bf16", "fp16"];

    /// The matmul dtype, `None` when off.
    pub fn compute_dtype(self) -> Option<DType> {
        match self {
            MixedPrecision::No => None,
            MixedPrecision::Bf16 => Some(DType::BF16),
            MixedPrecision::Fp16 => Some(DType::F16),
        }
    }

    /// An error naming the dtype when `B` cannot compute in it on `device` (burn's ndarray backend has
    /// no half types; WGSL has no bf16).
    pub fn check_backend<B: burn::tensor::backend::Backend>(self, device: &B::Device) -> Result<(), crate::ModelError> {
        match self.compute_dtype() {
            Some(dtype) if !B::supports_dtype(device, dtype) => Err(crate::ModelError::UnsupportedPrecision {
                precision: self.name(),
                dtype: format!("{dtype:?}"),
                device: format!("{device:?}"),
            }),
            _ => Ok(()),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            MixedPrecision::No => "no",
            MixedPrecision::Bf16 => "bf16",
            MixedPrecision::Fp16 => "fp16",
        }
    }
}

impl fmt::Display for MixedPrecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for MixedPrecision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "no" | "fp32" => Ok(MixedPrecision::No),
            "bf16" => Ok(MixedPrecision::Bf16),
            "fp16" => Ok(MixedPrecision::Fp16),
            other => Err(format!("unknown mixed precision {other:?}; expected one of no, bf16, fp16")),
        }
    }
}
