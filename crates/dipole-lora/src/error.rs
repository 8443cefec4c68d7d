use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("{path}: {source}", path = .0.display(), source = .1)]
    Io(PathBuf, #[source] std::io::Error),
    /// A problem with an adapter file, naming the file.
    #[error("{path}: {message}", path = .0.display(), message = .1)]
    File(PathBuf, String),
    /// A LoRA option out of range, naming the option.
    #[error("LoRA config: {0}")]
    Config(String),
    /// An adapter that does not fit the model it is loaded onto, naming the module.
    #[error("adapter does not fit the model: {0}")]
    Mismatch(String),
}

impl LoraError {
    pub fn io(path: &Path, e: std::io::Error) -> Self {
        LoraError::Io(path.to_path_buf(), e)
    }
}

pub type Result<T, E = LoraError> = std::result::Result<T, E>;
