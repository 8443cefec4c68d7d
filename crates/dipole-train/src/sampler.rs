//! The order a run sees its examples in: a seeded permutation per epoch (or file order), optionally
//! grouped by length, addressed by micro-batch number so a resumed run continues the same order.

/// Deterministic batch order: epoch `e` is a seeded permutation of the pairs (or file order).
pub struct DataOrder {
    pub num_pairs: usize,
    pub batch_size: usize,
    pub shuffle: bool,
    pub seed: u64,
    /// Length-grouped sampling: within windows of 50 batches of the permutation, pairs are sorted
    /// by length (longest first), so batches hold similar lengths and pad less.
    pub lengths: Option<Vec<usize>>,
}

impl DataOrder {
    pub fn batches_per_epoch(&self) -> usize {
        self.num_pairs.div_ceil(self.batch_size)
    }

    /// Pair indices of micro-batch number `k` counted from the start of training.
    pub fn batch(&self, k: usize) -> Vec<usize> {
        let per_epoch = self.batches_per_epoch();
        let (epoch, within) = (k / per_epoch, k % per_epoch);
        let mut order: Vec<usize> = (0..self.num_pairs).collect();
        if self.shuffle {
            dipole_data::split::shuffle(&mut order, self.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
        if let Some(lengths) = &self.lengths {
            for window in order.chunks_mut(self.batch_size * 50) {
                window.sort_by(|a, b| lengths[*b].cmp(&lengths[*a]));
            }
        }
        let start = within * self.batch_size;
        order[start..(start + self.batch_size).min(self.num_pairs)].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_order_is_a_seeded_permutation_per_epoch() {
        let order = DataOrder { num_pairs: 10, batch_size: 4, shuffle: true, seed: 3, lengths: None };
        assert_eq!(order.batches_per_epoch(), 3);
        let epoch: Vec<usize> = (0..3).flat_map(|k| order.batch(k)).collect();
        let mut sorted = epoch.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        let next: Vec<usize> = (3..6).flat_map(|k| order.batch(k)).collect();
        assert_ne!(epoch, next, "each epoch has its own order");
        let other_seed = DataOrder { num_pairs: 10, batch_size: 4, shuffle: true, seed: 4, lengths: None };
        assert_ne!(epoch, (0..3).flat_map(|k| other_seed.batch(k)).collect::<Vec<_>>(), "the seed picks the order");
        let unshuffled = DataOrder { num_pairs: 10, batch_size: 4, shuffle: false, seed: 3, lengths: None };
        assert_eq!((3..6).flat_map(|k| unshuffled.batch(k)).collect::<Vec<_>>(), (0..10).collect::<Vec<_>>(), "file order every epoch");
    }

    #[test]
    fn length_grouping_puts_similar_lengths_together() {
        let lengths: Vec<usize> = (0..8).map(|i| if i % 2 == 0 { 10 } else { 100 }).collect();
        let order = DataOrder { num_pairs: 8, batch_size: 4, shuffle: true, seed: 1, lengths: Some(lengths.clone()) };
        for k in 0..2 {
            let b = order.batch(k);
            assert!(b.iter().all(|&i| lengths[i] == lengths[b[0]]), "{b:?}");
        }
    }
}
