//! Seeded train/test splits and shuffles.

use rand_core::{RngCore, SeedableRng};
use rand_xoshiro::SplitMix64;

/// Fisher-Yates on the SplitMix64 stream: the same order for the same seed on every machine.
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut rng = SplitMix64::seed_from_u64(seed);
    for i in (1..items.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// Splits `0..n` into (train, test) with `round(n * test_fraction)` (at least 1) test indices chosen
/// by a seeded shuffle; both lists keep the original order.
pub fn split_indices(n: usize, test_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    if n == 0 || test_fraction <= 0.0 {
        return ((0..n).collect(), Vec::new());
    }
    let n_test = ((n as f64 * test_fraction).round() as usize).clamp(1, n);
    let mut order: Vec<usize> = (0..n).collect();
    shuffle(&mut order, seed ^ 0x5EED_5EED_5EED_5EED);
    let mut test: Vec<usize> = order[..n_test].to_vec();
    test.sort_unstable();
    let in_test: std::collections::BTreeSet<usize> = test.iter().copied().collect();
    let train = (0..n).filter(|i| !in_test.contains(i)).collect();
    (train, test)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_seeded_disjoint_and_complete() {
        let (train, test) = split_indices(100, 0.1, 7);
        assert_eq!(test.len(), 10);
        assert_eq!(train.len() + test.len(), 100);
        assert!(test.iter().all(|i| !train.contains(i)));
        assert_eq!(split_indices(100, 0.1, 7), (train, test.clone()));
        assert_ne!(split_indices(100, 0.1, 8).1, test);
    }
}
