//! A Hugging Face tokenizer folder: `tokenizer.json` through the `tokenizers` crate, with the
//! special tokens and chat template that `tokenizer_config.json` (and the model's
//! `generation_config.json` / `config.json`) declare.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{DataError, Result};

/// A special token: its text and its id in the vocabulary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialToken {
    pub text: String,
    pub id: u32,
}

/// Qwen2's pre-tokenisation pattern (contractions, letters, single digits, punctuation, newlines).
const QWEN2_PRETOKENIZE_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos: Option<SpecialToken>,
    pub eos: Option<SpecialToken>,
    pub pad: Option<SpecialToken>,
    /// The Jinja chat template of `tokenizer_config.json`, if any.
    pub chat_template: Option<String>,
    pub dir: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("dir", &self.dir)
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .finish()
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| DataError::at(path, None, format!("invalid JSON: {e}")))
}

/// `"<s>"` or `{"content": "<s>", ...}` as `tokenizer_config.json` writes special tokens.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn first_id(v: Option<&Value>) -> Option<u32> {
    match v? {
        Value::Number(n) => n.as_u64().map(|n| n as u32),
        Value::Array(a) => a.first().and_then(Value::as_u64).map(|n| n as u32),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `<dir>/tokenizer.json` and the special tokens declared beside it.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(DataError::at(&path, None, "no tokenizer.json in the model folder".into()));
        }
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let generation = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let model = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);
        let mut spec = read_json(&path)?.unwrap_or(Value::Null);
        if matches!(model.get("model_type").and_then(Value::as_str), Some("qwen2" | "qwen2_moe" | "qwen3")) {
            // transformers 5 loads these models' tokenizers as `Qwen2Tokenizer`, which replaces the
            // file's normalizer and pre-tokenizer with Qwen's (NFC; digits split one by one). TRL's
            // token ids follow, so ours do too. Real Qwen checkpoints already ship exactly these.
            spec["normalizer"] = serde_json::json!({"type": "NFC"});
            spec["pre_tokenizer"] = serde_json::json!({
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": QWEN2_PRETOKENIZE_REGEX}, "behavior": "Isolated", "invert": false},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
                ]
            });
        }
        let inner: tokenizers::Tokenizer = serde_json::from_value(spec)
            .map_err(|e| DataError::at(&path, None, format!("cannot load tokenizer: {e}")))?;

        let resolve = |key: &str, id_key: &str| -> Option<SpecialToken> {
            if let Some(text) = token_text(config.get(key))
                && let Some(id) = inner.token_to_id(&text) {
                    return Some(SpecialToken { text, id });
                }
            let id = first_id(generation.get(id_key)).or_else(|| first_id(model.get(id_key)))?;
            let text = inner.id_to_token(id)?;
            Some(SpecialToken { text, id })
        };
        let chat_template = match config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(list)) => list.iter().find_map(|t| {
                (t.get("name").and_then(Value::as_str) == Some("default"))
                    .then(|| t.get("template").and_then(Value::as_str).map(str::to_string))
                    .flatten()
            }),
            _ => None,
        };
        let chat_template = chat_template.or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
        Ok(Self {
            bos: resolve("bos_token", "bos_token_id"),
            eos: resolve("eos_token", "eos_token_id"),
            pad: resolve("pad_token", "pad_token_id"),
            chat_template,
            inner,
            dir,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`; with `add_special_tokens` the post-processor's tokens (BOS) are added.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| DataError::at(&self.dir, None, format!("tokenizer failed: {e}")))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| DataError::at(&self.dir, None, format!("tokenizer failed to decode: {e}")))
    }

    /// The padding id: `pad`, else `eos` (as TRL falls back), else 0.
    pub fn pad_id(&self) -> u32 {
        self.pad.as_ref().or(self.eos.as_ref()).map(|t| t.id).unwrap_or(0)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
