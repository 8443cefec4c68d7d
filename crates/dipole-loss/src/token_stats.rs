//! Token-level metrics TRL logs beside the loss, computed from the policy's logits without
//! gradients: `logits/chosen`, `logits/rejected`, `entropy`, `mean_token_accuracy`.

use crate::logps::token_entropy;
use burn::tensor::{Int, Tensor, backend::Backend};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenStats {
    /// Mean over chosen completion tokens of the vocabulary-mean logit.
    pub logits_chosen: f64,
    /// Same over rejected completion tokens.
    pub logits_rejected: f64,
    /// Mean predictive entropy over all completion tokens (chosen and rejected).
    pub entropy: f64,
    /// Top-1 accuracy on chosen completion tokens.
    pub mean_token_accuracy: f64,
    /// Completion tokens the means are over (the weights to merge stats of a split batch).
    pub chosen_tokens: f64,
    pub rejected_tokens: f64,
}

impl TokenStats {
    /// The stats of a batch from those of its parts, each mean weighted by its token count.
    pub fn merge(parts: &[TokenStats]) -> TokenStats {
        let weighted = |value: fn(&TokenStats) -> f64, weight: fn(&TokenStats) -> f64| {
            let total: f64 = parts.iter().map(weight).sum();
            if total > 0.0 { parts.iter().map(|p| value(p) * weight(p)).sum::<f64>() / total } else { 0.0 }
        };
        TokenStats {
            logits_chosen: weighted(|p| p.logits_chosen, |p| p.chosen_tokens),
            logits_rejected: weighted(|p| p.logits_rejected, |p| p.rejected_tokens),
            entropy: weighted(|p| p.entropy, |p| p.chosen_tokens + p.rejected_tokens),
            mean_token_accuracy: weighted(|p| p.mean_token_accuracy, |p| p.chosen_tokens),
            chosen_tokens: parts.iter().map(|p| p.chosen_tokens).sum(),
            rejected_tokens: parts.iter().map(|p| p.rejected_tokens).sum(),
        }
    }
}

/// `logits` `[2B, T, V]` with rows `[chosen.., rejected..]`; token `t` is predicted at `t - 1`.
pub fn token_stats<B: Backend>(
    logits: Tensor<B, 3>,
    input_ids: Tensor<B, 2, Int>,
    completion_mask: Tensor<B, 2>,
) -> TokenStats {
    let [rows, len, vocab] = logits.dims();
    let logits = logits.slice([0..rows, 0..len - 1, 0..vocab]);
    let labels = input_ids.slice([0..rows, 1..len]);
    let mask = completion_mask.slice([0..rows, 1..len]);
    token_stats_aligned(logits, labels, mask)
}

/// [`token_stats`] on predictions already aligned with their labels and mask (`[rows, L, ..]`).
pub fn token_stats_aligned<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>, mask: Tensor<B, 2>) -> TokenStats {
    let entropy = token_entropy(logits.clone());
    token_stats_with_entropy(logits, labels, mask, entropy)
}

/// [`token_stats_aligned`] with the per-position entropy `[rows, L]` already computed (by
/// `token_logps_and_entropy`, which shares the log-probs' exponentials).
pub fn token_stats_with_entropy<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>, mask: Tensor<B, 2>, entropy: Tensor<B, 2>) -> TokenStats {
    let logits = logits.detach();
    let logit_mean = logits.clone().mean_dim(2).squeeze_dim::<2>(2);
    token_stats_from_positions(logit_mean, entropy, logits.argmax(2).squeeze_dim::<2>(2), labels, mask)
}

/// [`token_stats_aligned`] from each position's mean logit, entropy and most likely token
/// (`[rows, L]` each), however they were computed (whole logits, or the fused LM head's tiles).
pub fn token_stats_from_positions<B: Backend>(logit_mean: Tensor<B, 2>, entropy: Tensor<B, 2>, predicted: Tensor<B, 2, Int>, labels: Tensor<B, 2, Int>, mask: Tensor<B, 2>) -> TokenStats {
    let [rows, width] = mask.dims();
    let b = rows / 2;
    let mask = mask.detach();
    let vocab_mean = logit_mean.detach() * mask.clone();
    let entropy = entropy.detach() * mask.clone();
    let correct = predicted.equal(labels).float() * mask.clone();

    let host = |t: Tensor<B, 2>| -> Vec<f64> {
        t.into_data().convert::<f64>().to_vec().expect("f64")
    };
    let (vm, ent, cor, m) = (host(vocab_mean), host(entropy), host(correct), host(mask));
    let w = width;
    let sum_rows = |v: &[f64], range: std::ops::Range<usize>| -> f64 { v[range.start * w..range.end * w].iter().sum() };
    let (n_chosen, n_rejected) = (sum_rows(&m, 0..b), sum_rows(&m, b..rows));
    let ratio = |num: f64, den: f64| if den > 0.0 { num / den } else { 0.0 };
    TokenStats {
        logits_chosen: ratio(sum_rows(&vm, 0..b), n_chosen),
        logits_rejected: ratio(sum_rows(&vm, b..rows), n_rejected),
        entropy: ratio(sum_rows(&ent, 0..rows), n_chosen + n_rejected),
        mean_token_accuracy: ratio(sum_rows(&cor, 0..b), n_chosen),
        chosen_tokens: n_chosen,
        rejected_tokens: n_rejected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    #[test]
    fn stats_of_a_split_batch_merge_into_the_whole_batch_stats() {
        let device = Default::default();
        // 2 pairs: rows [c0, c1, r0, r1], 3 positions, vocab 4
        let values: Vec<f32> = (0..2 * 2 * 3 * 4).map(|i| ((i * 7) % 11) as f32 * 0.3 - 1.0).collect();
        let labels = [[1i64, 2, 3], [0, 1, 2], [3, 3, 0], [2, 0, 1]];
        let masks = [[1.0f32, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]];
        let stats = |rows: &[usize]| {
            let logits: Vec<f32> = rows.iter().flat_map(|&r| values[r * 12..(r + 1) * 12].to_vec()).collect();
            let n = rows.len();
            token_stats_aligned(
                Tensor::<Flex, 3>::from_data(TensorData::new(logits, [n, 3, 4]), &device),
                Tensor::<Flex, 2, Int>::from_data(TensorData::new(rows.iter().flat_map(|&r| labels[r]).collect::<Vec<_>>(), [n, 3]), &device),
                Tensor::<Flex, 2>::from_data(TensorData::new(rows.iter().flat_map(|&r| masks[r]).collect::<Vec<_>>(), [n, 3]), &device),
            )
        };
        let whole = stats(&[0, 1, 2, 3]);
        let merged = TokenStats::merge(&[stats(&[0, 2]), stats(&[1, 3])]);
        for (got, want) in [
            (merged.logits_chosen, whole.logits_chosen),
            (merged.logits_rejected, whole.logits_rejected),
            (merged.entropy, whole.entropy),
            (merged.mean_token_accuracy, whole.mean_token_accuracy),
        ] {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        assert_eq!((merged.chosen_tokens, merged.rejected_tokens), (5.0, 4.0));
    }
}
