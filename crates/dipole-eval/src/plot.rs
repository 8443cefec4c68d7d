//! Small SVG line charts of a run's logged metrics (loss, reward accuracy, margins); no plotting
//! dependency.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use crate::error::{EvalError, Result};

/// One line of a chart: a name (the legend) and its (x, y) points.
pub type Series<'a> = (&'a str, Vec<(f64, f64)>);

/// `&`, `<`, `>` and `"` escaped for SVG text and attributes.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// One chart as an SVG document: a `<polyline>` and a legend entry per series, axes scaled to the
/// finite points (non-finite ones are left out). A chart without a finite point is an empty plot:
/// axes on [0, 1], no line, and "no data" in the middle.
pub fn svg_line_chart(title: &str, x_label: &str, series: &[Series<'_>]) -> String {
    let (w, h, left, right, top, bottom) = (640.0, 360.0, 60.0, 20.0, 36.0, 44.0);
    let finite = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in series.iter().flat_map(|(_, p)| p.iter()).filter(|p| finite(p)) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let empty = !x0.is_finite();
    if empty {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-12 {
        y0 -= 0.5;
        y1 += 0.5;
    }
    let sx = |x: f64| left + (x - x0) / (x1 - x0) * (w - left - right);
    let sy = |y: f64| top + (1.0 - (y - y0) / (y1 - y0)) * (h - top - bottom);
    let mut s = String::new();
    let _ = writeln!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#);
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#, w / 2.0, escape(title));
    let _ = writeln!(s, r#"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#, h - bottom, w - right, h - bottom);
    let _ = writeln!(s, r#"<line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/>"#, h - bottom);
    for k in 0..=4 {
        let y = y0 + (y1 - y0) * k as f64 / 4.0;
        let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="end">{y:.3}</text>"#, left - 6.0, sy(y) + 4.0);
        let x = x0 + (x1 - x0) * k as f64 / 4.0;
        let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">{x:.0}</text>"#, sx(x), h - bottom + 16.0);
    }
    let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#, (left + w - right) / 2.0, h - 8.0, escape(x_label));
    if empty {
        let _ = writeln!(s, r##"<text x="{}" y="{}" text-anchor="middle" fill="#888">no data</text>"##, (left + w - right) / 2.0, (top + h - bottom) / 2.0);
    } else {
        let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = colors[i % colors.len()];
            let path: Vec<String> = pts.iter().filter(|p| finite(p)).map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
            let _ = writeln!(s, r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#, path.join(" "));
            let _ = writeln!(s, r#"<text x="{}" y="{}" fill="{color}">{}</text>"#, left + 10.0, top + 14.0 + 14.0 * i as f64, escape(name));
        }
    }
    s.push_str("</svg>\n");
    s
}

/// One chart of [`write_run_plots`].
#[derive(Clone, Copy, Debug)]
pub struct RunPlot {
    pub file: &'static str,
    pub title: &'static str,
    /// (legend, metric key of the log lines) per series.
    pub series: &'static [(&'static str, &'static str)],
}

/// The charts of [`write_run_plots`].
pub const RUN_PLOTS: &[RunPlot] = &[
    RunPlot { file: "loss.svg", title: "Training loss", series: &[("train loss", "loss"), ("eval loss", "eval_loss")] },
    RunPlot { file: "reward_accuracy.svg", title: "Reward accuracy", series: &[("train", "rewards/accuracies"), ("eval", "eval_rewards/accuracies")] },
    RunPlot { file: "reward_margins.svg", title: "Reward margins", series: &[("train", "rewards/margins"), ("eval", "eval_rewards/margins")] },
];

/// Writes the [`RUN_PLOTS`] (`loss.svg`, `reward_accuracy.svg`, `reward_margins.svg`) of a run's log
/// lines (TRL's names, each with its `step`) into `dir`, created if missing, and returns their paths.
/// A series the log has no point of is left out; a chart with none is an empty plot
/// ([`svg_line_chart`]). An empty log is [`EvalError::EmptyHistory`], and nothing is written.
pub fn write_run_plots(dir: &Path, log: &[BTreeMap<String, f64>]) -> Result<Vec<PathBuf>> {
    if log.is_empty() {
        return Err(EvalError::EmptyHistory);
    }
    std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
    let points = |key: &str| -> Vec<(f64, f64)> { log.iter().filter_map(|l| Some((*l.get("step")?, *l.get(key)?))).collect() };
    let mut written = Vec::new();
    for plot in RUN_PLOTS {
        let series: Vec<Series<'_>> = plot.series.iter().map(|&(name, key)| (name, points(key))).filter(|(_, p)| !p.is_empty()).collect();
        let path = dir.join(plot.file);
        std::fs::write(&path, svg_line_chart(plot.title, "step", &series)).map_err(|e| EvalError::io(&path, e))?;
        written.push(path);
    }
    Ok(written)
}
