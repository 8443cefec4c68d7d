use std::fmt;
use std::path::{Path, PathBuf};

/// A data problem, located: the file, the 1-based line (or Parquet row) when there is one, and why.
#[derive(Debug)]
pub struct DataError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub reason: String,
}

impl DataError {
    pub fn at(path: &Path, line: Option<usize>, reason: String) -> Self {
        Self {
            path: path.to_path_buf(),
            line,
            reason,
        }
    }

    pub fn io(path: &Path, e: std::io::Error) -> Self {
        Self::at(path, None, e.to_string())
    }
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.path.display(), line, self.reason),
            None => write!(f, "{}: {}", self.path.display(), self.reason),
        }
    }
}

impl std::error::Error for DataError {}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
