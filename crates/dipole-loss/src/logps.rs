//! Per-sequence log-probabilities of completion tokens, the quantity every preference objective
//! is a function of.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, backend::Backend};

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

/// `logits` `[rows, T, vocab]`, `input_ids` `[rows, T]`, `completion_mask` `[rows, T]` (1 where the
/// token is scored). The token at position `t` is scored by the log-softmax at position `t - 1`.
pub fn sequence_logps<B: Backend>(
    logits: Tensor<B, 3>,
    input_ids: Tensor<B, 2, Int>,
    completion_mask: Tensor<B, 2>,
) -> SequenceLogps<B> {
    let [rows, len, vocab] = logits.dims();
    assert_eq!(input_ids.dims(), [rows, len], "input_ids must be [rows, T] like the logits");
    assert_eq!(completion_mask.dims(), [rows, len], "completion_mask must be [rows, T] like the logits");
    let logits = logits.slice([0..rows, 0..len - 1, 0..vocab]);
    let labels = input_ids.slice([0..rows, 1..len]);
    let mask = completion_mask.slice([0..rows, 1..len]);
    let logp = log_softmax(logits, 2).gather(2, labels.unsqueeze_dim::<3>(2));
    let per_token = logp.squeeze_dim::<2>(2) * mask.clone();
    SequenceLogps {
        sum: per_token.clone().sum_dim(1).squeeze_dim::<1>(1),
        per_token,
        mask,
    }
}

#[cfg(test)]
mod tests {
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
}
