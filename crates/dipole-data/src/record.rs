//! Records in TRL's dataset formats, read from JSONL, JSON or Parquet (a file or a folder of shards),
//! with every bad row reported by file and line (or element / row), never silently dropped.
//!
//! - preference, explicit prompt: `{prompt, chosen, rejected}`;
//! - preference, implicit prompt: `{chosen, rejected}` whose common beginning is the prompt (TRL's
//!   `extract_prompt`);
//! - unpaired (KTO): `{prompt, completion, label: bool}`.
//!
//! Each field is a string (standard) or a list of `{role, content}` messages (conversational).
//! Extra columns are kept out of the way and ignored.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{DataError, Location, Result};

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
                    Some(Value::String(r)) if !r.is_empty() => r.clone(),
                    Some(Value::String(_)) => return Err(format!("field \"{key}\" message {i} has an empty \"role\"")),
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
pub fn parse_row(value: &Value, index: usize, path: &Path, location: Location) -> std::result::Result<Row, String> {
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

/// The raw JSON values of one file with their locations.
pub fn raw_values(path: &Path, format: Format) -> Result<Vec<(Location, std::result::Result<Value, String>)>> {
    match format {
        Format::Jsonl => {
            let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
            let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
            Ok(text
                .split('\n')
                .enumerate()
                .filter_map(|(i, raw)| {
                    let line = raw.strip_suffix('\r').unwrap_or(raw);
                    (!line.trim().is_empty()).then(|| {
                        (Location::Line(i + 1), serde_json::from_str::<Value>(line).map_err(|e| format!("not valid JSON: {e}")))
                    })
                })
                .collect())
        }
        Format::Json => {
            let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
            let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
            let value: Value = serde_json::from_str(text).map_err(|e| DataError::at(path, Some(e.line()), format!("not valid JSON: {e}")))?;
            let items = match value {
                Value::Array(items) => items,
                Value::Object(mut o) if o.get("data").is_some_and(Value::is_array) => match o.remove("data") {
                    Some(Value::Array(items)) => items,
                    _ => unreachable!(),
                },
                other => {
                    return Err(DataError::at(path, None, format!("expected a JSON array of records, found {}", json_kind(&other))));
                }
            };
            Ok(items.into_iter().enumerate().map(|(i, v)| (Location::Element(i), Ok(v))).collect())
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

/// Reads every row of a dataset (file or folder of shards).
pub fn read_rows(path: &Path, options: ReadOptions) -> Result<Rows> {
    let mut rows = Rows::default();
    for (file, format) in dataset_files(path, options.format)? {
        for (location, value) in raw_values(&file, format)? {
            rows.total += 1;
            let parsed = value.and_then(|v| {
                let index = rows.preference.len() + rows.unpaired.len();
                parse_row(&v, index, &file, location)
            });
            match parsed {
                Ok(Row::Preference(r)) => rows.preference.push(r),
                Ok(Row::Unpaired(r)) => rows.unpaired.push(r),
                Err(reason) => {
                    let err = DataError::located(&file, Some(location), reason);
                    if !options.skip_invalid {
                        return Err(err);
                    }
                    rows.skipped.push(err);
                }
            }
        }
    }
    if !rows.preference.is_empty() && !rows.unpaired.is_empty() {
        let first = &rows.unpaired[0];
        return Err(DataError::located(
            &first.path,
            Some(first.location),
            "an unpaired {prompt, completion, label} row in a preference dataset (one kind per dataset)".into(),
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
    if rows.preference.is_empty() && !rows.unpaired.is_empty() {
        return Err(DataError::at(path, None, "this is a prompt-completion dataset (SFT or KTO rows); preference pairs need chosen and rejected".into()));
    }
    if rows.preference.is_empty() {
        return Err(DataError::at(path, None, format!("no valid records ({} skipped)", rows.skipped.len())));
    }
    Ok((rows.preference, rows.skipped))
}

/// Reads a JSONL (or any supported) preference file, failing on the first bad row.
pub fn read_jsonl(path: &Path) -> Result<Vec<PreferenceRecord>> {
    Ok(read_preferences(path, ReadOptions::default())?.0)
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
