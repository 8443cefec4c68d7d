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
    #[error("unexpected tensors in {dir} (not part of a {architecture} model): {names:?}")]
    Unexpected {
        dir: PathBuf,
        architecture: String,
        names: Vec<String>,
    },
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
