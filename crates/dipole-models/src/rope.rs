//! Rotary position embeddings in Hugging Face's rotate-half layout (RoFormer, Su et al. 2021,
//! arXiv:2104.09864): the first half of each head is paired with the second half, not adjacent
//! elements as in burn's `RotaryEncoding`. Frequencies and angles are computed in f64 and each
//! `cos`/`sin` rounded once to f32: transformers computes `position * inv_freq` in f32, whose
//! rounding (half an ulp of the angle: 3e-5 rad at angle 1000) is a rotation error hundreds of times
//! f32's epsilon that grows with the position; the tables are made once per forward pass, so f64
//! costs nothing per element.

use burn::tensor::{Tensor, TensorData, backend::Backend};

use crate::config::{RopeConfig, RopeScaling};

/// Inverse frequencies `[head_dim / 2]` for a sequence of `seq_len` positions, in f64.
pub fn inv_freq(rope: &RopeConfig, head_dim: usize, seq_len: usize) -> Vec<f64> {
    let base_freqs = |theta: f64| -> Vec<f64> {
        (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / theta.powf(i as f64 / head_dim as f64))
            .collect()
    };
    match rope.scaling {
        RopeScaling::Default => base_freqs(rope.theta),
        RopeScaling::Linear { factor } => base_freqs(rope.theta)
            .into_iter()
            .map(|f| f / factor)
            .collect(),
        RopeScaling::Dynamic {
            factor,
            original_max_position_embeddings: original,
        } => {
            let theta = if seq_len > original {
                let d = head_dim as f64;
                rope.theta * ((factor * seq_len as f64 / original as f64) - (factor - 1.0)).powf(d / (d - 2.0))
            } else {
                rope.theta
            };
            base_freqs(theta)
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: original,
        } => {
            let (low, high, original) = (low_freq_factor, high_freq_factor, original as f64);
            let low_freq_wavelen = original / low;
            let high_freq_wavelen = original / high;
            base_freqs(rope.theta)
                .into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let scaled = if wavelen > low_freq_wavelen { f / factor } else { f };
                    // wavelengths are finite and positive, so "not below high and not above low" is the closed band.
                    let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                    if medium {
                        let smooth = (original / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

/// `cos` and `sin` tables, each `[len, head_dim]`, for positions `start..start + len`.
pub fn tables<B: Backend>(
    rope: &RopeConfig,
    head_dim: usize,
    start: usize,
    len: usize,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let positions: Vec<usize> = (start..start + len).collect();
    tables_at(rope, head_dim, &positions, start + len, device)
}

/// `cos` and `sin` tables, each `[positions.len(), head_dim]`, for arbitrary positions of a
/// sequence `seq_len` long (the length dynamic NTK scaling is computed for).
pub fn tables_at<B: Backend>(
    rope: &RopeConfig,
    head_dim: usize,
    positions: &[usize],
    seq_len: usize,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let freqs = inv_freq(rope, head_dim, seq_len);
    let half = head_dim / 2;
    let len = positions.len();
    let mut cos = Vec::with_capacity(len * head_dim);
    let mut sin = Vec::with_capacity(len * head_dim);
    for &pos in positions {
        // the angle in f64 (see the module's documentation); cos/sin of it rounded once to f32
        let row: Vec<f64> = freqs.iter().map(|f| pos as f64 * f).collect();
        for _ in 0..2 {
            cos.extend(row.iter().map(|a| a.cos() as f32));
            sin.extend(row.iter().map(|a| a.sin() as f32));
        }
    }
    debug_assert_eq!(cos.len(), len * 2 * half);
    (
        Tensor::from_data(TensorData::new(cos, [len, head_dim]), device),
        Tensor::from_data(TensorData::new(sin, [len, head_dim]), device),
    )
}

/// The rotation for one forward pass, as `[1, len * head_dim]` rows that every `(batch, head)` row of
/// a contiguous `[batch, heads, len, head_dim]` tensor shares: products with a shared row are the
/// CPU backend's SIMD broadcast path in the forward pass and in the backward pass alike (a
/// rotation in the projections' `[batch, len, heads, head_dim]` layout left the backward pass a
/// strided walk over the transposed gradient). `sin` carries rotate-half's sign: its first half is
/// negated, so `rotate_half(x) * sin == cat(x2, x1) * signed_sin` with no `neg` pass.
#[derive(Clone)]
pub struct Rotary<B: Backend> {
    pub cos: Tensor<B, 2>,
    pub signed_sin: Tensor<B, 2>,
}

impl<B: Backend> Rotary<B> {
    /// From `[len, head_dim]` tables (see [`tables`]) that every row of the batch shares.
    pub fn new(cos: Tensor<B, 2>, sin: Tensor<B, 2>) -> Self {
        Self::per_row(cos, sin, 1)
    }

    /// From `[rows * len, head_dim]` tables holding each batch row's own positions (rows whose
    /// tokens sit at different positions), or `rows` = 1 for positions every row shares.
    pub fn per_row(cos: Tensor<B, 2>, sin: Tensor<B, 2>, rows: usize) -> Self {
        let [n, d] = cos.dims();
        assert!(rows > 0 && n % rows == 0, "RoPE tables of {n} positions do not split into {rows} rows");
        let half = d / 2;
        let signed = Tensor::cat(vec![sin.clone().narrow(1, 0, half).neg(), sin.narrow(1, half, half)], 1);
        Self { cos: cos.reshape([rows, n * d / rows]), signed_sin: signed.reshape([rows, n * d / rows]) }
    }

    /// This rotation followed by a multiplication by `factor`, folded into the tables. Queries use
    /// it for attention's `1/sqrt(head_dim)`: the scaling then costs nothing instead of a pass over
    /// every `[q, k]` score forward and backward (exact, barring underflow, when the factor is a power
    /// of two, as for head dims 64 and 256). Scale f32 tables, then [`cast`](Self::cast) them.
    pub fn scaled(&self, factor: f64) -> Self {
        Self { cos: self.cos.clone().mul_scalar(factor), signed_sin: self.signed_sin.clone().mul_scalar(factor) }
    }

    /// The tables in `dtype` (the dtype the projections come out in under mixed precision).
    pub fn cast(self, dtype: burn::tensor::DType) -> Self {
        Self { cos: dipole_lora::cast_to(self.cos, dtype), signed_sin: dipole_lora::cast_to(self.signed_sin, dtype) }
    }

    /// Rotate-half RoPE on `x` `[batch, heads, len, head_dim]` (tables cast to `x`'s dtype, as
    /// transformers does under mixed precision). A transposed view is made contiguous first (one
    /// copy, and one for its gradient), so the rotation's own work runs on contiguous rows.
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [batch, heads, len, d] = x.dims();
        let half = d / 2;
        let dtype = x.dtype();
        let table_rows = self.cos.dims()[0];
        let rows = x.reshape([batch * heads, len * d]);
        let by_position = rows.clone().reshape([batch * heads, len, d]);
        let swapped = Tensor::cat(vec![by_position.clone().narrow(2, half, half), by_position.narrow(2, 0, half)], 2);
        let (cos, sin) = (dipole_lora::cast_to(self.cos.clone(), dtype), dipole_lora::cast_to(self.signed_sin.clone(), dtype));
        if table_rows == 1 {
            let rotated = rows * cos + swapped.reshape([batch * heads, len * d]) * sin;
            return rotated.reshape([batch, heads, len, d]);
        }
        assert_eq!(table_rows, batch, "RoPE tables for {table_rows} rows applied to a batch of {batch}");
        // each batch row's table shared by its heads
        let rows = rows.reshape([batch, heads, len * d]);
        let [cos, sin] = [cos, sin].map(|t| t.reshape([batch, 1, len * d]));
        let rotated = rows * cos + swapped.reshape([batch, heads, len * d]) * sin;
        rotated.reshape([batch, heads, len, d])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let rope = RopeConfig {
            theta: 10000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64,
            },
        };
        let plain = inv_freq(&RopeConfig { theta: 10000.0, scaling: RopeScaling::Default }, 16, 10);
        let scaled = inv_freq(&rope, 16, 10);
        // wavelength 2*pi < 16: untouched
        assert_eq!(scaled[0], plain[0]);
        // the lowest frequency has wavelength > 64: divided by the factor
        assert!((scaled[7] - plain[7] / 8.0).abs() < 1e-12);
        // some band in between is smoothed: strictly between the two
        assert!(scaled.iter().zip(&plain).any(|(s, p)| *s < *p && *s > *p / 8.0));
    }

    #[test]
    fn dynamic_scaling_only_changes_past_the_original_length() {
        let rope = RopeConfig {
            theta: 10000.0,
            scaling: RopeScaling::Dynamic { factor: 2.0, original_max_position_embeddings: 32 },
        };
        let plain = inv_freq(&RopeConfig { theta: 10000.0, scaling: RopeScaling::Default }, 8, 10);
        assert_eq!(inv_freq(&rope, 8, 32), plain);
        assert!(inv_freq(&rope, 8, 64)[1] < plain[1]);
    }
}
