//! What `cargo xtask train` writes after a run returns: the plots of its metrics and the judged
//! before/after report (`report.json`, `report.md`), from dipole-eval's pieces.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use dipole_eval::{LlmJudge, RunReport, judge_with_rules, read_generations, rubrics_of};
use dipole_train::{TrainConfig, TrainSummary};

/// The held-out reward accuracy (ties counted half, so step 0 reads 0.5) of an eval line.
pub fn heldout_accuracy(eval: Option<&BTreeMap<String, f64>>) -> Option<f64> {
    eval.and_then(|e| e.get("eval_rewards/accuracies_ties_half").copied())
}

/// Whether `train` ran the run to its last step: only then does the trainer write the final weights
/// and set `final_dir` (a run stopped early keeps its checkpoints only).
pub fn finished(summary: &TrainSummary) -> bool {
    !summary.final_dir.as_os_str().is_empty()
}

/// `output_dir/plots` (`loss.svg`, `reward_accuracy.svg`, `reward_margins.svg`) of a finished run
/// that logged anything; the files written (none otherwise).
pub fn write_plots(config: &TrainConfig, summary: &TrainSummary) -> Result<Vec<PathBuf>> {
    if !finished(summary) || summary.log_history.is_empty() {
        return Ok(Vec::new());
    }
    Ok(dipole_eval::write_run_plots(&config.train.output_dir.join("plots"), &summary.log_history)?)
}

/// After a run: judges its generations (rules, or `llm`) against the eval rows' rubrics, writes
/// `report.json` and `report.md` into the output folder and returns the report with its table.
pub fn run_report(config: &TrainConfig, summary: &TrainSummary, llm: Option<&LlmJudge>) -> Result<(RunReport, String)> {
    let mut report = RunReport {
        accuracy_before: heldout_accuracy(summary.initial_eval.as_ref()),
        accuracy_after: heldout_accuracy(summary.final_eval.as_ref()),
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
    let dir = &config.train.output_dir;
    let table = report.write_to(dir).with_context(|| format!("the report of the run in {}", dir.display()))?;
    Ok((report, table))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dipole_eval::Generation;

    fn eval_line(accuracy: f64) -> BTreeMap<String, f64> {
        BTreeMap::from([("step".to_string(), 10.0), ("eval_loss".to_string(), 0.5), ("eval_rewards/accuracies_ties_half".to_string(), accuracy)])
    }

    #[test]
    fn a_finished_run_gets_its_report_and_plots() {
        let dir = tempfile::tempdir().unwrap();
        let eval = dir.path().join("heldout.jsonl");
        let row = serde_json::json!({"prompt": "How long does shipping take?", "chosen": "c", "rejected": "r", "facts": ["3 to 5 business days"], "wrong_facts": ["10 to 14 business days"]});
        std::fs::write(&eval, format!("{row}\n")).unwrap();
        let generations = dir.path().join("generations.jsonl");
        let g = Generation {
            index: 0,
            prompt: "How long does shipping take?".into(),
            policy: "Thank you for asking! Shipping takes 3 to 5 business days.".into(),
            reference: "10 to 14 business days.".into(),
        };
        std::fs::write(&generations, format!("{}\n", serde_json::to_string(&g).unwrap())).unwrap();
        let mut config = TrainConfig::default();
        config.data.eval = Some(eval);
        config.train.output_dir = dir.path().join("run");
        std::fs::create_dir_all(&config.train.output_dir).unwrap();
        let summary = TrainSummary {
            steps: 10,
            log_history: vec![BTreeMap::from([("step".to_string(), 10.0), ("loss".to_string(), 0.6)]), eval_line(1.0)],
            initial_eval: Some(eval_line(0.5)),
            final_eval: Some(eval_line(1.0)),
            generations: Some(generations),
            final_dir: dir.path().join("run/final"),
            ..Default::default()
        };

        let (report, table) = run_report(&config, &summary, None).unwrap();
        assert_eq!((report.accuracy_before, report.accuracy_after), (Some(0.5), Some(1.0)));
        let judged = report.judge.as_ref().unwrap();
        assert_eq!((judged.prompts, judged.win_rate, judged.trained.factual_accuracy), (1, 1.0, Some(1.0)));
        assert!(table.contains("win rate") && table.contains("1.000"), "{table}");
        let out = &config.train.output_dir;
        assert_eq!(std::fs::read_to_string(out.join("report.md")).unwrap(), table);
        let json: RunReport = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
        assert_eq!(json, report);

        let plots = write_plots(&config, &summary).unwrap();
        assert_eq!(plots.len(), 3);
        assert!(std::fs::read_to_string(out.join("plots/loss.svg")).unwrap().contains("<polyline"));

        // stopped before its last step: no final weights, no plots
        let stopped = TrainSummary { final_dir: PathBuf::new(), ..summary };
        std::fs::remove_dir_all(out.join("plots")).unwrap();
        assert!(write_plots(&config, &stopped).unwrap().is_empty());
        assert!(!out.join("plots").exists());
    }

    #[test]
    fn a_missing_generations_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = TrainConfig::default();
        config.train.output_dir = dir.path().to_path_buf();
        let summary = TrainSummary { generations: Some(dir.path().join("generations.jsonl")), ..Default::default() };
        let err = run_report(&config, &summary, None).unwrap_err();
        assert!(format!("{err:#}").contains("generations.jsonl"), "{err:#}");
    }
}
