use std::path::PathBuf;
use std::time::Duration;

use dipole_data::DataError;

/// Everything that can go wrong judging, reporting or plotting.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Reading `generations.jsonl` or the eval rows the rubrics come from.
    #[error(transparent)]
    Data(#[from] DataError),
    /// Writing a report or a plot.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Serialising `report.json`.
    #[error("report.json: {0}")]
    Serialize(#[source] serde_json::Error),
    /// The LLM judge failed on one prompt.
    #[error("LLM judge at {url}, prompt {prompt}: {failure}")]
    Judge { url: String, prompt: usize, failure: JudgeFailure },
    /// Nothing to plot: the run logged no line.
    #[error("no logged metrics to plot (the run's log history is empty)")]
    EmptyHistory,
}

impl EvalError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EvalError::Io { path: path.into(), source }
    }
}

/// Why one request to the LLM judge gave no verdict.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum JudgeFailure {
    /// No response: the URL is malformed, the host is unknown, the connection was refused or
    /// dropped, TLS failed.
    #[error("request failed: {0}")]
    Request(String),
    /// No complete response within `LlmJudge::timeout`.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The server answered with a status outside 2xx.
    #[error("HTTP {status}: {body}")]
    Status {
        status: u16,
        /// The start of the response body.
        body: String,
    },
    /// The response is not an OpenAI chat completion (not JSON, or no `choices[0].message.content`).
    #[error("the response is not a chat completion ({reason}): {body}")]
    BadResponse {
        reason: String,
        /// The start of the response body.
        body: String,
    },
    /// The judge's message is not the verdict object of `JUDGE_SYSTEM_PROMPT`.
    #[error("{reason}; the judge replied {reply:?}")]
    BadVerdict {
        reason: String,
        /// The start of the judge's message.
        reply: String,
    },
}

pub type Result<T, E = EvalError> = std::result::Result<T, E>;

/// The first `max` characters of `text`, with `...` when cut.
pub(crate) fn excerpt(text: &str, max: usize) -> String {
    let mut chars = text.chars();
    let head: String = chars.by_ref().take(max).collect();
    if chars.next().is_some() { format!("{head}...") } else { head }
}
