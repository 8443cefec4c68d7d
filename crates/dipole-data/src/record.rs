//! Preference records in TRL's formats, read from JSONL with every bad row reported by line.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{DataError, Result};

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

/// A `{prompt, chosen, rejected}` preference pair. `index` is its position among the file's records
/// and `line` its 1-based line, for messages.
#[derive(Clone, Debug, PartialEq)]
pub struct PreferenceRecord {
    pub index: usize,
    pub line: usize,
    pub prompt: Content,
    pub chosen: Content,
    pub rejected: Content,
}

fn parse_content(obj: &Map<String, Value>, key: &str) -> std::result::Result<Content, String> {
    match obj.get(key) {
        None => Err(format!("missing field \"{key}\"")),
        Some(Value::String(s)) if s.is_empty() => Err(format!("field \"{key}\" is empty")),
        Some(Value::String(s)) => Ok(Content::Text(s.clone())),
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return Err(format!("field \"{key}\" is an empty message list"));
            }
            let mut messages = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let Some(m) = item.as_object() else {
                    return Err(format!("field \"{key}\" message {i} is not an object with \"role\" and \"content\""));
                };
                let role = match m.get("role") {
                    Some(Value::String(r)) if !r.is_empty() => r.clone(),
                    Some(Value::String(_)) => return Err(format!("field \"{key}\" message {i} has an empty \"role\"")),
                    Some(_) => return Err(format!("field \"{key}\" message {i}: \"role\" must be a string")),
                    None => return Err(format!("field \"{key}\" message {i} has no \"role\"")),
                };
                let content = match m.get("content") {
                    Some(Value::String(c)) => c.clone(),
                    Some(_) => return Err(format!("field \"{key}\" message {i}: \"content\" must be a string")),
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

/// Checks one JSON object as a preference record.
pub fn parse_record(value: &Value, index: usize, line: usize) -> std::result::Result<PreferenceRecord, String> {
    let Some(obj) = value.as_object() else {
        return Err(format!("expected a JSON object, found {}", json_kind(value)));
    };
    let prompt = parse_content(obj, "prompt")?;
    let chosen = parse_content(obj, "chosen")?;
    let rejected = parse_content(obj, "rejected")?;
    let conversational = |c: &Content| matches!(c, Content::Messages(_));
    if conversational(&prompt) != conversational(&chosen) || conversational(&chosen) != conversational(&rejected) {
        return Err("prompt, chosen and rejected mix plain text and message lists".into());
    }
    if chosen == rejected {
        return Err("chosen and rejected are identical".into());
    }
    Ok(PreferenceRecord {
        index,
        line,
        prompt,
        chosen,
        rejected,
    })
}

/// Reads a JSONL file of preference records; the first bad row is an error naming its line.
pub fn read_jsonl(path: &Path) -> Result<Vec<PreferenceRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let mut records = Vec::new();
    for (i, raw) in text.split('\n').enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line)
            .map_err(|e| DataError::at(path, Some(i + 1), format!("not valid JSON: {e}")))?;
        let record = parse_record(&value, records.len(), i + 1).map_err(|r| DataError::at(path, Some(i + 1), r))?;
        records.push(record);
    }
    if records.is_empty() {
        return Err(DataError::at(path, None, "no records".into()));
    }
    Ok(records)
}
