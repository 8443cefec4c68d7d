//! Dynamic loss scaling for fp16 mixed precision, with PyTorch `GradScaler`'s defaults: the loss is
//! multiplied by `scale` before the backward pass so small activation gradients survive float16; the
//! gradients are divided by it again before clipping. A step whose gradients overflow is skipped and
//! the scale halved; after `GROWTH_INTERVAL` clean steps in a row it doubles.

use serde::{Deserialize, Serialize};

pub const INIT_SCALE: f64 = 65536.0;
pub const GROWTH_FACTOR: f64 = 2.0;
pub const BACKOFF_FACTOR: f64 = 0.5;
pub const GROWTH_INTERVAL: usize = 2000;

/// The scaler's state, saved in checkpoints so a resumed run scales exactly as before.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    /// Clean steps since the last change of `scale`.
    pub good_steps: usize,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self { scale: INIT_SCALE, good_steps: 0 }
    }
}

impl LossScaler {
    /// Records one optimizer step: `finite` is whether the unscaled gradients were all finite.
    /// Returns true when the step should be applied.
    pub fn update(&mut self, finite: bool) -> bool {
        if !finite {
            self.scale *= BACKOFF_FACTOR;
            self.good_steps = 0;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps == GROWTH_INTERVAL {
            self.scale *= GROWTH_FACTOR;
            self.good_steps = 0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_halves_and_clean_steps_double() {
        let mut s = LossScaler::default();
        assert!(!s.update(false));
        assert_eq!(s.scale, INIT_SCALE / 2.0);
        for _ in 0..GROWTH_INTERVAL - 1 {
            assert!(s.update(true));
        }
        assert_eq!(s.scale, INIT_SCALE / 2.0);
        assert!(s.update(true));
        assert_eq!((s.scale, s.good_steps), (INIT_SCALE, 0));
        // an overflow resets the run of clean steps
        s.update(true);
        s.update(false);
        assert_eq!((s.scale, s.good_steps), (INIT_SCALE / 2.0, 0));
    }
}
