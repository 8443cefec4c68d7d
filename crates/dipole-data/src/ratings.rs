//! Preference pairs from rated responses (production logs, UltraFeedback-style ratings) and unpaired
//! KTO rows from thumbs up/down.
//!
//! Accepted rows: `{prompt, response, rating}` (grouped by prompt), `{prompt, responses: [..],
//! ratings: [..]}`, or `{prompt, completions: [{response|text, rating|score}]}`; for thumbs,
//! `{prompt, response, thumbs: "up"|"down"|true|false}`.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::error::{DataError, Location, Result};

/// How rated responses become pairs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PairMode {
    /// Highest against lowest rating per prompt (one pair per prompt).
    BestWorst,
    /// Every pair whose ratings differ by at least `min_gap`.
    AllPairs { min_gap: f64 },
}

fn text(v: &Value) -> Option<&str> {
    v.as_str().filter(|s| !s.trim().is_empty())
}

fn number(v: Option<&Value>) -> Option<f64> {
    match v? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A prompt with its `(response, rating)`s.
type Rated = (String, Vec<(String, f64)>);

/// Rated responses per prompt, in first-seen order.
fn collect(values: &[(Location, Value)], path: &Path) -> Result<Vec<Rated>> {
    let mut order: Vec<String> = Vec::new();
    let mut groups: BTreeMap<String, Vec<(String, f64)>> = BTreeMap::new();
    for (loc, v) in values {
        let bad = |reason: &str| DataError::located(path, Some(*loc), reason.to_string());
        let prompt = v.get("prompt").and_then(text).ok_or_else(|| bad("missing or empty \"prompt\""))?.to_string();
        let mut rated: Vec<(String, f64)> = Vec::new();
        if let Some(resp) = v.get("response") {
            let r = text(resp).ok_or_else(|| bad("\"response\" must be a non-empty string"))?;
            let rating = number(v.get("rating")).ok_or_else(|| bad("missing numeric \"rating\""))?;
            rated.push((r.to_string(), rating));
        } else if let (Some(Value::Array(rs)), Some(Value::Array(ts))) = (v.get("responses"), v.get("ratings")) {
            if rs.len() != ts.len() {
                return Err(bad(&format!("{} responses but {} ratings", rs.len(), ts.len())));
            }
            for (r, t) in rs.iter().zip(ts) {
                let r = text(r).ok_or_else(|| bad("every response must be a non-empty string"))?;
                let t = number(Some(t)).ok_or_else(|| bad("every rating must be a number"))?;
                rated.push((r.to_string(), t));
            }
        } else if let Some(Value::Array(cs)) = v.get("completions") {
            for c in cs {
                let r = c.get("response").or_else(|| c.get("text")).and_then(text).ok_or_else(|| bad("a completion has no \"response\" text"))?;
                let t = number(c.get("rating").or_else(|| c.get("score")).or_else(|| c.get("overall_score")))
                    .ok_or_else(|| bad("a completion has no numeric \"rating\""))?;
                rated.push((r.to_string(), t));
            }
        } else {
            return Err(bad("expected \"response\" + \"rating\", \"responses\" + \"ratings\", or \"completions\""));
        }
        if !groups.contains_key(&prompt) {
            order.push(prompt.clone());
        }
        groups.entry(prompt).or_default().extend(rated);
    }
    Ok(order.into_iter().map(|p| { let g = groups.remove(&p).unwrap_or_default(); (p, g) }).collect())
}

/// What `ratings_to_pairs` made and what it could not use.
#[derive(Clone, Debug, Default)]
pub struct PairsReport {
    pub pairs: Vec<Value>,
    /// Prompts without two differently rated responses.
    pub prompts_without_pair: usize,
}

/// Turns rated responses into `{prompt, chosen, rejected}` rows.
pub fn ratings_to_pairs(values: &[(Location, Value)], path: &Path, mode: PairMode) -> Result<PairsReport> {
    let mut report = PairsReport::default();
    for (prompt, mut rated) in collect(values, path)? {
        // stable: ties keep input order
        rated.sort_by(|a, b| b.1.total_cmp(&a.1));
        let before = report.pairs.len();
        match mode {
            PairMode::BestWorst => {
                if let (Some(best), Some(worst)) = (rated.first(), rated.last())
                    && best.1 > worst.1 && best.0 != worst.0 {
                        report.pairs.push(serde_json::json!({"prompt": prompt, "chosen": best.0, "rejected": worst.0, "score_chosen": best.1, "score_rejected": worst.1}));
                    }
            }
            PairMode::AllPairs { min_gap } => {
                for i in 0..rated.len() {
                    for j in i + 1..rated.len() {
                        let (a, b) = (&rated[i], &rated[j]);
                        if a.1 - b.1 >= min_gap && a.1 > b.1 && a.0 != b.0 {
                            report.pairs.push(serde_json::json!({"prompt": prompt, "chosen": a.0, "rejected": b.0, "score_chosen": a.1, "score_rejected": b.1}));
                        }
                    }
                }
            }
        }
        if report.pairs.len() == before {
            report.prompts_without_pair += 1;
        }
    }
    Ok(report)
}

/// Turns `{prompt, response, thumbs}` rows into unpaired KTO rows `{prompt, completion, label}`.
pub fn thumbs_to_unpaired(values: &[(Location, Value)], path: &Path) -> Result<Vec<Value>> {
    values
        .iter()
        .map(|(loc, v)| {
            let bad = |reason: &str| DataError::located(path, Some(*loc), reason.to_string());
            let prompt = v.get("prompt").and_then(text).ok_or_else(|| bad("missing or empty \"prompt\""))?;
            let response = v.get("response").and_then(text).ok_or_else(|| bad("missing or empty \"response\""))?;
            let label = match v.get("thumbs") {
                Some(Value::Bool(b)) => *b,
                Some(Value::String(s)) if matches!(s.as_str(), "up" | "👍" | "good" | "1") => true,
                Some(Value::String(s)) if matches!(s.as_str(), "down" | "👎" | "bad" | "0") => false,
                Some(Value::Number(n)) if n.as_f64() == Some(1.0) => true,
                Some(Value::Number(n)) if n.as_f64() == Some(0.0) || n.as_f64() == Some(-1.0) => false,
                _ => return Err(bad("\"thumbs\" must be \"up\"/\"down\", true/false or 1/0")),
            };
            Ok(serde_json::json!({"prompt": prompt, "completion": response, "label": label}))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(v: Vec<Value>) -> Vec<(Location, Value)> {
        v.into_iter().enumerate().map(|(i, v)| (Location::Line(i + 1), v)).collect()
    }

    #[test]
    fn best_vs_worst_and_gap_pairs() {
        let data = rows(vec![
            serde_json::json!({"prompt": "p", "response": "a", "rating": 5}),
            serde_json::json!({"prompt": "p", "response": "b", "rating": 2}),
            serde_json::json!({"prompt": "p", "response": "c", "rating": 4}),
            serde_json::json!({"prompt": "q", "responses": ["x", "y"], "ratings": [3, 3]}),
        ]);
        let r = ratings_to_pairs(&data, Path::new("r.jsonl"), PairMode::BestWorst).unwrap();
        assert_eq!(r.pairs.len(), 1);
        assert_eq!(r.pairs[0]["chosen"], "a");
        assert_eq!(r.pairs[0]["rejected"], "b");
        assert_eq!(r.prompts_without_pair, 1);
        let r = ratings_to_pairs(&data, Path::new("r.jsonl"), PairMode::AllPairs { min_gap: 1.5 }).unwrap();
        let got: Vec<(String, String)> = r.pairs.iter().map(|p| (p["chosen"].as_str().unwrap().into(), p["rejected"].as_str().unwrap().into())).collect();
        assert_eq!(got, vec![("a".into(), "b".into()), ("c".into(), "b".into())]);
    }

    #[test]
    fn ultrafeedback_completions_and_errors_name_the_line() {
        let data = rows(vec![
            serde_json::json!({"prompt": "p", "completions": [{"response": "a", "overall_score": 8.5}, {"text": "b", "rating": 3}]}),
            serde_json::json!({"prompt": "q", "response": "x"}),
        ]);
        let err = ratings_to_pairs(&data, Path::new("r.jsonl"), PairMode::BestWorst).unwrap_err().to_string();
        assert!(err.contains("r.jsonl:2:") && err.contains("rating"), "{err}");
        let r = ratings_to_pairs(&data[..1], Path::new("r.jsonl"), PairMode::BestWorst).unwrap();
        assert_eq!(r.pairs[0]["chosen"], "a");
    }

    #[test]
    fn thumbs_become_kto_rows() {
        let data = rows(vec![
            serde_json::json!({"prompt": "p", "response": "a", "thumbs": "up"}),
            serde_json::json!({"prompt": "p", "response": "b", "thumbs": false}),
        ]);
        let out = thumbs_to_unpaired(&data, Path::new("t.jsonl")).unwrap();
        assert_eq!(out[0]["label"], true);
        assert_eq!(out[1]["label"], false);
        let bad = rows(vec![serde_json::json!({"prompt": "p", "response": "a", "thumbs": "meh"})]);
        assert!(thumbs_to_unpaired(&bad, Path::new("t.jsonl")).unwrap_err().to_string().contains("t.jsonl:1:"));
    }
}
