//! `report.json` and `report.md`: written together, the JSON reads back as the same report, and
//! `generations.jsonl` from disk goes through the rule judge.

mod common;

use common::{generation, shipping};
use dipole_eval::{RunReport, judge_with_rules, read_generations};

#[test]
fn a_report_is_written_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("generations.jsonl");
    let gens = [
        generation(0, "Thanks for your patience! 3 to 5 business days.", "Read the FAQ."),
        generation(1, "3 to 5 business days.", "Sorry, I can't help with that."),
    ];
    let text: String = gens.iter().map(|g| format!("{}\n", serde_json::to_string(g).unwrap())).collect();
    std::fs::write(&path, text).unwrap();
    let read = read_generations(&path).unwrap();
    assert_eq!(read, gens);

    let (judged, verdicts) = judge_with_rules(&read, &[Some(shipping()), Some(shipping())]);
    let report = RunReport { accuracy_before: Some(0.5), accuracy_after: Some(0.9), judge: Some(judged), verdicts, ..Default::default() };
    let table = report.write_to(dir.path()).unwrap();
    assert_eq!(table, report.table());
    assert_eq!(std::fs::read_to_string(dir.path().join("report.md")).unwrap(), table);
    let back: RunReport = serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(back, report);
    assert!(table.contains("|    0.500 |    0.900 |") && table.contains("|          |    1.000 |"), "{table}");

    let err = report.write_to(&dir.path().join("missing")).unwrap_err();
    assert!(err.to_string().contains("report.json"), "{err}");
}

#[test]
fn a_table_without_a_judge_has_only_the_accuracy() {
    let table = RunReport { accuracy_before: Some(0.5), accuracy_after: None, ..Default::default() }.table();
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(table.contains("n/a"), "{table}");
}
