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
    let [rows, width, _] = logits.dims();
    let b = rows / 2;
    let (logits, mask) = (logits.detach(), mask.detach());

    let vocab_mean = logits.clone().mean_dim(2).squeeze_dim::<2>(2) * mask.clone();
    let entropy = entropy.detach() * mask.clone();
    let predicted = logits.argmax(2).squeeze_dim::<2>(2);
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
    }
}
