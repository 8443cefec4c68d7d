//! Per-sequence log-probabilities of completion tokens, the quantity every preference objective
//! is a function of.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, backend::Backend};
use dipole_kernels::head::HeadLogps;
use dipole_kernels::logps::try_token_logps;

use crate::objectives::length_normalised;

/// Log-probs of each row's completion tokens.
#[derive(Clone, Debug)]
pub struct SequenceLogps<B: Backend> {
    /// `[rows]`: sum over completion tokens.
    pub sum: Tensor<B, 1>,
    /// `[rows, T-1]`: log p(token t+1 | ..t), zero outside the completion.
    pub per_token: Tensor<B, 2>,
    /// `[rows, T-1]`: the completion mask aligned with `per_token`.
    pub mask: Tensor<B, 2>,
}

/// `log p(label)` per position from `logits` `[rows, L, vocab]` and `labels` `[rows, L]`, as
/// `logit[label] − logsumexp(logits)` with a detached max shift. Under autodiff this keeps one
/// `[rows, L, vocab]` intermediate (the `exp`) instead of the several of a full log-softmax. On
/// burn's CPU backend a fused kernel (`dipole_kernels::logps`) does it in one pass and its gradient
/// in another.
pub fn token_logps<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> Tensor<B, 2> {
    match try_token_logps(logits, labels, false) {
        Ok((logps, _)) => logps,
        Err((logits, labels)) => token_logps_ops(logits, labels),
    }
}

/// [`token_logps`] as burn tensor ops, for every backend.
pub fn token_logps_ops<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> Tensor<B, 2> {
    let (lse, _) = logsumexp(logits.clone());
    let picked = logits.gather(2, labels.unsqueeze_dim::<3>(2));
    (picked - lse).squeeze_dim::<2>(2)
}

/// `logsumexp` over the vocabulary `[rows, L, 1]`, and the shifted exponentials with their sum
/// (`exp(logits - max)`, `[rows, L, vocab]` and `[rows, L, 1]`) for callers that reuse them.
fn logsumexp<B: Backend>(logits: Tensor<B, 3>) -> (Tensor<B, 3>, (Tensor<B, 3>, Tensor<B, 3>)) {
    let max = logits.clone().detach().max_dim(2);
    let exp = (logits - max.clone()).exp();
    let sum = exp.clone().sum_dim(2);
    (sum.clone().log() + max, (exp, sum))
}

/// [`token_logps`] and, from the same exponentials, each position's predictive entropy
/// `H = lse − Σ softmax · logit` (`[rows, L]`, without gradient): TRL's `entropy` metric for the
/// price of one product and one sum, where `−Σ p log p` needs a second log-softmax.
pub fn token_logps_and_entropy<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> (Tensor<B, 2>, Tensor<B, 2>) {
    match try_token_logps(logits, labels, true) {
        Ok((logps, entropy)) => (logps, entropy.expect("the kernel's entropy")),
        Err((logits, labels)) => token_logps_and_entropy_ops(logits, labels),
    }
}

/// [`token_logps_and_entropy`] as burn tensor ops, for every backend.
pub fn token_logps_and_entropy_ops<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let (lse, (exp, sum)) = logsumexp(logits.clone());
    let entropy = entropy_from(lse.clone(), exp, sum, logits.clone());
    let picked = logits.gather(2, labels.unsqueeze_dim::<3>(2));
    ((picked - lse).squeeze_dim::<2>(2), entropy)
}

/// Predictive entropy per position of `logits` `[rows, L, vocab]` (see [`token_logps_and_entropy`]).
pub fn token_entropy<B: Backend>(logits: Tensor<B, 3>) -> Tensor<B, 2> {
    let (lse, (exp, sum)) = logsumexp(logits.clone().detach());
    entropy_from(lse, exp, sum, logits)
}

/// `lse − Σ exp · logits / Σ exp` per position `[rows, L]`, without gradient.
fn entropy_from<B: Backend>(lse: Tensor<B, 3>, exp: Tensor<B, 3>, sum: Tensor<B, 3>, logits: Tensor<B, 3>) -> Tensor<B, 2> {
    let expected_logit = (exp.detach() * logits.detach()).sum_dim(2) / sum.detach();
    (lse.detach() - expected_logit).squeeze_dim::<2>(2)
}

/// The positions that can hold a completion token: from the first completion token of any row to
/// the end. Log-probs need logits only there, so the `lm_head` and the vocabulary-sized tensors skip
/// the shared prompt part. Returns `start` such that predictions `start..T-1` cover every scored
/// token (prediction `t` scores token `t + 1`).
pub fn prediction_window(completion_mask: &[Vec<u8>]) -> usize {
    completion_mask
        .iter()
        .filter_map(|row| row.iter().position(|&m| m == 1))
        .min()
        .map(|first| first.saturating_sub(1))
        .unwrap_or(0)
}

/// Per-sequence log-probs from logits of the predictions `start..T-1` only (`logits` is
/// `[rows, T-1-start, vocab]`); `input_ids` and `completion_mask` are the full `[rows, T]`.
pub fn sequence_logps_window<B: Backend>(
    logits: Tensor<B, 3>,
    input_ids: Tensor<B, 2, Int>,
    completion_mask: Tensor<B, 2>,
    start: usize,
) -> SequenceLogps<B> {
    let [rows, len] = input_ids.dims();
    let width = len - 1 - start;
    assert_eq!(logits.dims()[..2], [rows, width], "logits must cover predictions {start}..{}", len - 1);
    let labels = input_ids.slice([0..rows, start + 1..len]);
    let mask = completion_mask.slice([0..rows, start + 1..len]);
    let per_token = token_logps(logits, labels) * mask.clone();
    SequenceLogps {
        sum: per_token.clone().sum_dim(1).squeeze_dim::<1>(1),
        per_token,
        mask,
    }
}

/// `logits` `[rows, T, vocab]`, `input_ids` `[rows, T]`, `completion_mask` `[rows, T]` (1 where the
/// token is scored). The token at position `t` is scored by the logits at position `t - 1`.
pub fn sequence_logps<B: Backend>(
    logits: Tensor<B, 3>,
    input_ids: Tensor<B, 2, Int>,
    completion_mask: Tensor<B, 2>,
) -> SequenceLogps<B> {
    let [rows, len, vocab] = logits.dims();
    assert_eq!(input_ids.dims(), [rows, len], "input_ids must be [rows, T] like the logits");
    assert_eq!(completion_mask.dims(), [rows, len], "completion_mask must be [rows, T] like the logits");
    sequence_logps_window(logits.slice([0..rows, 0..len - 1, 0..vocab]), input_ids, completion_mask, 0)
}

/// LD-DPO (Liu et al. 2024, arXiv:2409.06411) per-token weights: 1 for the first
/// `min(len_chosen, len_rejected)` completion tokens of each pair, `ld_alpha` for the excess of the
/// longer side. `completion_mask` rows are `[chosen.., rejected..]`, aligned with `per_token`.
pub fn ld_weights(completion_mask: &[Vec<u8>], ld_alpha: f64) -> Vec<Vec<f32>> {
    let rows = completion_mask.len();
    let b = rows / 2;
    let len = |r: usize| completion_mask[r].iter().filter(|&&m| m == 1).count();
    (0..rows)
        .map(|r| {
            let public = len(r % b).min(len(r % b + b));
            let mut rank = 0;
            completion_mask[r]
                .iter()
                .map(|&m| {
                    if m == 0 {
                        return 0.0;
                    }
                    rank += 1;
                    if rank <= public { 1.0 } else { ld_alpha as f32 }
                })
                .collect()
        })
        .collect()
}

/// WPO (Zhou et al. 2024, arXiv:2406.11827) pair weights, without gradient:
/// `min(1, exp(w_chosen + w_rejected))` where `w` is a sequence's mean over completion tokens of
/// `log p(token) - log Σ_v p(v)²`. Rows of `logits` are `[chosen.., rejected..]`.
pub fn wpo_weights<B: Backend>(
    logits: Tensor<B, 3>,
    input_ids: Tensor<B, 2, Int>,
    completion_mask: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let [rows, len, vocab] = logits.dims();
    let logits = logits.slice([0..rows, 0..len - 1, 0..vocab]);
    let labels = input_ids.slice([0..rows, 1..len]);
    let mask = completion_mask.slice([0..rows, 1..len]);
    wpo_weights_aligned(logits, labels, mask)
}

/// [`wpo_weights`] on predictions already aligned with their labels and mask (`[rows, L, ..]`).
pub fn wpo_weights_aligned<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>, mask: Tensor<B, 2>) -> Tensor<B, 1> {
    let logits = logits.detach();
    let token = log_softmax(logits.clone(), 2).gather(2, labels.unsqueeze_dim::<3>(2)).squeeze_dim::<2>(2);
    wpo_weights_from(token, log_sum_of_squares(logits), mask)
}

/// [`wpo_weights_aligned`] from each position's `log p(label)` and `log Σ_v p(v)²` (`[rows, L]`).
pub fn wpo_weights_from<B: Backend>(logps: Tensor<B, 2>, log_sum_sq: Tensor<B, 2>, mask: Tensor<B, 2>) -> Tensor<B, 1> {
    let [rows, _] = logps.dims();
    let mask = mask.detach();
    let adjusted = (logps.detach() - log_sum_sq.detach()) * mask.clone();
    let per_row = length_normalised(adjusted.sum_dim(1).squeeze_dim::<1>(1), mask.sum_dim(1).squeeze_dim::<1>(1));
    let b = rows / 2;
    (per_row.clone().narrow(0, 0, b) + per_row.narrow(0, b, b)).exp().clamp_max(1.0)
}

/// `log Σ_v p(v)²` per position `[rows, L]` of `logits` `[rows, L, vocab]`, as
/// `logsumexp(2 log p)`, without gradient.
fn log_sum_of_squares<B: Backend>(logits: Tensor<B, 3>) -> Tensor<B, 2> {
    let twice = log_softmax(logits.detach(), 2).mul_scalar(2.0);
    let max = twice.clone().max_dim(2);
    ((twice - max.clone()).exp().sum_dim(2).log() + max).squeeze_dim::<2>(2)
}

/// What the objectives and TRL's metrics need at each scored position, `[rows, L]` each.
#[derive(Clone, Debug)]
pub struct PositionScores<B: Backend> {
    /// `log p(label)`, carrying gradients.
    pub logps: Tensor<B, 2>,
    /// Predictive entropy (no gradient).
    pub entropy: Tensor<B, 2>,
    /// The mean logit over the vocabulary (no gradient).
    pub logit_mean: Tensor<B, 2>,
    /// The most likely token.
    pub argmax: Tensor<B, 2, Int>,
    /// `log Σ_v p(v)²` (no gradient), for WPO's weights; `None` when not asked for.
    pub log_sum_sq: Option<Tensor<B, 2>>,
}

impl<B: Backend> PositionScores<B> {
    /// From whole logits `[rows, L, vocab]` and their labels `[rows, L]`; `log Σ p²` (two more
    /// passes over the logits) only `with_log_sum_sq`.
    pub fn from_logits(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>, with_log_sum_sq: bool) -> Self {
        let (logps, entropy) = token_logps_and_entropy(logits.clone(), labels);
        let plain = logits.detach();
        PositionScores {
            logps,
            entropy,
            logit_mean: plain.clone().mean_dim(2).squeeze_dim::<2>(2),
            argmax: plain.clone().argmax(2).squeeze_dim::<2>(2),
            log_sum_sq: with_log_sum_sq.then(|| log_sum_of_squares(plain)),
        }
    }

    /// From the fused LM head's results over `rows × len` positions (row-major).
    pub fn from_head(out: HeadLogps<B>, rows: usize, len: usize) -> Self {
        let shape = |t: Tensor<B, 1>| t.reshape([rows, len]);
        PositionScores {
            logps: shape(out.logps),
            entropy: shape(out.entropy),
            logit_mean: shape(out.logit_mean),
            argmax: out.argmax.reshape([rows, len]),
            log_sum_sq: Some(shape(out.log_sum_sq)),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ld_weights_split_at_the_shorter_completion() {
        let mask = vec![vec![0, 1, 1, 1, 0], vec![0, 0, 1, 1, 1], vec![0, 1, 1, 0, 0], vec![0, 0, 1, 1, 1]];
        let w = super::ld_weights(&mask, 0.5);
        assert_eq!(w[0], vec![0.0, 1.0, 1.0, 0.5, 0.0]);
        assert_eq!(w[2], vec![0.0, 1.0, 1.0, 0.0, 0.0]);
        assert_eq!(w[1], vec![0.0, 0.0, 1.0, 1.0, 1.0]);
    }

    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    #[test]
    fn scores_completion_tokens_at_the_previous_position() {
        let device = Default::default();
        // one row, T = 3, vocab 2; logits at t=0 favour token 1, at t=1 uniform
        let logits = Tensor::<Flex, 3>::from_data(
            TensorData::new(vec![0.0f32, (3.0f32).ln(), 0.0, 0.0, 5.0, 5.0], [1, 3, 2]),
            &device,
        );
        let ids = Tensor::<Flex, 2, Int>::from_data(TensorData::new(vec![0i64, 1, 0], [1, 3]), &device);
        let mask = Tensor::<Flex, 2>::from_data(TensorData::new(vec![0.0f32, 1.0, 1.0], [1, 3]), &device);
        let out = sequence_logps(logits, ids, mask);
        let sum: Vec<f32> = out.sum.into_data().to_vec().unwrap();
        let expected = (0.75f32).ln() + (0.5f32).ln();
        assert!((sum[0] - expected).abs() < 1e-6, "{} vs {expected}", sum[0]);
    }

    #[test]
    fn entropy_from_the_shared_exponentials_equals_minus_sum_p_log_p() {
        let device = Default::default();
        let values: Vec<f32> = (0..2 * 3 * 7).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7).collect();
        let logits = Tensor::<Flex, 3>::from_data(TensorData::new(values, [2, 3, 7]), &device);
        let labels = Tensor::<Flex, 2, Int>::from_data(TensorData::new(vec![0i64, 3, 6, 1, 2, 5], [2, 3]), &device);
        let logp = burn::tensor::activation::log_softmax(logits.clone(), 2);
        let textbook: Vec<f32> = (logp.clone().exp() * logp).sum_dim(2).squeeze_dim::<2>(2).neg().into_data().to_vec().unwrap();
        let (logps, entropy) = token_logps_and_entropy(logits.clone(), labels.clone());
        let entropy: Vec<f32> = entropy.into_data().to_vec().unwrap();
        for (a, b) in entropy.iter().zip(&textbook) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        let alone: Vec<f32> = token_entropy(logits.clone()).into_data().to_vec().unwrap();
        for (a, b) in alone.iter().zip(&entropy) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // and the log-probs are token_logps' exactly
        assert_eq!(logps.into_data(), token_logps(logits, labels).into_data());
    }

    type Ad = burn::backend::Autodiff<Flex>;

    /// Logits `[3, 5, 37]` (a vocabulary that is not a multiple of the vector width) spread over ±12.
    fn logits<B: Backend>() -> Tensor<B, 3> {
        let values: Vec<f32> = (0..3 * 5 * 37).map(|i| 12.0 * (i as f32 * 0.613).sin() * (i as f32 * 0.071).cos()).collect();
        Tensor::from_data(TensorData::new(values, [3, 5, 37]), &Default::default())
    }

    fn labels<B: Backend>() -> Tensor<B, 2, Int> {
        Tensor::from_data(TensorData::new((0..15i64).map(|i| i * 7 % 37).collect::<Vec<_>>(), [3, 5]), &Default::default())
    }

    fn close(a: Vec<f32>, b: Vec<f32>, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= 2e-6 * (1.0 + y.abs()), "{what}[{i}]: {x} vs {y}");
        }
    }

    #[test]
    fn the_cpu_kernel_matches_the_tensor_ops_with_its_gradient() {
        let (fused, fused_entropy) = token_logps_and_entropy(logits::<Flex>(), labels());
        let (ops, ops_entropy) = token_logps_and_entropy_ops(logits::<Flex>(), labels());
        close(fused.clone().into_data().to_vec().unwrap(), ops.into_data().to_vec().unwrap(), "log-probs");
        close(fused_entropy.into_data().to_vec().unwrap(), ops_entropy.into_data().to_vec().unwrap(), "entropy");
        // with or without the entropy, in inference and under autodiff: the same log-probs, to the bit
        assert_eq!(token_logps(logits::<Flex>(), labels()).into_data(), fused.clone().into_data());
        let gradient = |fused: bool| {
            let x = logits::<Ad>().require_grad();
            let weights = Tensor::<Ad, 2>::from_data(TensorData::new((0..15).map(|i| (i as f32 * 0.3).cos()).collect::<Vec<_>>(), [3, 5]), &Default::default());
            let logps = if fused { token_logps_and_entropy(x.clone(), labels()).0 } else { token_logps_ops(x.clone(), labels()) };
            let grads = (logps.clone() * weights).sum().backward();
            (logps.inner(), x.grad(&grads).unwrap())
        };
        let ((logps, grad), (_, expected)) = (gradient(true), gradient(false));
        assert_eq!(logps.into_data(), fused.into_data());
        close(grad.into_data().to_vec().unwrap(), expected.into_data().to_vec().unwrap(), "gradient");
    }

    #[test]
    #[should_panic(expected = "label -3 at position 1 (row-major) is negative")]
    fn a_negative_label_is_an_error() {
        let labels = Tensor::<Flex, 2, Int>::from_data(TensorData::new(vec![0i64, -3, 4, 2, 3], [1, 5]), &Default::default());
        token_logps(logits::<Flex>().slice([0..1, 0..5, 0..37]), labels);
    }

    #[test]
    #[should_panic(expected = "label 40 at position 2 (row-major) is outside the vocabulary of 37")]
    fn a_label_outside_the_vocabulary_is_an_error() {
        let labels = Tensor::<Flex, 2, Int>::from_data(TensorData::new(vec![0i64, 1, 40, 2, 3], [1, 5]), &Default::default());
        token_logps(logits::<Flex>().slice([0..1, 0..5, 0..37]), labels);
    }
}
