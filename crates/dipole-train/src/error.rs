//! What can stop a run, each naming the file, key or step involved.

use std::path::{Path, PathBuf};

use crate::config::{ConfigError, InvalidConfig};

type Source = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    InvalidConfig(#[from] InvalidConfig),
    #[error(transparent)]
    Model(#[from] dipole_models::ModelError),
    #[error(transparent)]
    Data(#[from] dipole_data::DataError),
    #[error(transparent)]
    Lora(#[from] dipole_lora::LoraError),
    /// What a config key names (an adapter folder, a precision) cannot be used.
    #[error("{key}: {source}")]
    Key { key: &'static str, source: Source },
    /// Reading or writing a file of the run (weights, state, metrics, caches) failed.
    #[error("{}: {source}", path.display())]
    File { path: PathBuf, source: Source },
    /// A checkpoint or cache that is damaged, incomplete, or not this run's.
    #[error("{}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },
    /// `--resume` cannot go on from the checkpoint it names.
    #[error("--resume {}: {reason}", path.display())]
    Resume { path: PathBuf, reason: String },
    /// The run cannot go on: it diverged, a batch cannot fit in memory, the data leaves nothing to
    /// train on.
    #[error("{0}")]
    Run(String),
}

pub type TrainResult<T> = Result<T, TrainError>;

/// Wraps an error that happened at `path` (an I/O, JSON or record error).
pub fn at<E: Into<Source>>(path: &Path) -> impl FnOnce(E) -> TrainError + '_ {
    move |e| TrainError::File { path: path.to_path_buf(), source: e.into() }
}

impl TrainError {
    /// A value out of range or keys that cannot work together (see [`InvalidConfig`]).
    pub fn invalid(message: impl Into<String>) -> Self {
        TrainError::InvalidConfig(InvalidConfig::Value(message.into()))
    }

    /// Wraps an error caused by what config `key` names.
    pub fn key<E: Into<Source>>(key: &'static str) -> impl FnOnce(E) -> TrainError {
        move |e| TrainError::Key { key, source: e.into() }
    }

    pub fn checkpoint(path: &Path, reason: impl Into<String>) -> Self {
        TrainError::Checkpoint { path: path.to_path_buf(), reason: reason.into() }
    }

    pub fn resume(path: &Path, reason: impl Into<String>) -> Self {
        TrainError::Resume { path: path.to_path_buf(), reason: reason.into() }
    }
}
