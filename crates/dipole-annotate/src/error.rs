use std::path::PathBuf;

use dipole_data::DataError;

/// Everything that can go wrong while annotating; the server turns each into an HTTP status and a
/// JSON `{"error": ...}` body ([`AnnotateError::status`]). Each message is complete on its own (the
/// underlying SQLite or I/O error is part of it, not a separate `source`).
#[derive(Debug, thiserror::Error)]
pub enum AnnotateError {
    /// A candidates file that cannot be read, or a row that is not a candidate (file and line).
    #[error(transparent)]
    Data(#[from] DataError),
    /// SQLite refused an operation on the database file.
    #[error("{}: {cause}", path.display())]
    Database { path: PathBuf, cause: rusqlite::Error },
    /// The file is an SQLite database, but not one this crate made.
    #[error("{}: {reason}", path.display())]
    NotAnnotationDb { path: PathBuf, reason: String },
    /// The database already holds items, and the candidates given are a different set.
    #[error(
        "{}: the database holds {held} items from {held_source}, and {} gives a different candidate set ({given} items): \
         use a new --db for new candidates, or pass the original file",
        db.display(),
        data.display()
    )]
    CandidatesMismatch { db: PathBuf, data: PathBuf, held: usize, held_source: String, given: usize },
    #[error("{}: no such annotation database", path.display())]
    NoDatabase { path: PathBuf },
    #[error("invalid annotator name {name:?}: use letters, digits, '_', '-' or '.', at most 64 characters")]
    AnnotatorName { name: String },
    #[error("no annotators: pass --annotators NAME,NAME,...")]
    NoAnnotators,
    #[error("missing \"Authorization: Bearer TOKEN\" header")]
    MissingToken,
    #[error("unknown token")]
    UnknownToken,
    #[error("no item {item}")]
    NoSuchItem { item: i64 },
    #[error("{annotator} has already judged item {item}: undo it first to change the choice")]
    AlreadyJudged { annotator: String, item: i64 },
    #[error("{annotator} has no judgment to undo")]
    NothingToUndo { annotator: String },
    /// A request body or parameter that is not what the API expects.
    #[error("{0}")]
    BadRequest(String),
    /// An option out of its range (export thresholds, per-item counts).
    #[error("{0}")]
    InvalidOption(String),
    #[error("no random bytes for a token: {0}")]
    Random(getrandom::Error),
    #[error("{}: {cause}", path.display())]
    Io { path: PathBuf, cause: std::io::Error },
    /// The server could not bind its address, or stopped on a socket error.
    #[error("{context}: {cause}")]
    Server { context: String, cause: std::io::Error },
}

impl AnnotateError {
    /// The HTTP status the API answers this error with.
    pub fn status(&self) -> u16 {
        match self {
            AnnotateError::MissingToken | AnnotateError::UnknownToken => 401,
            AnnotateError::NoSuchItem { .. } | AnnotateError::NothingToUndo { .. } => 404,
            AnnotateError::AlreadyJudged { .. } => 409,
            AnnotateError::BadRequest(_) | AnnotateError::InvalidOption(_) | AnnotateError::AnnotatorName { .. } => 400,
            _ => 500,
        }
    }

    pub(crate) fn db(path: &std::path::Path) -> impl FnOnce(rusqlite::Error) -> AnnotateError + '_ {
        move |cause| AnnotateError::Database { path: path.to_path_buf(), cause }
    }
}

pub type Result<T, E = AnnotateError> = std::result::Result<T, E>;
