//! Records in TRL's dataset formats, read from JSONL, JSON or Parquet (a file or a folder of shards),
//! with every bad row reported by file and line (or element / row), never silently dropped.
//!
//! - preference, explicit prompt: `{prompt, chosen, rejected}`;
//! - preference, implicit prompt: `{chosen, rejected}` whose common beginning is the prompt (TRL's
//!   `extract_prompt`);
//! - unpaired (KTO): `{prompt, completion, label: bool}`.
//!
//! Each field is a string (standard) or a list of `{role, content}` messages (conversational), one
//! format per file; roles are those of [`ROLES`]. Extra columns are kept out of the way and ignored.
//! A key given twice, or a JSONL line that is not UTF-8, is that row's error.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::RowError;
use crate::error::{DataError, Location, Result};
use crate::json;

/// The fields that hold text or messages.
pub const CONTENT_FIELDS: &[&str] = &["prompt", "chosen", "rejected", "completion"];

/// Message roles a record may use. Not "tool": a [`Message`] has no tool calls or call ids, so a
/// tool turn would reach the chat template without what it answers.
pub const ROLES: &[&str] = &["system", "user", "assistant"];

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A field's content: plain text (TRL's "standard" format) or a list of messages ("conversational").
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    Text(String),
    Messages(Vec<Message>),
}

impl Content {
    pub fn is_conversational(&self) -> bool {
        matches!(self, Content::Messages(_))
    }

    /// As JSON, the way TRL's datasets store it.
    pub fn to_json(&self) -> Value {
        match self {
            Content::Text(s) => Value::String(s.clone()),
            Content::Messages(m) => Value::Array(
                m.iter()
                    .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
                    .collect(),
            ),
        }
    }
}

/// A `{prompt, chosen, rejected}` preference pair, with where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct PreferenceRecord {
    /// Position among the dataset's valid records.
    pub index: usize,
    pub path: PathBuf,
    pub location: Location,
    pub prompt: Content,
    pub chosen: Content,
    pub rejected: Content,
}

impl PreferenceRecord {
    /// The 1-based JSONL line, when read from JSONL.
    pub fn line(&self) -> Option<usize> {
        match self.location {
            Location::Line(n) => Some(n),
            _ => None,
        }
    }
}

/// An unpaired `{prompt, completion}` example: with a `label` for KTO, without one for SFT.
#[derive(Clone, Debug, PartialEq)]
pub struct UnpairedRecord {
    pub index: usize,
    pub path: PathBuf,
    pub location: Location,
    pub prompt: Content,
    pub completion: Content,
    /// `Some(true)`: desirable, `Some(false)`: undesirable, `None`: a plain SFT example.
    pub label: Option<bool>,
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn parse_content(obj: &Map<String, Value>, key: &str) -> std::result::Result<Content, String> {
    match obj.get(key) {
        None => Err(format!("missing field \"{key}\"")),
        Some(Value::String(s)) if s.trim().is_empty() => Err(format!("field \"{key}\" is empty")),
        Some(Value::String(s)) => Ok(Content::Text(s.clone())),
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return Err(format!("field \"{key}\" is an empty message list"));
            }
            let mut messages = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let Some(m) = item.as_object() else {
                    return Err(format!(
                        "field \"{key}\" message {i} is {}, expected an object with \"role\" and \"content\"",
                        json_kind(item)
                    ));
                };
                let role = match m.get("role") {
                    Some(Value::String(r)) if ROLES.contains(&r.as_str()) => r.clone(),
                    Some(Value::String(r)) if r.is_empty() => return Err(format!("field \"{key}\" message {i} has an empty \"role\"")),
                    // templates branch on the role: an unknown one is dropped or misrendered silently
                    Some(Value::String(r)) => {
                        let roles: Vec<String> = ROLES.iter().map(|r| format!("\"{r}\"")).collect();
                        return Err(format!("field \"{key}\" message {i} has role {r:?}: expected one of {}", roles.join(", ")));
                    }
                    Some(other) => {
                        return Err(format!("field \"{key}\" message {i}: \"role\" must be a string, found {}", json_kind(other)));
                    }
                    None => return Err(format!("field \"{key}\" message {i} has no \"role\"")),
                };
                let content = match m.get("content") {
                    Some(Value::String(c)) => c.clone(),
                    Some(other) => {
                        return Err(format!("field \"{key}\" message {i}: \"content\" must be a string, found {}", json_kind(other)));
                    }
                    None => return Err(format!("field \"{key}\" message {i} has no \"content\"")),
                };
                messages.push(Message { role, content });
            }
            Ok(Content::Messages(messages))
        }
        Some(other) => Err(format!(
            "field \"{key}\" must be a string or a list of messages, found {}",
            json_kind(other)
        )),
    }
}

/// TRL's `extract_prompt`: the prompt is the longest common beginning of chosen and rejected (whole
/// messages for conversations; for text, backed off to before a shared trailing space).
fn extract_prompt(chosen: Content, rejected: Content) -> std::result::Result<(Content, Content, Content), String> {
    match (chosen, rejected) {
        (Content::Messages(c), Content::Messages(r)) => {
            let n = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
            if n == 0 {
                return Err("no \"prompt\" field and chosen/rejected share no leading messages to take it from".into());
            }
            if n == c.len() || n == r.len() {
                return Err("no \"prompt\" field and chosen or rejected has nothing after the shared messages".into());
            }
            Ok((Content::Messages(c[..n].to_vec()), Content::Messages(c[n..].to_vec()), Content::Messages(r[n..].to_vec())))
        }
        (Content::Text(c), Content::Text(r)) => {
            let mut idx = c.char_indices().zip(r.char_indices()).take_while(|((_, a), (_, b))| a == b).count();
            // char count -> byte offset
            let mut byte = c.char_indices().nth(idx).map(|(b, _)| b).unwrap_or(c.len());
            if idx > 0 && c[..byte].ends_with(' ') {
                idx -= 1;
                byte = c.char_indices().nth(idx).map(|(b, _)| b).unwrap_or(0);
            }
            if byte == 0 {
                return Err("no \"prompt\" field and chosen/rejected share no beginning to take it from".into());
            }
            if byte >= c.len() || byte >= r.len() {
                return Err("no \"prompt\" field and chosen or rejected has nothing after the shared beginning".into());
            }
            Ok((Content::Text(c[..byte].to_string()), Content::Text(c[byte..].to_string()), Content::Text(r[byte..].to_string())))
        }
        _ => Err("chosen and rejected mix plain text and message lists".into()),
    }
}

/// A parsed row of any supported kind.
#[derive(Clone, Debug, PartialEq)]
pub enum Row {
    Preference(PreferenceRecord),
    Unpaired(UnpairedRecord),
}

/// Checks one JSON object as a record; the error is the reason (the caller knows where).
pub fn parse_row(value: &Value, index: usize, path: &Path, location: Location) -> std::result::Result<Row, RowError> {
    row_of(value, index, path, location).map_err(RowError)
}

fn row_of(value: &Value, index: usize, path: &Path, location: Location) -> std::result::Result<Row, String> {
    let Some(obj) = value.as_object() else {
        return Err(format!("expected a JSON object, found {}", json_kind(value)));
    };
    if obj.contains_key("completion") || obj.contains_key("label") {
        let prompt = parse_content(obj, "prompt")?;
        let completion = parse_content(obj, "completion")?;
        let label = match obj.get("label") {
            Some(Value::Bool(b)) => Some(*b),
            Some(other) => return Err(format!("field \"label\" must be true or false, found {}", json_kind(other))),
            None => None,
        };
        if prompt.is_conversational() != completion.is_conversational() {
            return Err("prompt and completion mix plain text and message lists".into());
        }
        return Ok(Row::Unpaired(UnpairedRecord { index, path: path.to_path_buf(), location, prompt, completion, label }));
    }
    let chosen = parse_content(obj, "chosen")?;
    let rejected = parse_content(obj, "rejected")?;
    let (prompt, chosen, rejected) = if obj.contains_key("prompt") {
        (parse_content(obj, "prompt")?, chosen, rejected)
    } else {
        extract_prompt(chosen, rejected)?
    };
    if prompt.is_conversational() != chosen.is_conversational() || chosen.is_conversational() != rejected.is_conversational() {
        return Err("prompt, chosen and rejected mix plain text and message lists".into());
    }
    if chosen == rejected {
        return Err("chosen and rejected are identical".into());
    }
    Ok(Row::Preference(PreferenceRecord { index, path: path.to_path_buf(), location, prompt, chosen, rejected }))
}

/// File formats, chosen by extension unless given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Json,
    Parquet,
}

impl Format {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "jsonl" | "ndjson" => Some(Format::Jsonl),
            "json" => Some(Format::Json),
            "parquet" => Some(Format::Parquet),
            _ => None,
        }
    }

    pub fn of(path: &Path) -> Option<Self> {
        Self::parse(path.extension()?.to_str()?)
    }
}

/// Options for reading records.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReadOptions {
    /// Force a format instead of going by extension.
    pub format: Option<Format>,
    /// Skip bad rows (each one is reported in [`Rows::skipped`]) instead of failing on the first.
    pub skip_invalid: bool,
}

/// Every row of a dataset, and every row that was skipped with its reason.
#[derive(Clone, Debug, Default)]
pub struct Rows {
    pub preference: Vec<PreferenceRecord>,
    pub unpaired: Vec<UnpairedRecord>,
    pub skipped: Vec<DataError>,
    /// Rows seen, valid or not (blank JSONL lines excluded).
    pub total: usize,
}

const BOM: &[u8] = b"\xef\xbb\xbf";

/// The reason for bytes that are not UTF-8 (columns count bytes, from 1, as serde_json's do).
fn not_utf8(e: &std::str::Utf8Error, line_start: usize) -> String {
    format!("not valid UTF-8 at column {}", e.valid_up_to() - line_start + 1)
}

/// One JSONL row: JSON with no key given twice in any object.
fn parse_line(line: &[u8]) -> std::result::Result<Value, String> {
    let (value, duplicates) = json::parse(line).map_err(|e| format!("not valid JSON: {e}"))?;
    match duplicates.first() {
        Some(d) => Err(d.reason()),
        None => Ok(value),
    }
}

/// The raw JSON values of one file with their locations.
pub fn raw_values(path: &Path, format: Format) -> Result<Vec<(Location, std::result::Result<Value, RowError>)>> {
    match format {
        // Bytes, not a String: one line that is not UTF-8 is that line's error, not the file's.
        Format::Jsonl => {
            let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
            let bytes = bytes.strip_prefix(BOM).unwrap_or(&bytes);
            Ok(bytes
                .split(|&b| b == b'\n')
                .enumerate()
                .filter_map(|(i, raw)| {
                    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
                    let parsed = match std::str::from_utf8(raw) {
                        Err(e) => Err(not_utf8(&e, 0)),
                        Ok(line) if line.trim().is_empty() => return None,
                        Ok(line) => parse_line(line.as_bytes()),
                    };
                    Some((Location::Line(i + 1), parsed.map_err(RowError)))
                })
                .collect())
        }
        Format::Json => {
            let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
            let bytes = bytes.strip_prefix(BOM).unwrap_or(&bytes);
            if let Err(e) = std::str::from_utf8(bytes) {
                let before = &bytes[..e.valid_up_to()];
                let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
                let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
                return Err(DataError::at(path, Some(line), not_utf8(&e, line_start)));
            }
            let (value, duplicates) =
                json::parse(bytes).map_err(|e| DataError::at(path, Some(e.line()), format!("not valid JSON: {e}")))?;
            let (items, inside) = match value {
                Value::Array(items) => (items, None),
                Value::Object(mut o) if o.get("data").is_some_and(Value::is_array) => match o.remove("data") {
                    Some(Value::Array(items)) => (items, Some("data")),
                    _ => unreachable!(),
                },
                other => {
                    return Err(DataError::at(path, None, format!("expected a JSON array of records, found {}", json_kind(&other))));
                }
            };
            // A duplicate inside an element is that element's error; elsewhere, the file's.
            let mut bad: Vec<Option<String>> = vec![None; items.len()];
            for d in duplicates {
                let in_items = match (inside, d.at.split_first()) {
                    (None, _) => Some(d.at.as_slice()),
                    (Some(key), Some((json::Step::Key(k), rest))) if k == key => Some(rest),
                    _ => None,
                };
                match in_items {
                    Some([json::Step::Index(i), at @ ..]) => {
                        let reason = json::Duplicate { at: at.to_vec(), key: d.key }.reason();
                        bad[*i].get_or_insert(reason);
                    }
                    _ => return Err(DataError::at(path, None, d.reason())),
                }
            }
            Ok(items
                .into_iter()
                .zip(bad)
                .enumerate()
                .map(|(i, (v, bad))| (Location::Element(i), bad.map_or(Ok(v), |reason| Err(RowError(reason)))))
                .collect())
        }
        Format::Parquet => crate::parquet_io::read_values(path),
    }
}

/// The files of a dataset path: the file itself, or a folder's supported files in name order.
pub fn dataset_files(path: &Path, format: Option<Format>) -> Result<Vec<(PathBuf, Format)>> {
    if path.is_dir() {
        let mut files: Vec<(PathBuf, Format)> = std::fs::read_dir(path)
            .map_err(|e| DataError::io(path, e))?
            .flatten()
            .map(|e| e.path())
            .filter_map(|p| {
                let f = format.or_else(|| Format::of(&p))?;
                (p.is_file() && Format::of(&p) == Some(f)).then_some((p, f))
            })
            .collect();
        files.sort_by(|a, b| a.0.cmp(&b.0));
        if files.is_empty() {
            return Err(DataError::at(path, None, "folder holds no .jsonl, .json or .parquet files".into()));
        }
        return Ok(files);
    }
    if !path.exists() {
        return Err(DataError::at(path, None, "no such file".into()));
    }
    let format = format.or_else(|| Format::of(path)).ok_or_else(|| {
        DataError::at(path, None, "unknown data format: use a .jsonl, .json or .parquet file, or pass --format".into())
    })?;
    Ok(vec![(path.to_path_buf(), format)])
}

/// The error for a file (or dataset) none of whose rows is valid, with the first skipped row's
/// reason (`data check` shows no list when it fails).
pub fn no_valid_records(path: &Path, skipped: &[DataError]) -> DataError {
    let n = skipped.len();
    let first = match skipped.first() {
        Some(e) if e.path == path => match e.location {
            Some(loc) => format!("; first: {loc}: {}", e.reason),
            None => format!("; first: {}", e.reason),
        },
        Some(e) => format!("; first: {e}"),
        None => String::new(),
    };
    DataError::at(path, None, format!("no valid records ({n} invalid {} skipped{first})", if n == 1 { "row" } else { "rows" }))
}

fn style(conversational: bool) -> &'static str {
    if conversational { "conversational" } else { "standard" }
}

/// Reads every row of a dataset (file or folder of shards).
pub fn read_rows(path: &Path, options: ReadOptions) -> Result<Rows> {
    let mut rows = Rows::default();
    // The dataset's first valid row and whether it is conversational: TRL picks the format from
    // the first row, so a row in the other one would be tokenised wrongly.
    let mut first: Option<(PathBuf, Location, bool)> = None;
    for (file, format) in dataset_files(path, options.format)? {
        let (valid_before, skipped_before) = (rows.preference.len() + rows.unpaired.len(), rows.skipped.len());
        for (location, value) in raw_values(&file, format)? {
            rows.total += 1;
            let parsed = value.and_then(|v| {
                let index = rows.preference.len() + rows.unpaired.len();
                parse_row(&v, index, &file, location)
            });
            match parsed {
                Ok(row) => {
                    let conversational = match &row {
                        Row::Preference(r) => r.prompt.is_conversational(),
                        Row::Unpaired(r) => r.prompt.is_conversational(),
                    };
                    match &first {
                        None => first = Some((file.clone(), location, conversational)),
                        Some((first_file, first_at, c)) if *c != conversational => {
                            let (this, that) = (style(conversational), style(*c));
                            let reason = if *first_file == file {
                                format!("{location} is {this} but {first_at} is {that}: one format per file")
                            } else {
                                let name = first_file.file_name().unwrap_or(first_file.as_os_str()).to_string_lossy();
                                format!("{location} is {this} but {first_at} of {name} is {that}: one format per dataset")
                            };
                            return Err(DataError::located(&file, Some(location), reason));
                        }
                        Some(_) => {}
                    }
                    match row {
                        Row::Preference(r) => rows.preference.push(r),
                        Row::Unpaired(r) => rows.unpaired.push(r),
                    }
                }
                Err(reason) => {
                    let err = DataError::located(&file, Some(location), reason);
                    if !options.skip_invalid {
                        return Err(err);
                    }
                    rows.skipped.push(err);
                }
            }
        }
        // Every row skipped is a wrong file (or schema), not noisy rows: never an empty dataset.
        if rows.preference.len() + rows.unpaired.len() == valid_before && rows.skipped.len() > skipped_before {
            return Err(no_valid_records(&file, &rows.skipped[skipped_before..]));
        }
    }
    if !rows.preference.is_empty() && !rows.unpaired.is_empty() {
        let first = &rows.unpaired[0];
        return Err(DataError::located(
            &first.path,
            Some(first.location),
            "an unpaired {prompt, completion, label} row in a preference dataset (one kind per dataset)",
        ));
    }
    if rows.total == 0 {
        return Err(DataError::at(path, None, "no records".into()));
    }
    Ok(rows)
}

/// Reads preference records; any bad row is an error naming its location.
pub fn read_preferences(path: &Path, options: ReadOptions) -> Result<(Vec<PreferenceRecord>, Vec<DataError>)> {
    let rows = read_rows(path, options)?;
    // read_rows returns at least one valid row
    if rows.preference.is_empty() {
        return Err(DataError::at(path, None, "this is a prompt-completion dataset (SFT or KTO rows); preference pairs need chosen and rejected".into()));
    }
    Ok((rows.preference, rows.skipped))
}

impl PreferenceRecord {
    /// As a TRL-format JSON row `{prompt, chosen, rejected}`.
    pub fn to_json(&self) -> Value {
        serde_json::json!({"prompt": self.prompt.to_json(), "chosen": self.chosen.to_json(), "rejected": self.rejected.to_json()})
    }
}

impl UnpairedRecord {
    /// As a TRL-format JSON row `{prompt, completion, label}`.
    pub fn to_json(&self) -> Value {
        let mut row = serde_json::json!({"prompt": self.prompt.to_json(), "completion": self.completion.to_json()});
        if let Some(label) = self.label {
            row["label"] = Value::Bool(label);
        }
        row
    }
}

/// Writes JSON rows as JSONL, a JSON array or Parquet (by `format`).
pub fn write_rows(path: &Path, format: Format, rows: &[Value]) -> Result<()> {
    let io = |e: std::io::Error| DataError::io(path, e);
    match format {
        Format::Jsonl => {
            let mut text = String::new();
            for r in rows {
                text.push_str(&serde_json::to_string(r).expect("json"));
                text.push('\n');
            }
            std::fs::write(path, text).map_err(io)
        }
        Format::Json => std::fs::write(path, serde_json::to_string_pretty(&Value::Array(rows.to_vec())).expect("json")).map_err(io),
        Format::Parquet => crate::parquet_io::write_values(path, rows),
    }
}

/// Every raw JSON row of a dataset (file or folder), with its file and location; an unparsable row
/// is an error naming it.
pub fn read_values(path: &Path, format: Option<Format>) -> Result<Vec<(PathBuf, Location, Value)>> {
    let mut out = Vec::new();
    for (file, format) in dataset_files(path, format)? {
        for (loc, v) in raw_values(&file, format)? {
            let v = v.map_err(|reason| DataError::located(&file, Some(loc), reason))?;
            out.push((file.clone(), loc, v));
        }
    }
    Ok(out)
}
