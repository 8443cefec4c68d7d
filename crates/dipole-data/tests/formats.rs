//! Every format reads to the same records: JSONL, JSON arrays, Parquet, folders of shards; implicit
//! prompts; unpaired KTO rows.

use std::path::{Path, PathBuf};

use dipole_data::record::write_rows;
use dipole_data::{Content, Format, ReadOptions, read_preferences, read_rows};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/data").join(name)
}

fn same_records(a: &Path, b: &Path) {
    let (x, _) = read_preferences(a, ReadOptions::default()).unwrap();
    let (y, _) = read_preferences(b, ReadOptions::default()).unwrap();
    assert_eq!(x.len(), y.len());
    for (r, s) in x.iter().zip(&y) {
        assert_eq!((&r.prompt, &r.chosen, &r.rejected), (&s.prompt, &s.chosen, &s.rejected), "record {}", r.index);
    }
}

#[test]
fn jsonl_to_parquet_and_json_round_trip() {
    for name in ["prefs_standard.jsonl", "prefs_conversational.jsonl"] {
        let src = fixture(name);
        let (records, _) = read_preferences(&src, ReadOptions::default()).unwrap();
        let rows: Vec<_> = records.iter().map(|r| r.to_json()).collect();
        let dir = tempfile::tempdir().unwrap();
        for (file, format) in [("out.parquet", Format::Parquet), ("out.json", Format::Json), ("out.jsonl", Format::Jsonl)] {
            let path = dir.path().join(file);
            write_rows(&path, format, &rows).unwrap();
            same_records(&src, &path);
        }
    }
}

#[test]
fn folder_of_shards_reads_in_name_order() {
    let (records, _) = read_preferences(&fixture("prefs_standard.jsonl"), ReadOptions::default()).unwrap();
    let rows: Vec<_> = records.iter().map(|r| r.to_json()).collect();
    let dir = tempfile::tempdir().unwrap();
    write_rows(&dir.path().join("train-00001.parquet"), Format::Parquet, &rows[40..]).unwrap();
    write_rows(&dir.path().join("train-00000.parquet"), Format::Parquet, &rows[..40]).unwrap();
    let (again, _) = read_preferences(dir.path(), ReadOptions::default()).unwrap();
    assert_eq!(again.len(), records.len());
    assert_eq!(again[41].chosen, records[41].chosen);
    assert_eq!(again[41].index, 41);
}

#[test]
fn implicit_prompt_is_the_common_beginning() {
    // one file per format: a file may not mix them
    let dir = tempfile::tempdir().unwrap();
    let conversational = dir.path().join("implicit-conversational.jsonl");
    let standard = dir.path().join("implicit-standard.jsonl");
    std::fs::write(
        &conversational,
        r#"{"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}], "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]}"#,
    )
    .unwrap();
    std::fs::write(
        &standard,
        r#"{"chosen": "Question: sky? Answer: blue", "rejected": "Question: sky? Answer: red", "source": "extra columns are ignored"}"#,
    )
    .unwrap();
    let (r, _) = read_preferences(&conversational, ReadOptions::default()).unwrap();
    match &r[0].prompt {
        Content::Messages(m) => assert_eq!(m.len(), 1),
        other => panic!("{other:?}"),
    }
    let (r, _) = read_preferences(&standard, ReadOptions::default()).unwrap();
    assert_eq!(r[0].prompt, Content::Text("Question: sky? Answer:".into()));
    assert_eq!(r[0].chosen, Content::Text(" blue".into()));
}

#[test]
fn unpaired_kto_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kto.parquet");
    let rows = vec![
        serde_json::json!({"prompt": "Q1", "completion": " good", "label": true}),
        serde_json::json!({"prompt": "Q2", "completion": " bad", "label": false}),
    ];
    write_rows(&path, Format::Parquet, &rows).unwrap();
    let read = read_rows(&path, ReadOptions::default()).unwrap();
    assert_eq!(read.unpaired.len(), 2);
    assert_eq!((read.unpaired[0].label, read.unpaired[1].label), (Some(true), Some(false)));
    assert!(read_preferences(&path, ReadOptions::default()).unwrap_err().to_string().contains("prompt-completion dataset"));
}
