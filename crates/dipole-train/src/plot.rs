//! Small SVG line charts of a run's logged metrics (loss, reward accuracy, margins), written at the
//! end of training; no plotting dependency.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

/// One chart: `series` of (x, y) points with a title and axis labels.
pub fn svg_line_chart(title: &str, x_label: &str, series: &[(&str, Vec<(f64, f64)>)]) -> String {
    let (w, h, left, right, top, bottom) = (640.0, 360.0, 60.0, 20.0, 36.0, 44.0);
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        if x.is_finite() && y.is_finite() {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if !x0.is_finite() {
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
    let _ = writeln!(s, r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{title}</text>"#, w / 2.0);
    let _ = writeln!(s, r#"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#, h - bottom, w - right, h - bottom);
    let _ = writeln!(s, r#"<line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/>"#, h - bottom);
    for k in 0..=4 {
        let y = y0 + (y1 - y0) * k as f64 / 4.0;
        let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="end">{y:.3}</text>"#, left - 6.0, sy(y) + 4.0);
        let x = x0 + (x1 - x0) * k as f64 / 4.0;
        let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">{x:.0}</text>"#, sx(x), h - bottom + 16.0);
    }
    let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">{x_label}</text>"#, (left + w - right) / 2.0, h - 8.0);
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        let path: Vec<String> = pts.iter().filter(|(x, y)| x.is_finite() && y.is_finite()).map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        let _ = writeln!(s, r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#, path.join(" "));
        let _ = writeln!(s, r#"<text x="{}" y="{}" fill="{color}">{name}</text>"#, left + 10.0, top + 14.0 + 14.0 * i as f64);
    }
    s.push_str("</svg>\n");
    s
}

/// `loss.svg`, `reward_accuracy.svg` and `reward_margins.svg` from a run's log lines.
pub fn write_run_plots(dir: &Path, log: &[BTreeMap<String, f64>]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let series = |key: &str| -> Vec<(f64, f64)> {
        log.iter().filter_map(|l| Some((*l.get("step")?, *l.get(key)?))).collect()
    };
    let charts = [
        ("loss.svg", "Training loss", vec![("train loss", series("loss")), ("eval loss", series("eval_loss"))]),
        ("reward_accuracy.svg", "Reward accuracy", vec![("train", series("rewards/accuracies")), ("eval", series("eval_rewards/accuracies"))]),
        ("reward_margins.svg", "Reward margins", vec![("train", series("rewards/margins")), ("eval", series("eval_rewards/margins"))]),
    ];
    for (file, title, s) in charts {
        let s: Vec<(&str, Vec<(f64, f64)>)> = s.into_iter().filter(|(_, p)| !p.is_empty()).collect();
        std::fs::write(dir.join(file), svg_line_chart(title, "step", &s))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_has_one_polyline_per_series() {
        let svg = svg_line_chart("t", "step", &[("a", vec![(1.0, 0.5), (2.0, 0.25)]), ("b", vec![(1.0, 1.0)])]);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }
}
