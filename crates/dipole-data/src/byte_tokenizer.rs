//! A byte-level tokenizer for models made without a tokenizer of their own (random-initialised
//! real shapes): `<unk>` = 0, `<s>` = 1, `</s>` = 2, then one token per byte (ids 3..=258), no
//! merges, GPT-2's byte-to-character alphabet; any text encodes and decodes losslessly, and every
//! id fits a vocabulary of 259 or more. Written as Hugging Face files that transformers and
//! [`Tokenizer::from_dir`](crate::Tokenizer::from_dir) load: `tokenizer.json`,
//! `tokenizer_config.json` (pad = eos, as transformers 5 writes) and `chat_template.jinja`.

use std::path::Path;

use serde_json::{Value, json};

use crate::error::{DataError, Result};

/// Ids of the special tokens.
pub const UNK_ID: u32 = 0;
pub const BOS_ID: u32 = 1;
pub const EOS_ID: u32 = 2;
/// The first byte's id; byte `b` is `FIRST_BYTE_ID + b`.
pub const FIRST_BYTE_ID: u32 = 3;
/// The smallest vocabulary the tokenizer fits.
pub const MIN_VOCAB: usize = FIRST_BYTE_ID as usize + 256;

/// A plain role-tagged chat template (Zephyr's layout).
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}";

/// GPT-2's printable character for each byte (bytes that are printable stand for themselves).
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if printable(b) {
        return char::from(b);
    }
    let shift = (0..b).filter(|&c| !printable(c)).count() as u32;
    char::from_u32(256 + shift).expect("a valid code point")
}

fn special(id: u32, content: &str) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
}

/// The `tokenizer.json` document.
pub fn tokenizer_json() -> Value {
    let mut vocab = serde_json::Map::new();
    for (id, token) in [(UNK_ID, "<unk>"), (BOS_ID, "<s>"), (EOS_ID, "</s>")] {
        vocab.insert(token.into(), id.into());
    }
    for b in 0..=255u8 {
        vocab.insert(byte_char(b).to_string(), (FIRST_BYTE_ID + b as u32).into());
    }
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(UNK_ID, "<unk>"), special(BOS_ID, "<s>"), special(EOS_ID, "</s>")],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS_ID], "tokens": ["<s>"]}}
        },
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": "<unk>",
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": []
        }
    })
}

/// Writes the tokenizer files into `dir` for a model of `vocab_size` tokens (at least
/// [`MIN_VOCAB`]).
pub fn write_byte_tokenizer(dir: &Path, vocab_size: usize) -> Result<()> {
    if vocab_size < MIN_VOCAB {
        return Err(DataError::at(dir, None, format!("a byte-level tokenizer needs a vocabulary of at least {MIN_VOCAB} tokens, the model has {vocab_size}")));
    }
    let config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "add_bos_token": true,
        "model_max_length": 1_000_000,
    });
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| DataError::at(&path, None, format!("cannot write: {e}")))
    };
    write("tokenizer.json", serde_json::to_string(&tokenizer_json()).expect("json"))?;
    write("tokenizer_config.json", serde_json::to_string_pretty(&config).expect("json"))?;
    write("chat_template.jinja", CHAT_TEMPLATE.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alphabet_is_gpt2s_and_covers_every_byte_once() {
        let chars: std::collections::BTreeSet<char> = (0..=255u8).map(byte_char).collect();
        assert_eq!(chars.len(), 256);
        assert_eq!(byte_char(b'a'), 'a');
        assert_eq!(byte_char(b' '), 'Ġ', "GPT-2 writes a space as Ġ");
        assert_eq!(byte_char(b'\n'), 'Ċ');
    }

    #[test]
    fn any_text_round_trips_through_byte_ids() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), r#"{"model_type": "llama", "bos_token_id": 1, "eos_token_id": 2}"#).unwrap();
        write_byte_tokenizer(dir.path(), 1000).unwrap();
        let tokenizer = crate::Tokenizer::from_dir(dir.path()).unwrap();
        let text = "Hello, wörld! 🤖\n\ttabs";
        let ids = tokenizer.encode(text, false).unwrap();
        assert_eq!(ids.len(), text.len(), "one id per byte");
        assert!(ids.iter().zip(text.bytes()).all(|(&id, b)| id == FIRST_BYTE_ID + b as u32));
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), text);
        assert_eq!(tokenizer.encode("a", true).unwrap(), vec![BOS_ID, FIRST_BYTE_ID + b'a' as u32], "BOS first");
        assert_eq!(tokenizer.eos.as_ref().map(|t| t.id), Some(EOS_ID));
        assert_eq!(tokenizer.bos.as_ref().map(|t| t.id), Some(BOS_ID));
        assert_eq!(tokenizer.pad_id(), EOS_ID, "pad = eos");
        assert_eq!(tokenizer.chat_template.as_deref(), Some(CHAT_TEMPLATE));
        let small = tempfile::tempdir().unwrap();
        let err = write_byte_tokenizer(small.path(), 100).unwrap_err().to_string();
        assert!(err.contains("at least 259"), "{err}");
    }
}
