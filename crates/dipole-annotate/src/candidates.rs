//! Candidates to judge, read with dipole-data (JSONL, JSON or Parquet, a file or a folder of shards)
//! so that every bad row is reported by file and line:
//!
//! - `{prompt, responses: [r0, r1, ...]}`: several responses to one prompt. [`PairMode::All`] makes
//!   an item of every pair `(ri, rj)`, `i < j` (n responses give n(n-1)/2 items);
//!   [`PairMode::Adjacent`] ("best effort") only of neighbours `(r0, r1), (r1, r2), ...` (n - 1
//!   items, every response still judged, far fewer judgments for many responses).
//! - `{prompt, chosen, rejected}` (or TRL's implicit prompt, `{chosen, rejected}`): an existing
//!   pair, judged again; `chosen` becomes the item's first response, but annotators see the two in
//!   random order.
//!
//! Prompts and responses are plain text or lists of `{role, content}` messages, one style for the
//! whole candidate set (the export is a TRL dataset, which has one).

use std::path::{Path, PathBuf};

use dipole_data::record::{dataset_files, parse_row, raw_values};
use dipole_data::{Content, DataError, Format, Location, Row};
use serde_json::{Map, Value, json};

use crate::error::Result;

/// Which pairs of a `{prompt, responses}` row become items.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PairMode {
    /// Every pair of responses.
    #[default]
    All,
    /// Neighbouring responses only (`--pairs best-effort`).
    Adjacent,
}

/// One pair of responses to judge, as JSON the way TRL stores it (a string or a message list).
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub prompt: Value,
    pub first: Value,
    pub second: Value,
    /// Where it came from: `file:line` (or element / row), and which responses for a responses row.
    pub origin: String,
}

/// Every candidate of a dataset, in file order.
#[derive(Clone, Debug)]
pub struct Candidates {
    pub source: PathBuf,
    pub items: Vec<Candidate>,
}

impl Candidates {
    /// A digest of the items' contents (not of where they came from): the database keeps it to
    /// recognise the same candidate set on a restart.
    pub fn fingerprint(&self) -> String {
        let mut hasher = blake3::Hasher::new();
        for c in &self.items {
            let line = json!([c.prompt, c.first, c.second]).to_string();
            hasher.update(line.as_bytes());
            hasher.update(b"\n");
        }
        hasher.finalize().to_hex().to_string()
    }
}

/// Reads the candidates of a file or folder (format by extension unless given); the first bad row
/// is the error, named by file and line.
pub fn read_candidates(path: &Path, format: Option<Format>, pairs: PairMode) -> Result<Candidates> {
    let mut items = Vec::new();
    // whether the set is conversational, and the row that decided it
    let mut style: Option<(bool, String)> = None;
    for (file, format) in dataset_files(path, format)? {
        for (location, value) in raw_values(&file, format)? {
            let at = |reason: String| DataError::located(&file, Some(location), reason);
            let value = value.map_err(|e| at(e.0))?;
            let row = candidates_of(&value, &file, location, pairs).map_err(at)?;
            let conversational = row.first().is_some_and(|c| c.prompt.is_array());
            match &style {
                None => style = Some((conversational, origin(&file, location))),
                Some((first, from)) if *first != conversational => {
                    let (this, that) = if conversational { ("conversational", "standard") } else { ("standard", "conversational") };
                    return Err(at(format!("a {this} row in a {that} candidate set (set by {from}): use one style throughout")).into());
                }
                Some(_) => {}
            }
            items.extend(row);
        }
    }
    if items.is_empty() {
        return Err(DataError::located(path, None, "no candidates: the data holds no rows").into());
    }
    Ok(Candidates { source: path.to_path_buf(), items })
}

fn origin(file: &Path, location: Location) -> String {
    match location {
        Location::Line(n) => format!("{}:{n}", file.display()),
        other => format!("{} ({other})", file.display()),
    }
}

/// The items of one row; the error is the reason (the caller names file and line).
fn candidates_of(value: &Value, file: &Path, location: Location, pairs: PairMode) -> std::result::Result<Vec<Candidate>, String> {
    let Some(obj) = value.as_object() else {
        return Err("expected a JSON object with \"prompt\" and \"responses\" (or \"chosen\" and \"rejected\")".into());
    };
    let here = origin(file, location);
    if obj.contains_key("responses") {
        if obj.contains_key("chosen") || obj.contains_key("rejected") {
            return Err("a row has either \"responses\" or \"chosen\" and \"rejected\", not both".into());
        }
        return responses_row(obj, file, location, pairs, &here);
    }
    if !obj.contains_key("chosen") && !obj.contains_key("rejected") {
        return Err("expected \"responses\" (a list of two or more responses) or \"chosen\" and \"rejected\"".into());
    }
    match parse_row(value, 0, file, location).map_err(String::from)? {
        Row::Preference(r) => Ok(vec![Candidate { prompt: r.prompt.to_json(), first: r.chosen.to_json(), second: r.rejected.to_json(), origin: here }]),
        Row::Unpaired(_) => Err("an unpaired {prompt, completion} row: expected \"responses\" or \"chosen\" and \"rejected\"".into()),
    }
}

fn responses_row(obj: &Map<String, Value>, file: &Path, location: Location, pairs: PairMode, here: &str) -> std::result::Result<Vec<Candidate>, String> {
    let Some(Value::Array(responses)) = obj.get("responses") else {
        return Err("field \"responses\" must be a list of responses".into());
    };
    if responses.len() < 2 {
        return Err(format!("field \"responses\" holds {} response(s): a pair needs at least two", responses.len()));
    }
    let Some(prompt) = obj.get("prompt") else {
        return Err("missing field \"prompt\"".into());
    };
    // each response checked with its prompt as dipole-data checks a {prompt, completion} row
    let mut contents: Vec<Content> = Vec::with_capacity(responses.len());
    let mut prompt_content = None;
    for (i, response) in responses.iter().enumerate() {
        let probe = json!({"prompt": prompt, "completion": response});
        match parse_row(&probe, 0, file, location) {
            Ok(Row::Unpaired(r)) => {
                prompt_content.get_or_insert(r.prompt);
                contents.push(r.completion);
            }
            Ok(Row::Preference(_)) => unreachable!("a row with a completion parses as unpaired"),
            Err(e) => return Err(e.0.replace("\"completion\"", &format!("\"responses\"[{i}]")).replace("completion", &format!("responses[{i}]"))),
        }
    }
    let prompt = prompt_content.map(|p| p.to_json()).unwrap_or(Value::Null);
    let indices: Vec<(usize, usize)> = match pairs {
        PairMode::All => (0..contents.len()).flat_map(|i| (i + 1..contents.len()).map(move |j| (i, j))).collect(),
        PairMode::Adjacent => (1..contents.len()).map(|j| (j - 1, j)).collect(),
    };
    let mut items = Vec::with_capacity(indices.len());
    for (i, j) in indices {
        if contents[i] == contents[j] {
            return Err(format!("responses {i} and {j} are identical"));
        }
        let origin = format!("{here} responses {i},{j}");
        items.push(Candidate { prompt: prompt.clone(), first: contents[i].to_json(), second: contents[j].to_json(), origin });
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn err(path: &Path, pairs: PairMode) -> String {
        read_candidates(path, None, pairs).unwrap_err().to_string()
    }

    #[test]
    fn responses_rows_give_every_pair_or_neighbours() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "c.jsonl", "{\"prompt\": \"Q\", \"responses\": [\"r0\", \"r1\", \"r2\", \"r3\"]}\n");
        let all = read_candidates(&p, None, PairMode::All).unwrap();
        let got: Vec<(Value, Value)> = all.items.iter().map(|c| (c.first.clone(), c.second.clone())).collect();
        let want: Vec<(Value, Value)> = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
            .iter()
            .map(|(i, j)| (json!(format!("r{i}")), json!(format!("r{j}"))))
            .collect();
        assert_eq!(got, want);
        assert!(all.items[1].origin.ends_with("c.jsonl:1 responses 0,2"), "{}", all.items[1].origin);
        let adjacent = read_candidates(&p, None, PairMode::Adjacent).unwrap();
        let got: Vec<Value> = adjacent.items.iter().map(|c| c.second.clone()).collect();
        assert_eq!(got, vec![json!("r1"), json!("r2"), json!("r3")]);
        assert_ne!(all.fingerprint(), adjacent.fingerprint());
    }

    #[test]
    fn trl_pairs_and_conversational_prompts_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let rows = [
            json!({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                   "chosen": [{"role": "assistant", "content": "Hello"}], "rejected": [{"role": "assistant", "content": "Go away"}]}),
            json!({"prompt": [{"role": "user", "content": "2+2?"}],
                   "responses": [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]]}),
        ];
        let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
        let p = write(dir.path(), "c.jsonl", &text);
        let c = read_candidates(&p, None, PairMode::All).unwrap();
        assert_eq!(c.items.len(), 2);
        assert_eq!(c.items[0].prompt, rows[0]["prompt"]);
        assert_eq!(c.items[0].first, rows[0]["chosen"]);
        assert_eq!(c.items[0].second, rows[0]["rejected"]);
        assert_eq!(c.items[1].second, json!([{"role": "assistant", "content": "5"}]));
        // the same rows as a JSON array: the same candidate set
        let q = write(dir.path(), "c.json", &serde_json::to_string(&rows).unwrap());
        assert_eq!(read_candidates(&q, None, PairMode::All).unwrap().fingerprint(), c.fingerprint());
    }

    /// A Parquet file as Hugging Face `datasets` writes one: `prompt: string`, `responses: list<string>`.
    #[test]
    fn parquet_candidates_read_as_jsonl_ones() {
        use std::sync::Arc;

        use arrow_array::builder::{ListBuilder, StringBuilder};
        use arrow_array::{ArrayRef, RecordBatch, StringArray};

        let dir = tempfile::tempdir().unwrap();
        let rows = [("Q1", vec!["a", "b", "c"]), ("Q2", vec!["d", "e"])];
        let text: String = rows.iter().map(|(p, r)| format!("{}\n", json!({"prompt": p, "responses": r}))).collect();
        let jsonl = write(dir.path(), "c.jsonl", &text);
        let prompts: ArrayRef = Arc::new(StringArray::from(rows.iter().map(|(p, _)| *p).collect::<Vec<_>>()));
        let mut responses = ListBuilder::new(StringBuilder::new());
        for (_, r) in &rows {
            for x in r {
                responses.values().append_value(x);
            }
            responses.append(true);
        }
        let responses: ArrayRef = Arc::new(responses.finish());
        let batch = RecordBatch::try_from_iter([("prompt", prompts), ("responses", responses)]).unwrap();
        let parquet = dir.path().join("c.parquet");
        let mut writer = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&parquet).unwrap(), batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let a = read_candidates(&jsonl, None, PairMode::All).unwrap();
        let b = read_candidates(&parquet, None, PairMode::All).unwrap();
        assert_eq!(a.items.len(), 4);
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert!(b.items[3].origin.ends_with("c.parquet (row 1) responses 0,1"), "{}", b.items[3].origin);
    }

    #[test]
    fn bad_rows_are_named_by_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let ok = "{\"prompt\": \"Q\", \"responses\": [\"a\", \"b\"]}\n";
        let cases = [
            ("{\"prompt\": \"Q\", \"responses\": [\"a\"]}", "holds 1 response(s)"),
            ("{\"prompt\": \"Q\", \"responses\": [\"a\", \"\"]}", "field \"responses\"[1] is empty"),
            ("{\"prompt\": \"Q\", \"responses\": [\"a\", \"b\", \"a\"]}", "responses 0 and 2 are identical"),
            ("{\"responses\": [\"a\", \"b\"]}", "missing field \"prompt\""),
            ("{\"prompt\": \"Q\", \"responses\": \"a\"}", "must be a list"),
            ("{\"prompt\": \"Q\"}", "expected \"responses\""),
            ("{\"prompt\": \"Q\", \"completion\": \"a\", \"chosen\": \"x\", \"rejected\": \"y\"}", "unpaired"),
            ("{\"prompt\": \"Q\", \"chosen\": \"x\", \"rejected\": \"x\"}", "identical"),
            ("[1, 2]", "expected a JSON object"),
            ("{\"prompt\": \"Q\", \"responses\": [\"a\", \"b\"", "not valid JSON"),
            ("{\"prompt\": [{\"role\": \"user\", \"content\": \"Q\"}], \"responses\": [[{\"role\": \"assistant\", \"content\": \"a\"}], [{\"role\": \"assistant\", \"content\": \"b\"}]]}", "a conversational row in a standard candidate set"),
            ("{\"prompt\": \"Q\", \"responses\": [\"a\", [{\"role\": \"assistant\", \"content\": \"b\"}]]}", "mix plain text and message lists"),
        ];
        for (row, want) in cases {
            let p = write(dir.path(), "bad.jsonl", &format!("{ok}\n{row}\n"));
            let e = err(&p, PairMode::All);
            assert!(e.contains("bad.jsonl:3: "), "{row}: {e}");
            assert!(e.contains(want), "{row}: {e} lacks {want:?}");
        }
        let empty = write(dir.path(), "empty.jsonl", "\n");
        assert!(err(&empty, PairMode::All).contains("no candidates"));
        assert!(err(&dir.path().join("missing.jsonl"), PairMode::All).contains("no such file"));
    }
}
