//! Batches of preference pairs as TRL lays them out: `[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]`,
//! right-padded to the longest row.

use crate::tokenize::{PairInputs, Sequence};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreferenceBatch {
    /// Record indices of the `B` pairs.
    pub indices: Vec<usize>,
    /// `2B` rows of `seq_len` ids.
    pub input_ids: Vec<Vec<u32>>,
    /// 1 for tokens, 0 for padding.
    pub attention_mask: Vec<Vec<u8>>,
    /// 1 for completion tokens (the ones scored), 0 for prompt and padding.
    pub completion_mask: Vec<Vec<u8>>,
    pub seq_len: usize,
    /// KTO: the batch holds unpaired examples (the "chosen" rows) with their mismatched KL
    /// sequences (the "rejected" rows), and these are the examples' desirable flags.
    pub labels: Option<Vec<bool>>,
}

/// `(input_ids, attention_mask, completion_mask, seq_len)`.
pub(crate) type Padded = (Vec<Vec<u32>>, Vec<Vec<u8>>, Vec<Vec<u8>>, usize);

/// Right-pads sequences to the longest.
pub(crate) fn pad_rows(rows: &[&Sequence], pad_id: u32) -> Padded {
    let seq_len = rows.iter().map(|s| s.input_ids.len()).max().unwrap_or(0);
    let padded = |v: &[u32], fill: u32| {
        let mut v = v.to_vec();
        v.resize(seq_len, fill);
        v
    };
    let padded_mask = |v: &[u8]| {
        let mut v = v.to_vec();
        v.resize(seq_len, 0);
        v
    };
    (
        rows.iter().map(|s| padded(&s.input_ids, pad_id)).collect(),
        rows.iter().map(|s| padded_mask(&vec![1; s.input_ids.len()])).collect(),
        rows.iter().map(|s| padded_mask(&s.completion_mask)).collect(),
        seq_len,
    )
}

/// Columns up to the last real token of any row (right padding past it is unused).
pub(crate) fn used_len(attention_mask: &[Vec<u8>]) -> usize {
    attention_mask.iter().map(|r| r.iter().rposition(|&m| m == 1).map_or(0, |p| p + 1)).max().unwrap_or(0)
}

impl PreferenceBatch {
    pub fn new(pairs: &[PairInputs], pad_id: u32) -> Self {
        let rows: Vec<&Sequence> = pairs
            .iter()
            .map(|p| &p.chosen)
            .chain(pairs.iter().map(|p| &p.rejected))
            .collect();
        let (input_ids, attention_mask, completion_mask, seq_len) = pad_rows(&rows, pad_id);
        Self {
            indices: pairs.iter().map(|p| p.index).collect(),
            input_ids,
            attention_mask,
            completion_mask,
            seq_len,
            labels: None,
        }
    }

    /// Number of pairs `B` (the batch has `2B` rows).
    pub fn num_pairs(&self) -> usize {
        self.indices.len()
    }

    /// Real (non-padding) tokens per row.
    pub fn lengths(&self) -> Vec<usize> {
        self.attention_mask.iter().map(|m| m.iter().filter(|&&x| x == 1).count()).collect()
    }

    /// Completion tokens per row.
    pub fn completion_lengths(&self) -> Vec<usize> {
        self.completion_mask
            .iter()
            .map(|m| m.iter().filter(|&&x| x == 1).count())
            .collect()
    }

    /// The pairs `pairs` of this batch as a batch of their own (chosen rows, then rejected rows, as
    /// always), with the padding that none of its rows needs cut off. Rows are unchanged, so a
    /// causal model scores them as it would in the whole batch.
    pub fn shard(&self, pairs: std::ops::Range<usize>) -> Self {
        let b = self.num_pairs();
        assert!(pairs.start < pairs.end && pairs.end <= b, "shard {pairs:?} of a batch of {b} pairs");
        let rows: Vec<usize> = pairs.clone().chain(b + pairs.start..b + pairs.end).collect();
        let masks: Vec<Vec<u8>> = rows.iter().map(|&r| self.attention_mask[r].clone()).collect();
        let seq_len = used_len(&masks);
        let take = |m: &Vec<Vec<u8>>| -> Vec<Vec<u8>> { rows.iter().map(|&r| m[r][..seq_len].to_vec()).collect() };
        Self {
            indices: self.indices[pairs.clone()].to_vec(),
            input_ids: rows.iter().map(|&r| self.input_ids[r][..seq_len].to_vec()).collect(),
            attention_mask: take(&self.attention_mask),
            completion_mask: take(&self.completion_mask),
            seq_len,
            labels: self.labels.as_ref().map(|l| l[pairs].to_vec()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chosen_rows_first_then_rejected_right_padded() {
        let seq = |ids: &[u32], prompt: usize| Sequence {
            input_ids: ids.to_vec(),
            completion_mask: (0..ids.len()).map(|i| (i >= prompt) as u8).collect(),
        };
        let pairs = vec![
            PairInputs { index: 3, chosen: seq(&[1, 5, 6], 1), rejected: seq(&[1, 7], 1) },
            PairInputs { index: 4, chosen: seq(&[1, 2, 8, 9], 2), rejected: seq(&[1, 2, 9], 2) },
        ];
        let b = PreferenceBatch::new(&pairs, 0);
        assert_eq!(b.indices, vec![3, 4]);
        assert_eq!(b.seq_len, 4);
        assert_eq!(b.input_ids, vec![vec![1, 5, 6, 0], vec![1, 2, 8, 9], vec![1, 7, 0, 0], vec![1, 2, 9, 0]]);
        assert_eq!(b.attention_mask[2], vec![1, 1, 0, 0]);
        assert_eq!(b.completion_mask[1], vec![0, 0, 1, 1]);
        assert_eq!(b.completion_lengths(), vec![2, 2, 1, 1]);
        assert_eq!(b.lengths(), vec![3, 4, 2, 3]);

        let first = b.shard(0..1);
        assert_eq!(first, PreferenceBatch::new(&pairs[..1], 0), "the shorter pair's padding is cut");
        let mut labelled = b.clone();
        labelled.labels = Some(vec![true, false]);
        let second = labelled.shard(1..2);
        assert_eq!(second.input_ids, vec![vec![1, 2, 8, 9], vec![1, 2, 9, 0]]);
        assert_eq!(second.labels, Some(vec![false]));
        assert_eq!(second.indices, vec![4]);
    }
}
