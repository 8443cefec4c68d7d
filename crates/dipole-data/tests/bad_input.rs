//! Malformed data is an error naming the file, the line (or element / row) and the reason; with
//! `skip_invalid` every bad row is skipped and reported, never dropped silently.

use std::path::{Path, PathBuf};

use std::sync::Arc;

use arrow_array::builder::{ListBuilder, StringBuilder, StructBuilder};
use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Fields, Schema};
use dipole_data::record::write_rows;
use dipole_data::{
    Format, LengthOptions, PairsAs, ReadOptions, Tokenizer, TruncationMode, load_completions_with, load_pairs, load_pairs_with, prepare_records,
    read_preferences, read_rows,
};

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-llama")).unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const GOOD: &str = r#"{"prompt": "Q: sky?\nA:", "chosen": " blue.", "rejected": " red."}"#;
const CONV: &str = r#"{"prompt": [{"role": "user", "content": "sky?"}], "chosen": [{"role": "assistant", "content": "blue"}], "rejected": [{"role": "assistant", "content": "red"}]}"#;

/// A case's file contents: `GOOD` and `CONV` stand for those rows, `<FF>` for a byte that is never UTF-8.
fn contents(text: &str) -> Vec<u8> {
    let text = text.replace("GOOD", GOOD).replace("CONV", CONV);
    text.split("<FF>").collect::<Vec<_>>().join("\u{1}").bytes().map(|b| if b == 1 { 0xff } else { b }).collect()
}

fn write_bytes(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

const ROLES: &str = r#"expected one of "system", "user", "assistant""#;

/// (case, file name, contents, location, reason): the error must read `<path><location>: <reason>`.
const CASES: &[(&str, &str, &str, &str, &str)] = &[
    ("not json", "a.jsonl", "{\"prompt\": \"x\", \"chosen\": \"y\"\n", ":1", "not valid JSON: EOF while parsing an object at line 1 column 29"),
    ("truncated line", "a.jsonl", "GOOD\n{\"prompt\": \"x\", \"cho", ":2", "not valid JSON: EOF while parsing a string at line 1 column 20"),
    ("missing chosen", "a.jsonl", "GOOD\nGOOD\n{\"prompt\": \"x\", \"rejected\": \"y\"}", ":3", "missing field \"chosen\""),
    ("missing rejected", "a.jsonl", "{\"prompt\": \"x\", \"chosen\": \"y\"}", ":1", "missing field \"rejected\""),
    ("empty prompt", "a.jsonl", "{\"prompt\": \"\", \"chosen\": \"y\", \"rejected\": \"z\"}", ":1", "field \"prompt\" is empty"),
    ("blank chosen", "a.jsonl", "{\"prompt\": \"x\", \"chosen\": \"   \", \"rejected\": \"z\"}", ":1", "field \"chosen\" is empty"),
    ("number field", "a.jsonl", "{\"prompt\": \"x\", \"chosen\": 5, \"rejected\": \"z\"}", ":1", "field \"chosen\" must be a string or a list of messages, found a number"),
    ("null field", "a.jsonl", "{\"prompt\": null, \"chosen\": \"y\", \"rejected\": \"z\"}", ":1", "field \"prompt\" must be a string or a list of messages, found null"),
    ("identical", "a.jsonl", "{\"prompt\": \"x\", \"chosen\": \"same\", \"rejected\": \"same\"}", ":1", "chosen and rejected are identical"),
    ("array row", "a.jsonl", "[1, 2]", ":1", "expected a JSON object, found a list"),
    ("role missing", "a.jsonl", "{\"prompt\": [{\"content\": \"hi\"}], \"chosen\": [{\"role\": \"assistant\", \"content\": \"a\"}], \"rejected\": [{\"role\": \"assistant\", \"content\": \"b\"}]}", ":1", "field \"prompt\" message 0 has no \"role\""),
    ("content missing", "a.jsonl", "{\"prompt\": [{\"role\": \"user\"}], \"chosen\": [{\"role\": \"assistant\", \"content\": \"a\"}], \"rejected\": [{\"role\": \"assistant\", \"content\": \"b\"}]}", ":1", "field \"prompt\" message 0 has no \"content\""),
    ("role not string", "a.jsonl", "{\"prompt\": [{\"role\": 1, \"content\": \"hi\"}], \"chosen\": [{\"role\": \"assistant\", \"content\": \"a\"}], \"rejected\": [{\"role\": \"assistant\", \"content\": \"b\"}]}", ":1", "field \"prompt\" message 0: \"role\" must be a string, found a number"),
    ("role empty", "a.jsonl", "{\"prompt\": [{\"role\": \"\", \"content\": \"hi\"}], \"chosen\": [{\"role\": \"assistant\", \"content\": \"a\"}], \"rejected\": [{\"role\": \"assistant\", \"content\": \"b\"}]}", ":1", "field \"prompt\" message 0 has an empty \"role\""),
    ("role unknown", "a.jsonl", "GOOD\n{\"prompt\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"wizard\", \"content\": \"abracadabra\"}], \"chosen\": [{\"role\": \"assistant\", \"content\": \"a\"}], \"rejected\": [{\"role\": \"assistant\", \"content\": \"b\"}]}", ":2", "field \"prompt\" message 1 has role \"wizard\": expected one of \"system\", \"user\", \"assistant\""),
    ("role tool", "a.jsonl", "{\"prompt\": [{\"role\": \"user\", \"content\": \"hi\"}], \"chosen\": [{\"role\": \"tool\", \"content\": \"42\"}], \"rejected\": [{\"role\": \"assistant\", \"content\": \"b\"}]}", ":1", "field \"chosen\" message 0 has role \"tool\": ROLES"),
    ("role capitalised", "a.jsonl", "{\"prompt\": [{\"role\": \"User\", \"content\": \"hi\"}], \"chosen\": [{\"role\": \"assistant\", \"content\": \"a\"}], \"rejected\": [{\"role\": \"assistant\", \"content\": \"b\"}]}", ":1", "field \"prompt\" message 0 has role \"User\": ROLES"),
    ("message not object", "a.jsonl", "{\"prompt\": [\"hi\"], \"chosen\": [{\"role\": \"assistant\", \"content\": \"a\"}], \"rejected\": [{\"role\": \"assistant\", \"content\": \"b\"}]}", ":1", "field \"prompt\" message 0 is a string, expected an object with \"role\" and \"content\""),
    ("empty message list", "a.jsonl", "{\"prompt\": [], \"chosen\": [{\"role\": \"assistant\", \"content\": \"a\"}], \"rejected\": [{\"role\": \"assistant\", \"content\": \"b\"}]}", ":1", "field \"prompt\" is an empty message list"),
    ("mixed formats", "a.jsonl", "{\"prompt\": \"x\", \"chosen\": [{\"role\": \"assistant\", \"content\": \"a\"}], \"rejected\": \"b\"}", ":1", "prompt, chosen and rejected mix plain text and message lists"),
    ("formats mixed across rows", "a.jsonl", "GOOD\nGOOD\nCONV\nGOOD", ":3", "line 3 is conversational but line 1 is standard: one format per file"),
    ("formats mixed, conversational first", "a.jsonl", "\nCONV\nGOOD", ":3", "line 3 is standard but line 2 is conversational: one format per file"),
    ("duplicate key", "a.jsonl", "{\"prompt\": \"a\", \"prompt\": \"b\", \"chosen\": \"y\", \"rejected\": \"z\"}", ":1", "duplicate key \"prompt\""),
    ("duplicate key in a message", "a.jsonl", "GOOD\n{\"prompt\": [{\"role\": \"user\", \"content\": \"hi\"}], \"chosen\": [{\"role\": \"assistant\", \"content\": \"a\", \"content\": \"b\"}], \"rejected\": [{\"role\": \"assistant\", \"content\": \"b\"}]}", ":2", "field \"chosen\" message 0 has a duplicate key \"content\""),
    ("duplicate key in an extra column", "a.jsonl", "{\"prompt\": \"x\", \"chosen\": \"y\", \"rejected\": \"z\", \"meta\": {\"tags\": [{\"k\": 1, \"k\": 2}]}}", ":1", "field \"meta\" has a duplicate key \"k\" (at meta.tags[0])"),
    ("invalid UTF-8", "a.jsonl", "GOOD\n{\"prompt\": \"x<FF>\", \"chosen\": \"y\", \"rejected\": \"z\"}", ":2", "not valid UTF-8 at column 14"),
    ("invalid UTF-8 after a BOM, CRLF", "a.jsonl", "\u{feff}GOOD\r\n<FF>\r\n", ":2", "not valid UTF-8 at column 1"),
    ("implicit prompt, nothing shared", "a.jsonl", "{\"chosen\": \"abc\", \"rejected\": \"xyz\"}", ":1", "no \"prompt\" field and chosen/rejected share no beginning to take it from"),
    ("kto label not bool", "a.jsonl", "{\"prompt\": \"x\", \"completion\": \"y\", \"label\": \"yes\"}", ":1", "field \"label\" must be true or false, found a string"),
    ("completion rows as pairs", "a.jsonl", "{\"prompt\": \"x\", \"completion\": \"y\"}", "", "this is a prompt-completion dataset (SFT or KTO rows); preference pairs need chosen and rejected"),
    ("mixed kinds", "a.jsonl", "GOOD\n{\"prompt\": \"x\", \"completion\": \"y\", \"label\": true}", ":2", "an unpaired {prompt, completion, label} row in a preference dataset (one kind per dataset)"),
    ("json not array", "a.json", "{\"prompt\": \"x\"}", "", "expected a JSON array of records, found an object"),
    ("json element", "a.json", "[GOOD, {\"prompt\": \"x\", \"chosen\": \"y\"}]", " (element 1)", "missing field \"rejected\""),
    ("json syntax", "a.json", "[GOOD,\n{\"prompt\": ]", ":2", "not valid JSON: expected value at line 2 column 12"),
    ("json duplicate key", "a.json", "[GOOD, {\"prompt\": \"x\", \"chosen\": \"y\", \"chosen\": \"w\", \"rejected\": \"z\"}]", " (element 1)", "duplicate key \"chosen\""),
    ("json data duplicate key in a message", "a.json", "{\"data\": [{\"prompt\": [{\"role\": \"user\", \"role\": \"user\", \"content\": \"hi\"}], \"chosen\": [{\"role\": \"assistant\", \"content\": \"a\"}], \"rejected\": [{\"role\": \"assistant\", \"content\": \"b\"}]}]}", " (element 0)", "field \"prompt\" message 0 has a duplicate key \"role\""),
    ("json duplicate key outside the records", "a.json", "{\"data\": [GOOD], \"data\": [GOOD]}", "", "duplicate key \"data\""),
    ("json invalid UTF-8", "a.json", "[GOOD,\n {\"prompt\": \"<FF>\", \"chosen\": \"y\", \"rejected\": \"z\"}]", ":2", "not valid UTF-8 at column 14"),
    ("json formats mixed", "a.json", "[CONV, GOOD]", " (element 1)", "element 1 is standard but element 0 is conversational: one format per file"),
    ("json unknown role", "a.json", "[{\"prompt\": [{\"role\": \"narrator\", \"content\": \"hi\"}], \"chosen\": [{\"role\": \"assistant\", \"content\": \"a\"}], \"rejected\": [{\"role\": \"assistant\", \"content\": \"b\"}]}]", " (element 0)", "field \"prompt\" message 0 has role \"narrator\": ROLES"),
    ("unknown extension", "a.csv", "prompt,chosen,rejected", "", "unknown data format: use a .jsonl, .json or .parquet file, or pass --format"),
    ("empty file", "a.jsonl", "\n\n", "", "no records"),
];

#[test]
fn every_bad_input_names_its_place_and_reason() {
    assert!(CASES.len() >= 40);
    let tok = tokenizer();
    let lengths = LengthOptions { max_length: Some(128), truncation: TruncationMode::KeepStart, ..Default::default() };
    // every mismatch at once, not just the first
    let mut wrong = Vec::new();
    for (case, name, text, location, reason) in CASES {
        let dir = tempfile::tempdir().unwrap();
        let path = write_bytes(dir.path(), name, &contents(text));
        let err = match load_pairs(&path, &tok, lengths) {
            Ok(p) => format!("accepted ({} pairs)", p.pairs.len()),
            Err(e) => e.to_string(),
        };
        let expected = format!("{}{location}: {}", path.display(), reason.replace("ROLES", ROLES));
        if err != expected {
            wrong.push(format!("{case}:\n    got      {err}\n    expected {expected}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// tiny-llama's tokenizer in `dir` with a chat template that drops assistant turns, so every
/// conversational completion tokenises to nothing.
fn tokenizer_dropping_assistant_turns(dir: &Path) -> Tokenizer {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-llama");
    std::fs::copy(src.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let cfg = r#"{"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "chat_template": "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"}"#;
    std::fs::write(dir.join("tokenizer_config.json"), cfg).unwrap();
    Tokenizer::from_dir(dir).unwrap()
}

#[test]
fn completion_empty_after_tokenisation_is_reported() {
    // a chat template that drops assistant turns leaves nothing to learn from
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer_dropping_assistant_turns(dir.path());
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

fn lengths() -> LengthOptions {
    LengthOptions { max_length: Some(128), truncation: TruncationMode::KeepStart, ..Default::default() }
}

const SKIP: ReadOptions = ReadOptions { format: None, skip_invalid: true };

#[test]
fn skip_invalid_skips_only_the_line_that_is_not_utf8() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_bytes(dir.path(), "u.jsonl", &contents("GOOD\n{\"prompt\": \"caf<FF>\", \"chosen\": \"y\", \"rejected\": \"z\"}\nGOOD\n"));
    let prepared = load_pairs_with(&path, &tokenizer(), lengths(), SKIP).unwrap();
    assert_eq!(prepared.pairs.len(), 2);
    let skipped: Vec<String> = prepared.skipped.iter().map(|e| e.to_string()).collect();
    assert_eq!(skipped, vec![format!("{}:2: not valid UTF-8 at column 16", path.display())]);
    assert_eq!(prepared.skipped[0].line(), Some(2));
}

#[test]
fn skip_invalid_with_no_valid_row_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_bytes(dir.path(), "bad.jsonl", &contents("not json\n\n{\"prompt\": \"x\", \"chosen\": \"y\"}\n<FF>\n"));
    let expected = format!(
        "{}: no valid records (3 invalid rows skipped; first: line 1: not valid JSON: expected ident at line 1 column 2)",
        path.display()
    );
    // what `data check --skip-invalid` calls, and both loaders
    assert_eq!(read_rows(&path, SKIP).unwrap_err().to_string(), expected);
    assert_eq!(load_pairs_with(&path, &tokenizer(), lengths(), SKIP).unwrap_err().to_string(), expected);
    let completions = load_completions_with(&path, &tokenizer(), lengths(), SKIP, PairsAs::Chosen);
    assert_eq!(completions.unwrap_err().to_string(), expected);
}

#[test]
fn skip_invalid_names_the_shard_with_no_valid_row() {
    let dir = tempfile::tempdir().unwrap();
    write_bytes(dir.path(), "train-00000.jsonl", &contents("GOOD\nGOOD\n"));
    let bad = write_bytes(dir.path(), "train-00001.jsonl", &contents("{\"prompt\": \"x\", \"prompt\": \"y\", \"chosen\": \"a\", \"rejected\": \"b\"}\n"));
    let err = read_rows(dir.path(), SKIP).unwrap_err().to_string();
    assert_eq!(err, format!("{}: no valid records (1 invalid row skipped; first: line 1: duplicate key \"prompt\")", bad.display()));
}

#[test]
fn skip_invalid_with_nothing_tokenisable_is_an_error() {
    // every pair is empty after tokenisation
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer_dropping_assistant_turns(dir.path());
    let path = write_bytes(dir.path(), "c.jsonl", &contents("CONV\nnot json\nCONV\n"));
    // read skips (line 2) come before tokenisation skips (lines 1 and 3)
    let all = format!("{}: no valid records (3 invalid rows skipped; first: line 2: not valid JSON: expected ident at line 1 column 2)", path.display());
    assert_eq!(load_pairs_with(&path, &tok, lengths(), SKIP).unwrap_err().to_string(), all);
    assert_eq!(load_completions_with(&path, &tok, lengths(), SKIP, PairsAs::Chosen).unwrap_err().to_string(), all);
    let (records, _) = read_preferences(&path, SKIP).unwrap();
    let err = prepare_records(&records, &tok, lengths(), true).unwrap_err().to_string();
    let first = "first: line 1: chosen completion is empty after tokenisation";
    assert_eq!(err, format!("{}: no valid records (2 invalid rows skipped; {first})", path.display()));
}

fn conv(role: &str) -> serde_json::Value {
    serde_json::json!({"prompt": [{"role": role, "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]})
}

#[test]
fn parquet_rows_are_checked_like_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("roles.parquet");
    write_rows(&path, Format::Parquet, &[conv("user"), conv("wizard"), conv("tool")]).unwrap();
    let err = load_pairs(&path, &tokenizer(), lengths()).unwrap_err().to_string();
    assert_eq!(err, format!("{} (row 1): field \"prompt\" message 0 has role \"wizard\": {ROLES}", path.display()));
    let prepared = load_pairs_with(&path, &tokenizer(), lengths(), SKIP).unwrap();
    assert_eq!((prepared.pairs.len(), prepared.skipped.len()), (1, 2));

    let none = dir.path().join("none.parquet");
    write_rows(&none, Format::Parquet, &[conv("tool"), conv("")]).unwrap();
    let err = read_rows(&none, SKIP).unwrap_err().to_string();
    let first = format!("first: row 0: field \"prompt\" message 0 has role \"tool\": {ROLES}");
    assert_eq!(err, format!("{}: no valid records (2 invalid rows skipped; {first})", none.display()));
}

#[test]
fn parquet_shards_of_both_formats_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let good: serde_json::Value = serde_json::from_str(GOOD).unwrap();
    write_rows(&dir.path().join("train-00000.parquet"), Format::Parquet, &[good.clone(), good]).unwrap();
    let second = dir.path().join("train-00001.parquet");
    write_rows(&second, Format::Parquet, &[conv("user")]).unwrap();
    let err = read_rows(dir.path(), ReadOptions::default()).unwrap_err().to_string();
    let reason = "row 0 is conversational but row 0 of train-00000.parquet is standard: one format per dataset";
    assert_eq!(err, format!("{} (row 0): {reason}", second.display()));
}

fn write_batch(path: &Path, fields: Vec<Field>, arrays: Vec<ArrayRef>) {
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

#[test]
fn parquet_duplicate_names_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let text = |s: &str| Arc::new(StringArray::from(vec![s])) as ArrayRef;
    let column = |name: &str| Field::new(name, DataType::Utf8, true);

    let path = dir.path().join("columns.parquet");
    write_batch(&path, vec![column("prompt"), column("chosen"), column("rejected"), column("prompt")], vec![text("x"), text("y"), text("z"), text("w")]);
    let err = read_rows(&path, SKIP).unwrap_err().to_string();
    assert_eq!(err, format!("{}: duplicate column \"prompt\"", path.display()));

    // messages whose struct has "content" twice
    let fields = Fields::from(vec![column("role"), column("content"), column("content")]);
    let mut list = ListBuilder::new(StructBuilder::from_fields(fields.clone(), 1));
    let s = list.values();
    for (i, v) in ["user", "hi", "ho"].iter().enumerate() {
        s.field_builder::<StringBuilder>(i).unwrap().append_value(v);
    }
    s.append(true);
    list.append(true);
    let messages = Arc::new(list.finish()) as ArrayRef;
    let path = dir.path().join("fields.parquet");
    let dtype = messages.data_type().clone();
    write_batch(&path, vec![Field::new("prompt", dtype, true), column("chosen"), column("rejected")], vec![messages, text("y"), text("z")]);
    let err = read_rows(&path, SKIP).unwrap_err().to_string();
    assert_eq!(err, format!("{}: column \"prompt\" has a duplicate struct field \"content\"", path.display()));
}
