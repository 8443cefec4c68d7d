use std::fmt;
use std::path::{Path, PathBuf};

/// Where in a file a problem is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// 1-based line of a JSONL file.
    Line(usize),
    /// 0-based element of a JSON array.
    Element(usize),
    /// 0-based row of a Parquet file.
    Row(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Line(n) => write!(f, "line {n}"),
            Location::Element(n) => write!(f, "element {n}"),
            Location::Row(n) => write!(f, "row {n}"),
        }
    }
}

/// A data problem, located: the file, the line (or JSON element, or Parquet row) when there is one,
/// and why.
#[derive(Clone, Debug)]
pub struct DataError {
    pub path: PathBuf,
    pub location: Option<Location>,
    pub reason: String,
}

impl DataError {
    /// A problem at a JSONL line (`None`: the file as a whole).
    pub fn at(path: &Path, line: Option<usize>, reason: String) -> Self {
        Self::located(path, line.map(Location::Line), reason)
    }

    pub fn located(path: &Path, location: Option<Location>, reason: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            location,
            reason: reason.into(),
        }
    }

    pub fn io(path: &Path, e: std::io::Error) -> Self {
        Self::at(path, None, e.to_string())
    }

    /// The 1-based JSONL line, when the problem is at one.
    pub fn line(&self) -> Option<usize> {
        match self.location {
            Some(Location::Line(n)) => Some(n),
            _ => None,
        }
    }
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Some(Location::Line(line)) => write!(f, "{}:{}: {}", self.path.display(), line, self.reason),
            Some(loc) => write!(f, "{} ({loc}): {}", self.path.display(), self.reason),
            None => write!(f, "{}: {}", self.path.display(), self.reason),
        }
    }
}

impl std::error::Error for DataError {}

/// What is wrong with one row or cell, before the caller names its file and line
/// ([`DataError::located`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RowError(pub String);

impl From<String> for RowError {
    fn from(reason: String) -> Self {
        RowError(reason)
    }
}

impl From<RowError> for String {
    fn from(e: RowError) -> Self {
        e.0
    }
}

impl From<&str> for RowError {
    fn from(reason: &str) -> Self {
        RowError(reason.to_string())
    }
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
