//! What both judges produce: a [`Verdict`] per answer, per-prompt [`PromptVerdict`]s, the
//! per-model [`Rates`] and win rate of a [`JudgeReport`], the before/after table, and
//! [`RunReport`], the content of a run's `report.json`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{EvalError, Result};

/// What an answer to one prompt must (and must not) say, from the data row's `facts` and
/// `wrong_facts` fields (case-insensitive phrases).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rubric {
    pub facts: Vec<String>,
    pub wrong_facts: Vec<String>,
}

impl Rubric {
    /// The rubric of a JSON data row, when it has `facts`.
    pub fn from_row(row: &Value) -> Option<Rubric> {
        let list = |key: &str| -> Vec<String> {
            row.get(key)
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
                .unwrap_or_default()
        };
        let facts = list("facts");
        (!facts.is_empty()).then(|| Rubric { facts, wrong_facts: list("wrong_facts") })
    }
}

/// Rubrics of every row of a data file (JSONL, JSON or Parquet, as dipole-data reads them), by
/// record index (`None` for rows without facts).
pub fn rubrics_of(path: &Path) -> Result<Vec<Option<Rubric>>> {
    let rows = dipole_data::record::read_values(path, None)?;
    Ok(rows.iter().map(|(_, _, v)| Rubric::from_row(v)).collect())
}

/// The verdict on one answer.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Every required fact stated and no wrong one; `None` without a rubric.
    pub factual: Option<bool>,
    pub empathetic: bool,
    pub refusal: bool,
}

impl Verdict {
    /// 2 for the facts, 1 for warmth, −1 for a refusal: accuracy first, then tone.
    pub fn score(&self) -> f64 {
        if self.refusal {
            return -1.0;
        }
        2.0 * self.factual.unwrap_or(false) as u8 as f64 + self.empathetic as u8 as f64
    }
}

/// Rates of one model over the judged prompts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    /// Over prompts that have a rubric (LLM judge: over all); `None` when none has.
    pub factual_accuracy: Option<f64>,
    pub empathy: f64,
    pub refusal_rate: f64,
}

/// The judged comparison of trained (policy) and base (reference) generations.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JudgeReport {
    /// `rules`, or `LLM (model)`.
    pub judge: String,
    pub prompts: usize,
    pub base: Rates,
    pub trained: Rates,
    /// Share of prompts where the trained answer is better, ties counting half.
    pub win_rate: f64,
}

/// Per-prompt verdicts for both models and who won (1 trained, 0.5 tie, 0 base).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptVerdict {
    pub index: usize,
    pub trained: Verdict,
    pub base: Verdict,
    pub win: f64,
}

fn rates(verdicts: &[Verdict]) -> Rates {
    let n = verdicts.len().max(1) as f64;
    let with_facts: Vec<bool> = verdicts.iter().filter_map(|v| v.factual).collect();
    Rates {
        factual_accuracy: (!with_facts.is_empty())
            .then(|| with_facts.iter().filter(|&&f| f).count() as f64 / with_facts.len() as f64),
        empathy: verdicts.iter().filter(|v| v.empathetic).count() as f64 / n,
        refusal_rate: verdicts.iter().filter(|v| v.refusal).count() as f64 / n,
    }
}

/// Builds the report of the judge named `judge` from per-prompt verdicts (no verdicts: all rates 0).
pub fn summarise(judge: &str, verdicts: &[PromptVerdict]) -> JudgeReport {
    let trained: Vec<Verdict> = verdicts.iter().map(|v| v.trained).collect();
    let base: Vec<Verdict> = verdicts.iter().map(|v| v.base).collect();
    JudgeReport {
        judge: judge.to_string(),
        prompts: verdicts.len(),
        base: rates(&base),
        trained: rates(&trained),
        win_rate: verdicts.iter().map(|v| v.win).sum::<f64>() / verdicts.len().max(1) as f64,
    }
}

/// The before/after table (Markdown): held-out reward accuracy when given (ties counted half, so
/// step 0 reads 0.5) and the judge's rates.
pub fn format_table(accuracy_before: Option<f64>, accuracy_after: Option<f64>, report: Option<&JudgeReport>) -> String {
    let cell = |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), |x| format!("{x:.3}"));
    let mut rows: Vec<(String, String, String)> = Vec::new();
    if accuracy_before.is_some() || accuracy_after.is_some() {
        rows.push(("held-out reward accuracy".into(), cell(accuracy_before), cell(accuracy_after)));
    }
    if let Some(r) = report {
        let judge = format!("({} judge, {} prompts)", r.judge, r.prompts);
        rows.push((format!("factual accuracy {judge}"), cell(r.base.factual_accuracy), cell(r.trained.factual_accuracy)));
        rows.push(("empathy".into(), cell(Some(r.base.empathy)), cell(Some(r.trained.empathy))));
        rows.push(("refusal rate".into(), cell(Some(r.base.refusal_rate)), cell(Some(r.trained.refusal_rate))));
        rows.push(("win rate, trained over base".into(), String::new(), cell(Some(r.win_rate))));
    }
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(10);
    let mut out = format!("| {:<width$} | {:>8} | {:>8} |\n|{}|{}|{}|\n", "", "base", "trained", "-".repeat(width + 2), "-".repeat(10), "-".repeat(10));
    for (name, before, after) in rows {
        out.push_str(&format!("| {name:<width$} | {before:>8} | {after:>8} |\n"));
    }
    out
}

/// Everything a run's `report.json` holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// Held-out reward accuracy (ties counted half) before the first step and after the last.
    pub accuracy_before: Option<f64>,
    pub accuracy_after: Option<f64>,
    pub judge: Option<JudgeReport>,
    pub verdicts: Vec<PromptVerdict>,
    pub extra: BTreeMap<String, f64>,
}

impl RunReport {
    /// The before/after table of this report ([`format_table`]).
    pub fn table(&self) -> String {
        format_table(self.accuracy_before, self.accuracy_after, self.judge.as_ref())
    }

    /// Writes `report.json` and `report.md` (the table) into `dir`, which must exist; returns the table.
    pub fn write_to(&self, dir: &Path) -> Result<String> {
        let json = serde_json::to_string_pretty(self).map_err(EvalError::Serialize)?;
        let path = dir.join("report.json");
        std::fs::write(&path, json).map_err(|e| EvalError::io(path, e))?;
        let table = self.table();
        let path = dir.join("report.md");
        std::fs::write(&path, &table).map_err(|e| EvalError::io(path, e))?;
        Ok(table)
    }
}
