//! Malformed data is an error naming the file, the line (or element / row) and the reason; with
//! `skip_invalid` every bad row is skipped and reported, never dropped silently.

use std::path::{Path, PathBuf};

use dipole_data::{LengthOptions, ReadOptions, Tokenizer, TruncationMode, load_pairs, load_pairs_with};

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-llama")).unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const GOOD: &str = r#"{"prompt": "Q: sky?\nA:", "chosen": " blue.", "rejected": " red."}"#;

/// (case, file name, contents, expected location text, expected reason text)
const CASES: &[(&str, &str, &str, &str, &str)] = &[
    ("not json", "a.jsonl", "{\"prompt\": \"x\", \"chosen\": \"y\"\n", ":1:", "not valid JSON"),
    ("truncated line", "a.jsonl", "GOOD\n{\"prompt\": \"x\", \"cho", ":2:", "not valid JSON"),
    ("missing chosen", "a.jsonl", "GOOD\nGOOD\n{\"prompt\": \"x\", \"rejected\": \"y\"}", ":3:", "missing field \"chosen\""),
    ("missing rejected", "a.jsonl", "{\"prompt\": \"x\", \"chosen\": \"y\"}", ":1:", "missing field \"rejected\""),
    ("empty prompt", "a.jsonl", "{\"prompt\": \"\", \"chosen\": \"y\", \"rejected\": \"z\"}", ":1:", "field \"prompt\" is empty"),
    ("blank chosen", "a.jsonl", "{\"prompt\": \"x\", \"chosen\": \"   \", \"rejected\": \"z\"}", ":1:", "field \"chosen\" is empty"),
    ("number field", "a.jsonl", "{\"prompt\": \"x\", \"chosen\": 5, \"rejected\": \"z\"}", ":1:", "found a number"),
    ("null field", "a.jsonl", "{\"prompt\": null, \"chosen\": \"y\", \"rejected\": \"z\"}", ":1:", "found null"),
    ("identical", "a.jsonl", "{\"prompt\": \"x\", \"chosen\": \"same\", \"rejected\": \"same\"}", ":1:", "identical"),
    ("array row", "a.jsonl", "[1, 2]", ":1:", "expected a JSON object"),
    ("role missing", "a.jsonl", "{\"prompt\": [{\"content\": \"hi\"}], \"chosen\": [{\"role\": \"assistant\", \"content\": \"a\"}], \"rejected\": [{\"role\": \"assistant\", \"content\": \"b\"}]}", ":1:", "has no \"role\""),
    ("content missing", "a.jsonl", "{\"prompt\": [{\"role\": \"user\"}], \"chosen\": [{\"role\": \"assistant\", \"content\": \"a\"}], \"rejected\": [{\"role\": \"assistant\", \"content\": \"b\"}]}", ":1:", "has no \"content\""),
    ("role not string", "a.jsonl", "{\"prompt\": [{\"role\": 1, \"content\": \"hi\"}], \"chosen\": [{\"role\": \"assistant\", \"content\": \"a\"}], \"rejected\": [{\"role\": \"assistant\", \"content\": \"b\"}]}", ":1:", "\"role\" must be a string"),
    ("message not object", "a.jsonl", "{\"prompt\": [\"hi\"], \"chosen\": [{\"role\": \"assistant\", \"content\": \"a\"}], \"rejected\": [{\"role\": \"assistant\", \"content\": \"b\"}]}", ":1:", "message 0 is a string"),
    ("empty message list", "a.jsonl", "{\"prompt\": [], \"chosen\": [{\"role\": \"assistant\", \"content\": \"a\"}], \"rejected\": [{\"role\": \"assistant\", \"content\": \"b\"}]}", ":1:", "empty message list"),
    ("mixed formats", "a.jsonl", "{\"prompt\": \"x\", \"chosen\": [{\"role\": \"assistant\", \"content\": \"a\"}], \"rejected\": \"b\"}", ":1:", "mix plain text and message lists"),
    ("implicit prompt, nothing shared", "a.jsonl", "{\"chosen\": \"abc\", \"rejected\": \"xyz\"}", ":1:", "share no beginning"),
    ("kto label not bool", "a.jsonl", "{\"prompt\": \"x\", \"completion\": \"y\", \"label\": \"yes\"}", ":1:", "\"label\" must be true or false"),
    ("completion rows as pairs", "a.jsonl", "{\"prompt\": \"x\", \"completion\": \"y\"}", "a.jsonl", "preference pairs need chosen and rejected"),
    ("mixed kinds", "a.jsonl", "GOOD\n{\"prompt\": \"x\", \"completion\": \"y\", \"label\": true}", ":2:", "one kind per dataset"),
    ("json not array", "a.json", "{\"prompt\": \"x\"}", "a.json", "expected a JSON array"),
    ("json element", "a.json", "[GOOD, {\"prompt\": \"x\", \"chosen\": \"y\"}]", "(element 1)", "missing field \"rejected\""),
    ("json syntax", "a.json", "[GOOD,\n{\"prompt\": ]", "a.json:2:", "not valid JSON"),
    ("unknown extension", "a.csv", "prompt,chosen,rejected", "a.csv", "unknown data format"),
    ("empty file", "a.jsonl", "\n\n", "a.jsonl", "no records"),
];

#[test]
fn every_bad_input_names_its_place_and_reason() {
    assert!(CASES.len() >= 20);
    let tok = tokenizer();
    let lengths = LengthOptions { max_length: Some(128), truncation: TruncationMode::KeepStart, ..Default::default() };
    for (case, name, text, location, reason) in CASES {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), name, &text.replace("GOOD", GOOD));
        let err = match load_pairs(&path, &tok, lengths) {
            Ok(p) => panic!("{case}: accepted ({} pairs)", p.pairs.len()),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(location), "{case}: {err:?} should name {location:?}");
        assert!(err.contains(reason), "{case}: {err:?} should say {reason:?}");
        assert!(err.contains(name), "{case}: {err:?} should name the file");
    }
}

#[test]
fn completion_empty_after_tokenisation_is_reported() {
    // a chat template that drops assistant turns leaves nothing to learn from
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-llama");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    let cfg = r#"{"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "chat_template": "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"}"#;
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg).unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let row = r#"{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#;
    let path = write(dir.path(), "c.jsonl", &format!("{row}
"));
    let lengths = LengthOptions { max_length: Some(128), truncation: TruncationMode::KeepStart, ..Default::default() };
    let err = load_pairs(&path, &tok, lengths).unwrap_err().to_string();
    assert!(err.contains("c.jsonl:1:") && err.contains("empty after tokenisation"), "{err}");
}

#[test]
fn skip_invalid_counts_every_skipped_row() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{GOOD}\nnot json\n{GOOD}\n{{\"prompt\": \"x\", \"chosen\": \"y\"}}\n\n{GOOD}\r\n{{\"prompt\": \"x\", \"chosen\": \"s\", \"rejected\": \"s\"}}\n"
    );
    let path = write(dir.path(), "mixed.jsonl", &text);
    let lengths = LengthOptions { max_length: Some(128), truncation: TruncationMode::KeepStart, ..Default::default() };
    let options = ReadOptions { skip_invalid: true, ..Default::default() };
    let prepared = load_pairs_with(&path, &tokenizer(), lengths, options).unwrap();
    assert_eq!(prepared.pairs.len(), 3);
    let lines: Vec<Option<usize>> = prepared.skipped.iter().map(|e| e.line()).collect();
    assert_eq!(lines, vec![Some(2), Some(4), Some(7)]);
}

#[test]
fn unicode_and_crlf_files_work() {
    let dir = tempfile::tempdir().unwrap();
    let text = "{\"prompt\": \"東京は\", \"chosen\": \" 日本の首都です。🎌\", \"rejected\": \" e\\u0301 combining\"}\r\n{\"prompt\": \"Ünïcödé?\", \"chosen\": \" ✅ yes\", \"rejected\": \" ❌ no\"}\r\n";
    let path = write(dir.path(), "u.jsonl", text);
    let lengths = LengthOptions { max_length: Some(128), truncation: TruncationMode::KeepStart, ..Default::default() };
    let prepared = load_pairs(&path, &tokenizer(), lengths).unwrap();
    assert_eq!(prepared.pairs.len(), 2);
    let decoded = tokenizer().decode(&prepared.tokenized[0].chosen_ids, true).unwrap();
    assert!(decoded.contains("🎌"), "{decoded:?}");
}
