//! The database on its own: loading and reusing candidates, tokens that survive reopening, the
//! shown order, judgments and undo, and the export read back as a TRL dataset by dipole-data.

use std::path::Path;

use dipole_annotate::{AnnotateError, Choice, Exclusion, ExportOptions, LoadOutcome, PairMode, Store, Vote, left_is_first, read_candidates};
use dipole_data::{Content, ReadOptions, read_preferences};
use serde_json::json;

fn candidates(dir: &Path, name: &str, n: usize) -> dipole_annotate::Candidates {
    let path = dir.join(name);
    let text: String =
        (1..=n).map(|i| format!("{}\n", json!({"prompt": format!("Q{i}"), "responses": [format!("one {i}"), format!("two {i}")]}))).collect();
    std::fs::write(&path, text).unwrap();
    read_candidates(&path, None, PairMode::All).unwrap()
}

#[test]
fn candidates_load_once_and_a_different_set_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("round.sqlite");
    let set = candidates(dir.path(), "c.jsonl", 5);
    let mut store = Store::open(&db).unwrap();
    assert_eq!(store.load(&set).unwrap(), LoadOutcome::Inserted(5));
    assert_eq!(store.load(&set).unwrap(), LoadOutcome::Reused(5));
    drop(store);
    // the same contents under another name: the same set
    let copy = candidates(dir.path(), "copy.jsonl", 5);
    let mut store = Store::open(&db).unwrap();
    assert_eq!(store.load(&copy).unwrap(), LoadOutcome::Reused(5));
    let other = candidates(dir.path(), "other.jsonl", 6);
    let e = store.load(&other).unwrap_err();
    assert!(matches!(e, AnnotateError::CandidatesMismatch { held: 5, given: 6, .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("round.sqlite") && msg.contains("c.jsonl") && msg.contains("other.jsonl") && msg.contains("use a new --db"), "{msg}");
    // WAL journal, and the items untouched by the refused load
    assert_eq!(store.item_count().unwrap(), 5);
    let conn = rusqlite::Connection::open(&db).unwrap();
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn tokens_survive_reopening_and_new_names_get_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("round.sqlite");
    let mut store = Store::open(&db).unwrap();
    let first = store.add_annotators(&["alice".into(), "bob".into()]).unwrap();
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|a| a.token.len() == 32 && a.token.chars().all(|c| c.is_ascii_hexdigit())));
    assert_ne!(first[0].token, first[1].token);
    drop(store);
    let mut store = Store::open(&db).unwrap();
    let again = store.add_annotators(&["bob".into(), "carol".into()]).unwrap();
    assert_eq!(&again[..2], &first[..], "known annotators keep their tokens");
    assert_eq!(again[2].name, "carol");
    assert!(!first.iter().any(|a| a.token == again[2].token));
    assert_eq!(store.authenticate(&again[2].token).unwrap().name, "carol");
    assert!(matches!(store.authenticate("nope"), Err(AnnotateError::UnknownToken)));
    for bad in ["", "a b", "x/y", "é", &"n".repeat(65)] {
        assert!(matches!(store.add_annotators(&[bad.to_string()]), Err(AnnotateError::AnnotatorName { .. })), "{bad:?}");
    }
    assert_eq!(again[0].url("http://127.0.0.1:8080/"), format!("http://127.0.0.1:8080/?token={}", again[0].token));
}

#[test]
fn a_file_that_is_not_an_annotation_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.sqlite");
    std::fs::write(&text, "just some text, long enough to look like a header of something else entirely ......").unwrap();
    let e = Store::open(&text).err().expect("a text file is not a database");
    assert!(matches!(e, AnnotateError::Database { .. }), "{e:?}");
    assert!(e.to_string().contains("notes.sqlite"), "{e}");
    // an SQLite file with someone else's tables is refused, and left as it was
    let foreign = dir.path().join("foreign.sqlite");
    rusqlite::Connection::open(&foreign).unwrap().execute_batch("CREATE TABLE t (x INTEGER);").unwrap();
    let e = Store::open(&foreign).err().expect("a foreign database");
    assert!(e.to_string().contains("not an annotation database"), "{e}");
    let conn = rusqlite::Connection::open(&foreign).unwrap();
    let tables: i64 = conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0)).unwrap();
    assert_eq!(tables, 1);
}

#[test]
fn sides_are_fixed_per_annotator_and_both_orders_occur() {
    let alice: Vec<bool> = (1..=64).map(|i| left_is_first(i, "alice")).collect();
    assert_eq!(alice, (1..=64).map(|i| left_is_first(i, "alice")).collect::<Vec<_>>());
    let lefts = alice.iter().filter(|&&b| b).count();
    assert!((16..=48).contains(&lefts), "{lefts} of 64 first-left");
    let bob: Vec<bool> = (1..=64).map(|i| left_is_first(i, "bob")).collect();
    assert_ne!(alice, bob);
    assert_eq!(Choice::A.vote(true), Vote::First);
    assert_eq!(Choice::A.vote(false), Vote::Second);
    assert_eq!(Choice::B.vote(false), Vote::First);
    assert_eq!(Choice::Tie.vote(true), Vote::Tie);
}

/// Judgments through the store, then the export: majority pairs read back by dipole-data, every
/// other item in the report with its reason.
#[test]
fn export_writes_majority_pairs_and_reports_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("round.sqlite");
    let mut store = Store::open(&db).unwrap();
    store.load(&candidates(dir.path(), "c.jsonl", 5)).unwrap();
    let people = store.add_annotators(&["a".into(), "b".into(), "c".into()]).unwrap();
    // votes per item (first / second / tie) for annotators a, b, c
    let plan = [
        [Vote::First, Vote::First, Vote::First],   // 1: first, 3/3
        [Vote::Second, Vote::Second, Vote::First], // 2: second, 2/3
        [Vote::First, Vote::Second, Vote::Tie],    // 3: no majority
        [Vote::First, Vote::Tie, Vote::Tie],       // 4: first, 1/3 < 0.6
    ]; // 5: no judgments
    for (i, votes) in plan.iter().enumerate() {
        let item = i as i64 + 1;
        for (who, vote) in people.iter().zip(votes) {
            let left_first = left_is_first(item, &who.name);
            let choice = match (vote, left_first) {
                (Vote::Tie, _) => Choice::Tie,
                (Vote::First, true) | (Vote::Second, false) => Choice::A,
                _ => Choice::B,
            };
            assert_eq!(store.judge(who, item, choice, None).unwrap().vote, *vote);
        }
    }
    assert!(store.next(&people[0], 3).unwrap().is_some_and(|s| s.item == 5));
    assert!(matches!(store.judge(&people[0], 1, Choice::A, None), Err(AnnotateError::AlreadyJudged { item: 1, .. })));
    assert!(matches!(store.judge(&people[0], 77, Choice::A, None), Err(AnnotateError::NoSuchItem { item: 77 })));

    let export = store.export(ExportOptions::default()).unwrap();
    let exported: Vec<(i64, f64)> = export.pairs.iter().map(|p| (p.item, p.agreement)).collect();
    assert_eq!(exported, vec![(1, 1.0), (2, 2.0 / 3.0)]);
    let reasons: Vec<(i64, Exclusion)> = export.excluded.iter().map(|e| (e.item, e.reason)).collect();
    assert_eq!(reasons, vec![(3, Exclusion::NoMajority), (4, Exclusion::BelowThreshold), (5, Exclusion::NoJudgments)]);

    let out = dir.path().join("out").join("pairs.jsonl");
    let report = export.write(&db, &out).unwrap();
    assert_eq!(report, dir.path().join("out").join("pairs.report.json"));
    let (pairs, skipped) = read_preferences(&out, ReadOptions::default()).unwrap();
    assert!(skipped.is_empty());
    assert_eq!(pairs.len(), 2);
    assert_eq!(pairs[1].prompt, Content::Text("Q2".into()));
    assert_eq!(pairs[1].chosen, Content::Text("two 2".into()));
    assert_eq!(pairs[1].rejected, Content::Text("one 2".into()));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows[1]["votes"], json!({"chosen": 2, "rejected": 1, "tie": 0}));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
    assert_eq!(report["exported"], 2);
    assert_eq!(report["excluded_by_reason"], json!({"below_threshold": 1, "no_judgments": 1, "no_majority": 1}));
    assert_eq!(report["excluded_items"][1]["votes"], json!({"first": 1, "second": 0, "tie": 2}));
    assert!(report["excluded_items"][0]["origin"].as_str().unwrap().ends_with("c.jsonl:3 responses 0,1"));

    // a lower threshold lets item 4 through; a threshold outside [0, 1] is refused
    let lax = store.export(ExportOptions { min_agreement: 0.3, min_votes: 1 }).unwrap();
    assert_eq!(lax.pairs.len(), 3);
    assert!(matches!(store.export(ExportOptions { min_agreement: 1.5, min_votes: 1 }), Err(AnnotateError::InvalidOption(_))));
}
