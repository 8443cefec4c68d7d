//! From judgments to a TRL preference dataset: one `{prompt, chosen, rejected, agreement, votes}`
//! pair per item, by majority vote. A tie is a judgment for neither response, so it counts in the
//! item's judgments but for no side: `agreement` = votes for the majority response / judgments.
//! Every item not exported is listed, with why, in the report (and by the CLI on stderr).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dipole_data::Format;
use dipole_data::record::write_rows;
use serde::Serialize;
use serde_json::{Value, json};

use crate::error::{AnnotateError, Result};
use crate::store::{Store, Vote};

/// When an item is exported.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExportOptions {
    /// Least agreement (share of the item's judgments for the majority response), in [0, 1].
    pub min_agreement: f64,
    /// Fewest judgments an exported item has.
    pub min_votes: usize,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self { min_agreement: 0.6, min_votes: 1 }
    }
}

/// An item's judgments by the response they picked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VoteCounts {
    pub first: usize,
    pub second: usize,
    pub tie: usize,
}

impl VoteCounts {
    pub fn total(&self) -> usize {
        self.first + self.second + self.tie
    }
}

/// Why an item is not in the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Exclusion {
    NoJudgments,
    TooFewVotes,
    /// As many judgments for each response (all ties included).
    NoMajority,
    BelowThreshold,
}

impl Exclusion {
    /// The name in the report (as serialised).
    pub fn key(self) -> &'static str {
        match self {
            Exclusion::NoJudgments => "no_judgments",
            Exclusion::TooFewVotes => "too_few_votes",
            Exclusion::NoMajority => "no_majority",
            Exclusion::BelowThreshold => "below_threshold",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Exclusion::NoJudgments => "no judgments",
            Exclusion::TooFewVotes => "too few judgments",
            Exclusion::NoMajority => "no majority",
            Exclusion::BelowThreshold => "agreement below the threshold",
        }
    }
}

/// The majority response of an item and its agreement, or why there is none to export.
pub fn decide(votes: VoteCounts, options: ExportOptions) -> std::result::Result<(Vote, f64), Exclusion> {
    let total = votes.total();
    if total == 0 {
        return Err(Exclusion::NoJudgments);
    }
    if total < options.min_votes {
        return Err(Exclusion::TooFewVotes);
    }
    if votes.first == votes.second {
        return Err(Exclusion::NoMajority);
    }
    let (winner, count) = if votes.first > votes.second { (Vote::First, votes.first) } else { (Vote::Second, votes.second) };
    let agreement = count as f64 / total as f64;
    // a tolerance so that 3/5 passes 0.6
    if agreement + 1e-9 < options.min_agreement {
        return Err(Exclusion::BelowThreshold);
    }
    Ok((winner, agreement))
}

/// One exported pair.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExportedPair {
    pub item: i64,
    pub prompt: Value,
    pub chosen: Value,
    pub rejected: Value,
    pub agreement: f64,
    /// Judgments for the chosen response, for the rejected one, and ties.
    pub votes: PairVotes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PairVotes {
    pub chosen: usize,
    pub rejected: usize,
    pub tie: usize,
}

/// An item left out, with its votes and where it came from.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Excluded {
    pub item: i64,
    pub origin: String,
    pub reason: Exclusion,
    pub votes: VoteCounts,
    pub agreement: Option<f64>,
}

/// The outcome of an export: the pairs, and every item not among them.
#[derive(Clone, Debug, PartialEq)]
pub struct Export {
    pub items: usize,
    pub options: ExportOptions,
    pub pairs: Vec<ExportedPair>,
    pub excluded: Vec<Excluded>,
}

/// The report's path beside an output file: `pairs.jsonl` -> `pairs.report.json`.
pub fn report_path(out: &Path) -> PathBuf {
    out.with_extension("report.json")
}

impl Store {
    /// Majority pairs of every item of the database, and every item left out with why.
    pub fn export(&self, options: ExportOptions) -> Result<Export> {
        export(self, options)
    }
}

fn export(store: &Store, options: ExportOptions) -> Result<Export> {
    if !(0.0..=1.0).contains(&options.min_agreement) {
        return Err(AnnotateError::InvalidOption(format!("min_agreement must be within [0, 1], got {}", options.min_agreement)));
    }
    let mut counts: BTreeMap<i64, VoteCounts> = BTreeMap::new();
    for (item, _, vote) in store.votes()? {
        let c = counts.entry(item).or_default();
        match vote {
            Vote::First => c.first += 1,
            Vote::Second => c.second += 1,
            Vote::Tie => c.tie += 1,
        }
    }
    let items = store.items()?;
    let mut out = Export { items: items.len(), options, pairs: Vec::new(), excluded: Vec::new() };
    for item in items {
        let votes = counts.get(&item.id).copied().unwrap_or_default();
        match decide(votes, options) {
            Ok((winner, agreement)) => {
                let (chosen, rejected, for_chosen, for_rejected) = match winner {
                    Vote::Second => (item.second, item.first, votes.second, votes.first),
                    _ => (item.first, item.second, votes.first, votes.second),
                };
                let votes = PairVotes { chosen: for_chosen, rejected: for_rejected, tie: votes.tie };
                out.pairs.push(ExportedPair { item: item.id, prompt: item.prompt, chosen, rejected, agreement, votes });
            }
            Err(reason) => {
                let agreement = (votes.total() > 0).then(|| votes.first.max(votes.second) as f64 / votes.total() as f64);
                out.excluded.push(Excluded { item: item.id, origin: item.origin, reason, votes, agreement });
            }
        }
    }
    Ok(out)
}

impl Export {
    /// The exported rows as TRL reads them.
    pub fn rows(&self) -> Vec<Value> {
        self.pairs
            .iter()
            .map(|p| json!({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "agreement": p.agreement, "votes": p.votes}))
            .collect()
    }

    /// The report: settings, counts by reason, and every excluded item.
    pub fn report(&self, db: &Path, out: &Path) -> Value {
        let mut by_reason: BTreeMap<&str, usize> = BTreeMap::new();
        for e in &self.excluded {
            *by_reason.entry(e.reason.key()).or_default() += 1;
        }
        json!({
            "db": db.display().to_string(),
            "out": out.display().to_string(),
            "min_agreement": self.options.min_agreement,
            "min_votes": self.options.min_votes,
            "items": self.items,
            "exported": self.pairs.len(),
            "excluded": self.excluded.len(),
            "excluded_by_reason": by_reason,
            "excluded_items": self.excluded,
        })
    }

    /// Writes the pairs to `out` (JSONL, JSON or Parquet by extension) and the report beside it;
    /// returns the report's path.
    pub fn write(&self, db: &Path, out: &Path) -> Result<PathBuf> {
        let format = Format::of(out).ok_or_else(|| {
            AnnotateError::InvalidOption(format!("{}: unknown output format: use a .jsonl, .json or .parquet file", out.display()))
        })?;
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|cause| AnnotateError::Io { path: dir.to_path_buf(), cause })?;
        }
        write_rows(out, format, &self.rows())?;
        let report = report_path(out);
        let text = serde_json::to_string_pretty(&self.report(db, out)).unwrap_or_default() + "\n";
        std::fs::write(&report, text).map_err(|cause| AnnotateError::Io { path: report.clone(), cause })?;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(first: usize, second: usize, tie: usize) -> VoteCounts {
        VoteCounts { first, second, tie }
    }

    #[test]
    fn majority_agreement_and_exclusions() {
        let o = ExportOptions::default();
        assert_eq!(decide(v(3, 0, 0), o), Ok((Vote::First, 1.0)));
        assert_eq!(decide(v(1, 2, 0), o), Ok((Vote::Second, 2.0 / 3.0)));
        // a tie counts against agreement: 2 of 3
        assert_eq!(decide(v(2, 0, 1), o), Ok((Vote::First, 2.0 / 3.0)));
        // exactly at the threshold passes
        assert_eq!(decide(v(3, 1, 1), o), Ok((Vote::First, 0.6)));
        assert_eq!(decide(v(1, 1, 1), o), Err(Exclusion::NoMajority));
        assert_eq!(decide(v(0, 0, 3), o), Err(Exclusion::NoMajority));
        assert_eq!(decide(v(1, 0, 2), o), Err(Exclusion::BelowThreshold));
        assert_eq!(decide(v(2, 1, 2), o), Err(Exclusion::BelowThreshold));
        assert_eq!(decide(v(0, 0, 0), o), Err(Exclusion::NoJudgments));
        let strict = ExportOptions { min_agreement: 0.0, min_votes: 3 };
        assert_eq!(decide(v(2, 0, 0), strict), Err(Exclusion::TooFewVotes));
        assert_eq!(decide(v(1, 0, 2), strict), Ok((Vote::First, 1.0 / 3.0)));
    }

    #[test]
    fn report_path_sits_beside_the_output() {
        assert_eq!(report_path(Path::new("out/pairs.jsonl")), Path::new("out/pairs.report.json"));
        assert_eq!(report_path(Path::new("pairs")), Path::new("pairs.report.json"));
    }
}
