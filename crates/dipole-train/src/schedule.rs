//! Learning-rate schedules with transformers' semantics: linear warmup from 0, then constant, linear
//! decay to 0, or half-cosine decay to 0 at the last step.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    Constant,
    #[default]
    Linear,
    Cosine,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub kind: SchedulerKind,
    pub peak_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    /// Warmup steps from an explicit count, else `ceil(warmup_ratio * total_steps)` as transformers does.
    pub fn warmup_from(warmup_steps: Option<usize>, warmup_ratio: f64, total_steps: usize) -> usize {
        warmup_steps.unwrap_or_else(|| (warmup_ratio * total_steps as f64).ceil() as usize)
    }

    /// The learning rate used for optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / decay_steps).min(1.0);
        match self.kind {
            SchedulerKind::Constant => self.peak_lr,
            SchedulerKind::Linear => self.peak_lr * (1.0 - progress).max(0.0),
            SchedulerKind::Cosine => self.peak_lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_zero() {
        let s = Schedule { kind: SchedulerKind::Cosine, peak_lr: 1.0, warmup_steps: 10, total_steps: 110 };
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 0.5).abs() < 1e-12);
        assert_eq!(s.lr(10), 1.0);
        assert!((s.lr(60) - 0.5).abs() < 1e-12);
        assert!(s.lr(110).abs() < 1e-12);
    }

    #[test]
    fn linear_and_constant() {
        let s = Schedule { kind: SchedulerKind::Linear, peak_lr: 2.0, warmup_steps: 0, total_steps: 4 };
        assert_eq!((0..5).map(|i| s.lr(i)).collect::<Vec<_>>(), vec![2.0, 1.5, 1.0, 0.5, 0.0]);
        let c = Schedule { kind: SchedulerKind::Constant, ..s };
        assert_eq!(c.lr(3), 2.0);
        assert_eq!(Schedule::warmup_from(None, 0.1, 95), 10);
    }
}
