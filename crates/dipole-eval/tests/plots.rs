//! SVG charts: a document per chart with one polyline per series, names escaped, a documented empty
//! plot for a chart without data, and an error for a run that logged nothing.

use std::collections::BTreeMap;

use dipole_eval::{EvalError, svg_line_chart, write_run_plots};

/// Structural sanity of an SVG document: one root, tags balanced (self-closing ones aside).
fn assert_well_formed(svg: &str) {
    assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"), "{svg}");
    assert!(svg.contains(r#"xmlns="http://www.w3.org/2000/svg""#));
    let mut open: Vec<String> = Vec::new();
    for tag in svg.split('<').skip(1) {
        let tag = tag.split('>').next().unwrap();
        let name: String = tag.trim_start_matches('/').chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
        if tag.starts_with('/') {
            assert_eq!(open.pop().as_deref(), Some(name.as_str()), "unbalanced </{name}>");
        } else if !tag.ends_with('/') {
            open.push(name);
        }
    }
    assert!(open.is_empty(), "unclosed {open:?}");
    assert!(!svg.contains("NaN") && !svg.contains("inf"), "non-finite coordinates: {svg}");
}

#[test]
fn a_chart_has_one_polyline_per_series() {
    let svg = svg_line_chart("Loss & <margins>", "step", &[("train", vec![(1.0, 0.5), (2.0, 0.25), (3.0, f64::NAN)]), ("eval \"held-out\"", vec![(1.0, 1.0)])]);
    assert_well_formed(&svg);
    assert_eq!(svg.matches("<polyline").count(), 2);
    assert!(svg.contains("Loss &amp; &lt;margins&gt;") && svg.contains("eval &quot;held-out&quot;"), "{svg}");
    let first = svg.lines().find(|l| l.starts_with("<polyline")).unwrap();
    assert_eq!(first.matches(',').count(), 2, "the NaN point is left out: {first}");
}

#[test]
fn a_chart_without_data_is_an_empty_plot() {
    for series in [vec![], vec![("train", vec![]), ("eval", vec![(f64::NAN, 1.0)])]] {
        let svg = svg_line_chart("Reward accuracy", "step", &series);
        assert_well_formed(&svg);
        assert_eq!(svg.matches("<polyline").count(), 0);
        assert!(svg.contains(">no data</text>"), "{svg}");
    }
}

#[test]
fn run_plots_are_written_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let line = |pairs: &[(&str, f64)]| pairs.iter().map(|&(k, v)| (k.to_string(), v)).collect::<BTreeMap<_, _>>();
    let log = vec![
        line(&[("step", 0.0), ("eval_loss", 0.69), ("eval_rewards/accuracies", 0.0), ("eval_rewards/margins", 0.0)]),
        line(&[("step", 10.0), ("loss", 0.6), ("rewards/accuracies", 0.7), ("rewards/margins", 0.3)]),
        line(&[("step", 20.0), ("loss", 0.4), ("rewards/accuracies", 0.9), ("rewards/margins", 0.8)]),
        line(&[("step", 20.0), ("eval_loss", 0.45), ("eval_rewards/accuracies", 0.85), ("eval_rewards/margins", 0.7)]),
    ];
    let plots = dir.path().join("run/plots");
    let written = write_run_plots(&plots, &log).unwrap();
    let names: Vec<String> = written.iter().map(|p| p.file_name().unwrap().to_string_lossy().to_string()).collect();
    assert_eq!(names, ["loss.svg", "reward_accuracy.svg", "reward_margins.svg"]);
    for path in &written {
        let svg = std::fs::read_to_string(path).unwrap();
        assert_well_formed(&svg);
        assert_eq!(svg.matches("<polyline").count(), 2, "train and eval: {}", path.display());
    }

    // an SFT-like log (loss only): the reward charts are empty plots
    let sft = vec![line(&[("step", 10.0), ("loss", 2.0)]), line(&[("step", 20.0), ("loss", 1.5)])];
    write_run_plots(&plots, &sft).unwrap();
    assert_eq!(std::fs::read_to_string(plots.join("loss.svg")).unwrap().matches("<polyline").count(), 1);
    assert!(std::fs::read_to_string(plots.join("reward_margins.svg")).unwrap().contains("no data"));
}

#[test]
fn an_empty_log_is_an_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let plots = dir.path().join("plots");
    let err = write_run_plots(&plots, &[]).unwrap_err();
    assert!(matches!(err, EvalError::EmptyHistory), "{err:?}");
    assert!(err.to_string().contains("log history is empty"), "{err}");
    assert!(!plots.exists());
}

#[test]
fn an_unwritable_folder_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-folder");
    std::fs::write(&file, "").unwrap();
    let log = vec![BTreeMap::from([("step".to_string(), 1.0), ("loss".to_string(), 1.0)])];
    let err = write_run_plots(&file.join("plots"), &log).unwrap_err();
    assert!(matches!(err, EvalError::Io { .. }) && err.to_string().contains("not-a-folder"), "{err}");
}
