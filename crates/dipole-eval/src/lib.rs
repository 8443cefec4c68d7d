//! Judged win rate, reports and plots for finished runs: reads what a run wrote
//! (`generations.jsonl`, its log lines, the eval rows' `facts`) and needs neither burn nor the
//! trainer.
//!
//! - [`rules`]: the rule-based judge (facts, empathy markers, refusals);
//! - [`llm`]: the LLM judge behind any OpenAI-compatible chat endpoint (`http://` or `https://`);
//! - [`report`]: verdicts, rates, the win rate, the before/after table and `report.json`;
//! - [`plot`]: SVG line charts of a run's metrics.
//!
//! Nothing here prints: results and [`EvalError`]s are returned to the caller.

pub mod error;
pub mod llm;
pub mod plot;
pub mod report;
pub mod rules;

pub use dipole_data::generation::{Generation, read_generations};
pub use error::{EvalError, JudgeFailure, Result};
pub use llm::{JUDGE_SYSTEM_PROMPT, LlmJudge};
pub use plot::{RunPlot, svg_line_chart, write_run_plots};
pub use report::{JudgeReport, PromptVerdict, Rates, Rubric, RunReport, Verdict, format_table, rubrics_of, summarise};
pub use rules::{judge_answer, judge_with_rules};
