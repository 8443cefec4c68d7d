//! JSON parsed into [`Value`]s, noting every duplicate object key: serde_json keeps the last of
//! them silently, which would hide half of a broken row.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::map::Entry;
use serde_json::{Map, Number, Value};

/// One step from a value into a child.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// A key given twice in one object, `at` the steps from the parsed value to that object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Duplicate {
    pub at: Vec<Step>,
    pub key: String,
}

impl Duplicate {
    /// The reason, for a duplicate `at` steps from a row (the message fields get the wording
    /// [`crate::record`] uses for messages).
    pub fn reason(&self) -> String {
        let key = &self.key;
        match self.at.as_slice() {
            [] => format!("duplicate key \"{key}\""),
            [Step::Key(field), Step::Index(i)] if crate::record::CONTENT_FIELDS.contains(&field.as_str()) => {
                format!("field \"{field}\" message {i} has a duplicate key \"{key}\"")
            }
            [Step::Key(field)] => format!("field \"{field}\" has a duplicate key \"{key}\""),
            [Step::Key(field), rest @ ..] => {
                let mut at = field.clone();
                for s in rest {
                    match s {
                        Step::Key(k) => at.push_str(&format!(".{k}")),
                        Step::Index(i) => at.push_str(&format!("[{i}]")),
                    }
                }
                format!("field \"{field}\" has a duplicate key \"{key}\" (at {at})")
            }
            [Step::Index(_), ..] => format!("duplicate key \"{key}\" inside a list"),
        }
    }
}

/// Builds a [`Value`] exactly as serde_json's own visitor does, recording duplicates instead of
/// dropping them (the first value is kept; the row is rejected anyway).
struct Seed<'a> {
    duplicates: &'a mut Vec<Duplicate>,
}

impl Seed<'_> {
    /// Prefixes `step` to the duplicates a child added (found innermost first; reversed at the end).
    fn note(&mut self, before: usize, step: impl Fn() -> Step) {
        for d in &mut self.duplicates[before..] {
            d.at.push(step());
        }
    }
}

impl<'de> DeserializeSeed<'de> for Seed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        loop {
            let before = self.duplicates.len();
            let Some(item) = seq.next_element_seed(Seed { duplicates: &mut *self.duplicates })? else {
                break;
            };
            let i = items.len();
            self.note(before, || Step::Index(i));
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Value, A::Error> {
        let mut obj = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let before = self.duplicates.len();
            let value = map.next_value_seed(Seed { duplicates: &mut *self.duplicates })?;
            self.note(before, || Step::Key(key.clone()));
            match obj.entry(key) {
                Entry::Vacant(e) => {
                    e.insert(value);
                }
                Entry::Occupied(e) => self.duplicates.push(Duplicate { at: Vec::new(), key: e.key().clone() }),
            }
        }
        Ok(Value::Object(obj))
    }
}

/// Parses one JSON document (nothing but whitespace may follow it), with every duplicate key.
pub fn parse(bytes: &[u8]) -> Result<(Value, Vec<Duplicate>), serde_json::Error> {
    let mut duplicates = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Seed { duplicates: &mut duplicates }.deserialize(&mut de)?;
    de.end()?;
    for d in &mut duplicates {
        d.at.reverse();
    }
    Ok((value, duplicates))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_values_as_serde_json() {
        let text = r#"{"a": [1, -2, 3.5, 1e300, true, null, "s\u00e9"], "b": {"c": {}}, "z": 18446744073709551615}"#;
        let (value, duplicates) = parse(text.as_bytes()).unwrap();
        assert_eq!(value, serde_json::from_str::<Value>(text).unwrap());
        assert!(duplicates.is_empty());
    }

    #[test]
    fn every_duplicate_with_its_place() {
        let text = r#"[{"p": 1, "p": 2}, {"m": [{"r": 1}, {"r": 1, "c": 2, "r": 3}]}, {"ok": 1}, {"x": {"y": 1, "y": 2}}]"#;
        let (_, duplicates) = parse(text.as_bytes()).unwrap();
        let key = |s: &str| Step::Key(s.into());
        assert_eq!(
            duplicates,
            vec![
                Duplicate { at: vec![Step::Index(0)], key: "p".into() },
                Duplicate { at: vec![Step::Index(1), key("m"), Step::Index(1)], key: "r".into() },
                Duplicate { at: vec![Step::Index(3), key("x")], key: "y".into() },
            ]
        );
    }

    #[test]
    fn trailing_text_is_an_error() {
        assert!(parse(br#"{"a": 1} {"b": 2}"#).is_err());
        assert!(parse(b"{\"a\": 1}  \r\n").is_ok());
    }
}
