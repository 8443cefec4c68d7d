//! Judging generations of a trained model against its base, prompt by prompt: a rule-based judge
//! (facts a row says the answer must state, warmth markers, refusals) and an LLM judge behind any
//! OpenAI-compatible chat endpoint. Both produce the same [`JudgeReport`]: per-model factual
//! accuracy, empathy and refusal rates, and the win rate of the trained model over the base.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One prompt answered by the trained model (`policy`) and the base (`reference`), as written to
/// `generations.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    pub index: usize,
    pub prompt: String,
    pub policy: String,
    pub reference: String,
}

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

/// Rubrics of every row of a data file, by row index (`None` for rows without facts).
pub fn rubrics_of(path: &Path) -> Result<Vec<Option<Rubric>>, String> {
    let rows = dipole_data::record::read_values(path, None).map_err(|e| e.to_string())?;
    Ok(rows.iter().map(|(_, _, v)| Rubric::from_row(v)).collect())
}

/// Phrases of a warm, helpful answer.
const EMPATHY: &[&str] = &[
    "sorry for the",
    "i understand",
    "happy to help",
    "glad to help",
    "thanks for reaching out",
    "thank you for",
    "anything else i can",
    "let me know if",
    "i hope this helps",
];
/// Phrases of a refusal.
const REFUSAL: &[&str] = &["can't help with", "cannot help with", "not able to", "unable to assist", "i can't assist", "i won't"];

/// The rule-based verdict on one answer.
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

pub fn judge_answer(answer: &str, rubric: Option<&Rubric>) -> Verdict {
    let text = answer.to_lowercase();
    let has = |p: &str| text.contains(&p.to_lowercase());
    let refusal = REFUSAL.iter().any(|p| has(p));
    Verdict {
        factual: rubric.map(|r| !refusal && r.facts.iter().all(|f| has(f)) && !r.wrong_facts.iter().any(|f| has(f))),
        empathetic: !refusal && EMPATHY.iter().any(|p| has(p)),
        refusal,
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

/// Builds the report from per-prompt verdicts.
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

/// The rule-based judge over generations; `rubrics[index]` is the rubric of the generation's row.
pub fn judge_with_rules(generations: &[Generation], rubrics: &[Option<Rubric>]) -> (JudgeReport, Vec<PromptVerdict>) {
    let verdicts: Vec<PromptVerdict> = generations
        .iter()
        .map(|g| {
            let rubric = rubrics.get(g.index).and_then(|r| r.as_ref());
            let trained = judge_answer(&g.policy, rubric);
            let base = judge_answer(&g.reference, rubric);
            let win = match trained.score().partial_cmp(&base.score()) {
                Some(std::cmp::Ordering::Greater) => 1.0,
                Some(std::cmp::Ordering::Less) => 0.0,
                _ => 0.5,
            };
            PromptVerdict { index: g.index, trained, base, win }
        })
        .collect();
    (summarise("rules", &verdicts), verdicts)
}

/// Reads `generations.jsonl`.
pub fn read_generations(path: &Path) -> Result<Vec<Generation>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1)))
        .collect()
}

/// The before/after table: held-out reward accuracy (ties counted half, so step 0 reads 0.5) and
/// the judge's rates.
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

/// An LLM judge: an OpenAI-compatible `/chat/completions` endpoint over plain HTTP (a local
/// vLLM, llama.cpp or Ollama server, or a relay to a hosted API).
#[derive(Clone, Debug)]
pub struct LlmJudge {
    /// `http://host:port/v1` or the full `.../chat/completions` URL.
    pub url: String,
    pub model: String,
    /// Sent as `Authorization: Bearer ...` when set.
    pub api_key: Option<String>,
    pub timeout: std::time::Duration,
}

/// The instructions the LLM judge gets; its reply must be the JSON object described.
pub const JUDGE_SYSTEM_PROMPT: &str = "You grade customer-support answers. You get a customer's message, optionally the facts a correct answer must state, and two answers A and B. For each answer decide: accurate (it states the correct information and nothing false), empathetic (warm, polite, acknowledges the customer), refusal (it declines to help although the request is legitimate). Then say which answer is better overall, accuracy first, then tone. Reply with only this JSON object: {\"A\": {\"accurate\": true|false, \"empathetic\": true|false, \"refusal\": true|false}, \"B\": {\"accurate\": true|false, \"empathetic\": true|false, \"refusal\": true|false}, \"better\": \"A\"|\"B\"|\"tie\"}";

#[derive(Deserialize)]
struct LlmVerdict {
    accurate: bool,
    empathetic: bool,
    refusal: bool,
}

#[derive(Deserialize)]
struct LlmReply {
    #[serde(rename = "A")]
    a: LlmVerdict,
    #[serde(rename = "B")]
    b: LlmVerdict,
    better: String,
}

impl LlmJudge {
    fn endpoint(&self) -> String {
        let base = self.url.trim_end_matches('/');
        if base.ends_with("/chat/completions") { base.to_string() } else { format!("{base}/chat/completions") }
    }

    /// The chat request for one prompt; `trained_first` puts the trained answer in slot A.
    pub fn request(&self, g: &Generation, rubric: Option<&Rubric>, trained_first: bool) -> Value {
        let (a, b) = if trained_first { (&g.policy, &g.reference) } else { (&g.reference, &g.policy) };
        let facts = rubric.map_or_else(String::new, |r| format!("Facts a correct answer states: {}\n\n", r.facts.join("; ")));
        let user = format!("Customer message:\n{}\n\n{facts}Answer A:\n{a}\n\nAnswer B:\n{b}", g.prompt);
        serde_json::json!({
            "model": self.model,
            "temperature": 0,
            "messages": [
                {"role": "system", "content": JUDGE_SYSTEM_PROMPT},
                {"role": "user", "content": user},
            ],
        })
    }

    /// Parses the judge's reply into (trained, base) verdicts and the win.
    pub fn parse(reply: &str, trained_first: bool) -> Result<(Verdict, Verdict, f64), String> {
        let start = reply.find('{').ok_or_else(|| format!("no JSON object in the judge's reply {:?}", truncate(reply)))?;
        let end = reply.rfind('}').ok_or_else(|| format!("no JSON object in the judge's reply {:?}", truncate(reply)))?;
        let parsed: LlmReply = serde_json::from_str(&reply[start..=end])
            .map_err(|e| format!("judge reply {:?} is not the expected JSON: {e}", truncate(reply)))?;
        let verdict = |v: &LlmVerdict| Verdict {
            factual: Some(v.accurate),
            empathetic: v.empathetic,
            refusal: v.refusal,
        };
        let (a, b) = (verdict(&parsed.a), verdict(&parsed.b));
        let a_wins = match parsed.better.trim().to_ascii_uppercase().as_str() {
            "A" => 1.0,
            "B" => 0.0,
            "TIE" => 0.5,
            other => return Err(format!("judge said better = {other:?}; expected \"A\", \"B\" or \"tie\"")),
        };
        Ok(if trained_first { (a, b, a_wins) } else { (b, a, 1.0 - a_wins) })
    }

    /// Judges every generation (answer order alternates to cancel position bias).
    pub fn judge(&self, generations: &[Generation], rubrics: &[Option<Rubric>]) -> Result<(JudgeReport, Vec<PromptVerdict>), String> {
        let endpoint = self.endpoint();
        let mut verdicts = Vec::with_capacity(generations.len());
        for (k, g) in generations.iter().enumerate() {
            let rubric = rubrics.get(g.index).and_then(|r| r.as_ref());
            let trained_first = k % 2 == 0;
            let body = self.request(g, rubric, trained_first);
            let response = crate::http::post_json(&endpoint, &body, self.api_key.as_deref(), self.timeout)
                .map_err(|e| format!("judge request for prompt {}: {e}", g.index))?;
            let content = response
                .pointer("/choices/0/message/content")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("judge response for prompt {} has no choices[0].message.content: {}", g.index, truncate(&response.to_string())))?;
            let (trained, base, win) =
                Self::parse(content, trained_first).map_err(|e| format!("prompt {}: {e}", g.index))?;
            verdicts.push(PromptVerdict { index: g.index, trained, base, win });
        }
        Ok((summarise(&format!("LLM ({})", self.model), &verdicts), verdicts))
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(300).collect()
}

/// Everything `report.json` holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunReport {
    pub accuracy_before: Option<f64>,
    pub accuracy_after: Option<f64>,
    pub judge: Option<JudgeReport>,
    pub verdicts: Vec<PromptVerdict>,
    pub extra: BTreeMap<String, f64>,
}

/// The held-out reward accuracy (ties counted half) of an eval line.
fn tie_aware_accuracy(eval: Option<&BTreeMap<String, f64>>) -> Option<f64> {
    eval.and_then(|e| e.get("eval_rewards/accuracies_ties_half").copied())
}

/// After a run: judges its generations (rules, or `llm`) against the eval rows' rubrics, writes
/// `report.json` and `report.md` into the output folder and returns the report with its table.
pub fn run_report(
    config: &crate::TrainConfig,
    summary: &crate::TrainSummary,
    llm: Option<&LlmJudge>,
) -> Result<(RunReport, String), String> {
    let mut report = RunReport {
        accuracy_before: tie_aware_accuracy(summary.initial_eval.as_ref()),
        accuracy_after: tie_aware_accuracy(summary.final_eval.as_ref()),
        ..Default::default()
    };
    if let Some(path) = &summary.generations {
        let generations = read_generations(path)?;
        // generation indices are record indices of the eval file (or of the train file it was split from)
        let rubrics = rubrics_of(config.data.eval.as_ref().unwrap_or(&config.data.train))?;
        let (judged, verdicts) = match llm {
            Some(judge) => judge.judge(&generations, &rubrics)?,
            None => judge_with_rules(&generations, &rubrics),
        };
        report.judge = Some(judged);
        report.verdicts = verdicts;
    }
    let table = format_table(report.accuracy_before, report.accuracy_after, report.judge.as_ref());
    let dir = &config.train.output_dir;
    let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("report.json"), json).map_err(|e| format!("{}/report.json: {e}", dir.display()))?;
    std::fs::write(dir.join("report.md"), &table).map_err(|e| format!("{}/report.md: {e}", dir.display()))?;
    Ok((report, table))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rubric() -> Rubric {
        Rubric { facts: vec!["3 to 5 business days".into()], wrong_facts: vec!["10 to 14 business days".into()] }
    }

    #[test]
    fn rules_score_facts_warmth_and_refusals() {
        let r = rubric();
        let good = judge_answer("I'm sorry for the trouble! Standard shipping takes 3 to 5 business days.", Some(&r));
        assert_eq!(good, Verdict { factual: Some(true), empathetic: true, refusal: false });
        let curt = judge_answer("Standard shipping takes 3 to 5 business days.", Some(&r));
        assert_eq!(curt, Verdict { factual: Some(true), empathetic: false, refusal: false });
        let wrong = judge_answer("Happy to help! It takes 10 to 14 business days.", Some(&r));
        assert_eq!(wrong, Verdict { factual: Some(false), empathetic: true, refusal: false });
        let both = judge_answer("Happy to help! 3 to 5 business days, or 10 to 14 business days.", Some(&r));
        assert_eq!(both.factual, Some(false), "stating a wrong fact too is not accurate");
        let refusal = judge_answer("I'm sorry, but I can't help with that request.", Some(&r));
        assert_eq!(refusal, Verdict { factual: Some(false), empathetic: false, refusal: true });
        assert!(good.score() > curt.score() && curt.score() > wrong.score() && wrong.score() > refusal.score());
        assert_eq!(judge_answer("3 to 5 business days", None).factual, None);
    }

    #[test]
    fn win_rate_counts_ties_half() {
        let g = |i: usize, policy: &str, reference: &str| Generation { index: i, prompt: "p".into(), policy: policy.into(), reference: reference.into() };
        let gens = vec![
            g(0, "Happy to help! 3 to 5 business days.", "I'm unable to assist with this topic."),
            g(1, "3 to 5 business days.", "3 to 5 business days."),
            g(2, "I am not able to discuss orders.", "Happy to help! 3 to 5 business days."),
        ];
        let rubrics = vec![Some(rubric()); 3];
        let (report, verdicts) = judge_with_rules(&gens, &rubrics);
        assert_eq!(verdicts.iter().map(|v| v.win).collect::<Vec<_>>(), vec![1.0, 0.5, 0.0]);
        assert_eq!(report.win_rate, 0.5);
        assert_eq!(report.trained.refusal_rate, 1.0 / 3.0);
        assert_eq!(report.base.factual_accuracy, Some(2.0 / 3.0));
        let table = format_table(Some(0.5), Some(0.95), Some(&report));
        assert!(table.contains("held-out reward accuracy") && table.contains("0.950") && table.contains("win rate"), "{table}");
    }

    #[test]
    fn llm_reply_is_parsed_in_either_answer_order() {
        let reply = "Sure. {\"A\": {\"accurate\": true, \"empathetic\": true, \"refusal\": false}, \"B\": {\"accurate\": false, \"empathetic\": false, \"refusal\": true}, \"better\": \"A\"}";
        let (t, b, win) = LlmJudge::parse(reply, true).unwrap();
        assert_eq!((t.refusal, b.refusal, win), (false, true, 1.0));
        let (t, b, win) = LlmJudge::parse(reply, false).unwrap();
        assert_eq!((t.refusal, b.refusal, win), (true, false, 0.0));
        let err = LlmJudge::parse("{\"A\": {}, \"better\": \"A\"}", true).unwrap_err();
        assert!(err.contains("not the expected JSON"), "{err}");
        let err = LlmJudge::parse("no idea", true).unwrap_err();
        assert!(err.contains("no JSON object"), "{err}");
    }
}
