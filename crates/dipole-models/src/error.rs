use std::path::PathBuf;

/// Everything that can go wrong reading a Hugging Face model folder. Each variant names the file or
/// tensor involved and what was expected, so a user can fix the checkpoint without a debugger.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error(
        "{path}: unsupported model_type {found:?}; dipole supports \"llama\", \"mistral\" and \"qwen2\""
    )]
    UnknownModelType { path: PathBuf, found: String },
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{dir}: no weights found (expected model.safetensors or model.safetensors.index.json)")]
    NoWeights { dir: PathBuf },
    #[error("missing tensor {name:?} (expected shape {expected:?}) in {dir}")]
    MissingTensor {
        name: String,
        expected: Vec<usize>,
        dir: PathBuf,
    },
    #[error("tensor {name:?} in {path} has shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor {name:?} in {path} has dtype {dtype}; dipole reads F32, F16, BF16 and F64")]
    Dtype {
        name: String,
        path: PathBuf,
        dtype: String,
    },
    /// NaN or infinite weights: a checkpoint saved after a diverged run. Caught at load, where
    /// the file and tensor are known, instead of surfacing later as NaN losses or null log-probs.
    #[error("{path}: tensor {name:?} has {} (first at element {index}: {value})", non_finite_count(*.count))]
    NonFinite {
        path: PathBuf,
        name: String,
        count: usize,
        /// Row-major index of the first non-finite element.
        index: usize,
        /// That element as read: `NaN`, `inf`, `-inf`, or an F64 value beyond f32's range.
        value: String,
    },
    #[error("mixed precision {precision}: this backend cannot compute in {dtype} on {device}; use mixed_precision = \"no\" or another backend")]
    UnsupportedPrecision {
        precision: &'static str,
        dtype: String,
        device: String,
    },
    /// An adapter that cannot be read or does not fit the model.
    #[error(transparent)]
    Adapter(#[from] dipole_lora::LoraError),
    /// A model folder written out of its plan (tensors out of order, missing or of the wrong size).
    #[error("{dir}: {message}")]
    Write { dir: PathBuf, message: String },
    #[error("unexpected tensors in {dir} (not part of a {architecture} model): {names:?}")]
    Unexpected {
        dir: PathBuf,
        architecture: String,
        names: Vec<String>,
    },
}

/// "1 non-finite value", "3 non-finite values" (shared with the adapter check's message).
pub(crate) fn non_finite_count(count: usize) -> String {
    format!("{count} non-finite value{}", if count == 1 { "" } else { "s" })
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
