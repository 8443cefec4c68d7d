//! `generations.jsonl`: answers of a trained model and its reference to the same prompts, one JSON
//! object per line. The trainer writes it at the end of a run (and `cargo xtask eval` with
//! `--generations`); the judges read it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// One prompt answered by the trained model (`policy`) and its reference (`reference`): one line of
/// `generations.jsonl`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    /// Record index of the prompt's row in the eval file (the rubric of the row judges the answers).
    pub index: usize,
    pub prompt: String,
    pub policy: String,
    pub reference: String,
}

/// Reads `generations.jsonl` (blank lines are skipped); a line that is not a [`Generation`] is an
/// error naming the file and the line.
pub fn read_generations(path: &Path) -> Result<Vec<Generation>> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| serde_json::from_str(line).map_err(|e| DataError::at(path, Some(i + 1), format!("not a generation: {e}"))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rows_and_names_the_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("generations.jsonl");
        let row = Generation { index: 3, prompt: "p".into(), policy: "a".into(), reference: "b".into() };
        std::fs::write(&path, format!("{}\n\n", serde_json::to_string(&row).unwrap())).unwrap();
        assert_eq!(read_generations(&path).unwrap(), vec![row]);

        std::fs::write(&path, "{\"index\": 0, \"prompt\": \"p\", \"policy\": \"a\", \"reference\": \"b\"}\n{\"index\": 1}\n").unwrap();
        let err = read_generations(&path).unwrap_err();
        assert_eq!(err.line(), Some(2), "{err}");
        assert!(err.to_string().contains("not a generation") && err.to_string().contains("missing field `prompt`"), "{err}");

        let err = read_generations(&dir.path().join("missing.jsonl")).unwrap_err();
        assert!(err.to_string().contains("missing.jsonl"), "{err}");
    }
}
