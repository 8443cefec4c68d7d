//! Log-probs of every pair of a dataset under one model: the reference pass of DPO (precomputed
//! once, or per step) and the `cargo xtask logps` command.

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};
use dipole_data::{PairInputs, PreferenceBatch};
use dipole_loss::sequence_logps;
use dipole_models::CausalLm;

/// Log-probs of one pair's completions under a model.
#[derive(Clone, Debug, PartialEq)]
pub struct PairLogps {
    pub index: usize,
    /// Summed over completion tokens, in f64 on the host: the exact sum of the f32 token log-probs,
    /// free of the order-dependent rounding of an f32 reduction (which reaches 1e-4 at 100+ tokens).
    pub chosen: f64,
    pub rejected: f64,
    /// One value per completion token, in order.
    pub chosen_tokens: Vec<f32>,
    pub rejected_tokens: Vec<f32>,
}

/// Tensors of a batch on `device`: ids and attention mask as Int, completion mask as Float.
pub struct BatchTensors<B: Backend> {
    pub input_ids: Tensor<B, 2, Int>,
    pub attention_mask: Tensor<B, 2, Int>,
    pub completion_mask: Tensor<B, 2>,
}

impl<B: Backend> BatchTensors<B> {
    pub fn new(batch: &PreferenceBatch, device: &B::Device) -> Self {
        Self::from_rows(&batch.input_ids, &batch.attention_mask, &batch.completion_mask, batch.seq_len, device)
    }

    /// The rows `rows` alone.
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Self {
        let len = self.input_ids.dims()[1];
        BatchTensors {
            input_ids: self.input_ids.clone().slice([rows.clone(), 0..len]),
            attention_mask: self.attention_mask.clone().slice([rows.clone(), 0..len]),
            completion_mask: self.completion_mask.clone().slice([rows, 0..len]),
        }
    }

    /// From right-padded rows of equal length `seq_len`.
    pub fn from_rows(input_ids: &[Vec<u32>], attention_mask: &[Vec<u8>], completion_mask: &[Vec<u8>], seq_len: usize, device: &B::Device) -> Self {
        let shape = [input_ids.len(), seq_len];
        let ints = |rows: &[Vec<u32>]| rows.iter().flatten().map(|&v| v as i64).collect::<Vec<_>>();
        let mask_ints = |rows: &[Vec<u8>]| rows.iter().flatten().map(|&v| v as i64).collect::<Vec<_>>();
        let floats = |rows: &[Vec<u8>]| rows.iter().flatten().map(|&v| v as f32).collect::<Vec<_>>();
        Self {
            input_ids: Tensor::from_data(TensorData::new(ints(input_ids), shape), device),
            attention_mask: Tensor::from_data(TensorData::new(mask_ints(attention_mask), shape), device),
            completion_mask: Tensor::from_data(TensorData::new(floats(completion_mask), shape), device),
        }
    }
}

/// Runs `model` over `pairs` in batches of `batch_size` pairs (dataset order) and returns each
/// pair's summed and per-token completion log-probs.
pub fn pair_logps<B: Backend>(
    model: &CausalLm<B>,
    pairs: &[PairInputs],
    batch_size: usize,
    pad_id: u32,
    device: &B::Device,
) -> Vec<PairLogps> {
    assert!(batch_size > 0, "batch_size must be at least 1");
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch_size) {
        let batch = PreferenceBatch::new(chunk, pad_id);
        let t = BatchTensors::<B>::new(&batch, device);
        // each pair's prompt runs once (see `CausalLm::forward_hidden_pairs`)
        let logits = model.logits(model.forward_hidden_pairs(&batch.input_ids, &batch.lengths(), device));
        let logps = sequence_logps(logits, t.input_ids, t.completion_mask);
        let per_token: Vec<f32> = logps.per_token.into_data().convert::<f32>().to_vec().expect("f32");
        let width = batch.seq_len - 1;
        let tokens = |row: usize| -> Vec<f32> {
            (0..width)
                .filter(|&t| batch.completion_mask[row][t + 1] == 1)
                .map(|t| per_token[row * width + t])
                .collect()
        };
        let b = chunk.len();
        let sum = |tokens: &[f32]| tokens.iter().map(|&x| x as f64).sum::<f64>();
        for (i, pair) in chunk.iter().enumerate() {
            let (chosen_tokens, rejected_tokens) = (tokens(i), tokens(b + i));
            out.push(PairLogps {
                index: pair.index,
                chosen: sum(&chosen_tokens),
                rejected: sum(&rejected_tokens),
                chosen_tokens,
                rejected_tokens,
            });
        }
    }
    out
}
