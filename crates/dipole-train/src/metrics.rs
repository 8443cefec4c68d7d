//! What a run logs: TRL-named metrics averaged over a logging window into `metrics.jsonl`, with
//! the step's loss, gradient norm, learning rate, token counts and peak memory.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use crate::error::{TrainResult, at};

/// The process's peak resident memory (Linux `VmHWM`), MiB: since it started, or since the last
/// [`restart_peak_rss`].
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Restarts [`peak_rss_mb`] from the memory resident now (Linux `/proc/self/clear_refs`), so that
/// a phase's own peak can be read; false where the kernel refuses (the peak then stays the process's).
pub fn restart_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Each metric over a logging window: the mean over the batches that report it. KTO's per-class
/// metrics (batches carrying `count/chosen`, `count/rejected`) are pooled as TRL's `KTOTrainer`
/// does: sums over the window divided by the window's class count, margins from the pooled
/// rewards, and the counts themselves not logged.
pub fn mean_metrics(window: &[BTreeMap<String, f64>]) -> BTreeMap<String, f64> {
    let class_of = |key: &str| -> Option<&'static str> {
        let (metric, split) = key.split_once('/')?;
        if !["rewards", "logps", "logits"].contains(&metric) {
            return None;
        }
        ["chosen", "rejected"].into_iter().find(|s| *s == split)
    };
    let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let mut pooled = false;
    for m in window {
        for (k, v) in m {
            let weight = match class_of(k).and_then(|split| m.get(&format!("count/{split}"))) {
                Some(&count) => {
                    pooled = true;
                    count
                }
                None => 1.0,
            };
            let e = sums.entry(k.clone()).or_insert((0.0, 0.0));
            e.0 += v * weight;
            e.1 += weight;
        }
    }
    let mut out: BTreeMap<String, f64> = sums.into_iter().map(|(k, (sum, n))| (k, sum / n)).collect();
    if pooled {
        out.retain(|k, _| !k.starts_with("count/"));
        out.remove("rewards/margins");
        if let (Some(c), Some(r)) = (out.get("rewards/chosen"), out.get("rewards/rejected")) {
            out.insert("rewards/margins".into(), c - r);
        }
    }
    out
}

/// `metrics.jsonl` for a run at `step`: a fresh run starts it empty, a resumed one keeps the lines
/// of steps up to its checkpoint (a killed run may have logged past it) and appends.
pub fn open_metrics(path: &Path, step: usize) -> TrainResult<std::fs::File> {
    let kept = match std::fs::read_to_string(path) {
        Ok(text) if step > 0 => text
            .lines()
            .filter(|line| {
                // a Value, not floats: an overflowed step logs `grad_norm` inf, which JSON writes as null
                let logged = serde_json::from_str::<serde_json::Value>(line).ok().and_then(|m| m.get("step").and_then(serde_json::Value::as_f64));
                logged.is_some_and(|s| s <= step as f64)
            })
            .map(|line| format!("{line}\n"))
            .collect::<String>(),
        _ => String::new(),
    };
    crate::checkpoint::write_atomic(path, kept.as_bytes())?;
    std::fs::OpenOptions::new().append(true).open(path).map_err(at(path))
}

/// A logging window: the metrics of each micro-batch and the loss and tokens of each step since
/// the last line was written.
pub struct Window {
    batches: Vec<BTreeMap<String, f64>>,
    losses: Vec<f64>,
    tokens: u64,
    started: Instant,
}

impl Default for Window {
    fn default() -> Self {
        Self { batches: Vec::new(), losses: Vec::new(), tokens: 0, started: Instant::now() }
    }
}

impl Window {
    pub fn add_batch(&mut self, metrics: BTreeMap<String, f64>) {
        self.batches.push(metrics);
    }

    pub fn add_step(&mut self, loss: f64, tokens: u64) {
        self.losses.push(loss);
        self.tokens += tokens;
    }

    /// The window's line (means of its metrics, its mean step loss, its tokens per second of wall
    /// time), and a new window from now.
    pub fn close(&mut self) -> BTreeMap<String, f64> {
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-9);
        let mut line = mean_metrics(&self.batches);
        line.insert("loss".into(), self.losses.iter().sum::<f64>() / self.losses.len() as f64);
        line.insert("tokens_per_second".into(), self.tokens as f64 / elapsed);
        if let Some(rss) = peak_rss_mb() {
            line.insert("peak_rss_mb".into(), rss);
        }
        *self = Self::default();
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kto_metrics_pool_over_the_window_as_trl_does() {
        let batch = |pairs: &[(&str, f64)]| pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>();
        let window = [
            batch(&[("rewards/chosen", 1.0), ("count/chosen", 3.0), ("rewards/rejected", -1.0), ("count/rejected", 1.0), ("rewards/margins", 2.0), ("kl", 0.5)]),
            batch(&[("rewards/chosen", 3.0), ("count/chosen", 1.0), ("rewards/rejected", 0.0), ("count/rejected", 3.0), ("rewards/margins", 3.0), ("kl", 0.1)]),
            // a batch without rejected rows
            batch(&[("rewards/chosen", 2.0), ("count/chosen", 4.0), ("kl", 0.3)]),
        ];
        let m = mean_metrics(&window);
        assert!((m["rewards/chosen"] - (3.0 + 3.0 + 8.0) / 8.0).abs() < 1e-12);
        assert!((m["rewards/rejected"] - (-1.0 / 4.0)).abs() < 1e-12);
        assert!((m["rewards/margins"] - (14.0 / 8.0 + 0.25)).abs() < 1e-12);
        assert!((m["kl"] - 0.3).abs() < 1e-12);
        assert!(!m.contains_key("count/chosen") && !m.contains_key("count/rejected"));
        // pair objectives: plain means
        let m = mean_metrics(&[batch(&[("rewards/chosen", 1.0)]), batch(&[("rewards/chosen", 2.0)])]);
        assert_eq!(m["rewards/chosen"], 1.5);
    }
}
