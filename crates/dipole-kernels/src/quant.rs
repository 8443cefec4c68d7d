//! Frozen weights in 8 or 4 bits: block-wise symmetric (absmax) quantization with one f32 scale
//! per block of `block` consecutive input rows of an output column, and the product of activations
//! with such a weight, dequantized tile by tile inside the op so that no full-precision copy of the
//! weight ever exists (a custom autodiff op whose state is the packed weight: `y = x W`,
//! `dx = dy Wᵀ`, no gradient for the weight).
//!
//! burn's own quantized tensors do not serve here: burn-autodiff's quantized ops are `todo!()` and
//! burn-flex stores 4-bit values one per byte. The codes are an ordinary integer tensor (U8 for
//! int4, two codes a byte; I8 for int8), so every backend holds and unpacks them with tensor ops.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::tensor::{DType, ElementConversion, FloatDType, Int, IntDType, Tensor, backend::Backend};

use crate::cast_to;

/// How many bits a frozen weight's values keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantBits {
    /// Codes -127..=127 (one byte each).
    Int8,
    /// Codes -7..=7 (two a byte).
    Int4,
}

impl QuantBits {
    /// The largest code; a block's largest magnitude maps to it.
    fn max_code(self) -> f64 {
        match self {
            QuantBits::Int8 => 127.0,
            QuantBits::Int4 => 7.0,
        }
    }
}

/// A weight that cannot be quantized as asked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    #[error("a weight of {rows} input rows cannot be split into blocks of {block} rows (the block must divide it)")]
    Block { rows: usize, block: usize },
    #[error("an int4 weight needs an even number of output columns (two codes a byte), got {0}")]
    OddColumns(usize),
}

/// A frozen `[in, out]` weight in 8 or 4 bits: `codes` `[in, out]` (I8) or `[in, out / 2]` (U8, the
/// low nibble column `2j`, the high `2j + 1`, each code stored plus 8), `scales` `[in / block,
/// out]` f32. Plain tensors, not parameters: nothing trains them and records do not hold them.
#[derive(Clone, Debug)]
pub struct QuantWeight<B: Backend> {
    pub codes: Tensor<B, 2, Int>,
    pub scales: Tensor<B, 2>,
    pub bits: QuantBits,
    pub block: usize,
}

impl<B: Backend> QuantWeight<B> {
    /// `weight` `[in, out]` (any float dtype) quantized block by block: each block's scale is its
    /// largest magnitude over the largest code, each value rounded to the nearest code.
    pub fn quantize(weight: Tensor<B, 2>, bits: QuantBits, block: usize) -> Result<Self, QuantError> {
        let [rows, cols] = weight.dims();
        if block == 0 || !rows.is_multiple_of(block) {
            return Err(QuantError::Block { rows, block });
        }
        if bits == QuantBits::Int4 && !cols.is_multiple_of(2) {
            return Err(QuantError::OddColumns(cols));
        }
        let blocks = weight.reshape([rows / block, block, cols]);
        let blocks = cast_to(blocks, DType::F32);
        // an all-zero block keeps scale 0 and codes 0
        let absmax = blocks.clone().abs().max_dim(1);
        let scales = absmax.div_scalar(bits.max_code());
        let safe = scales.clone().mask_fill(scales.clone().equal_elem(0.0), 1.0);
        let codes = (blocks / safe).round().clamp(-bits.max_code(), bits.max_code()).reshape([rows, cols]).int();
        let codes = match bits {
            QuantBits::Int8 => codes.cast(IntDType::I8),
            QuantBits::Int4 => {
                let pairs = codes.add_scalar(8).reshape([rows, cols / 2, 2]);
                let low = pairs.clone().narrow(2, 0, 1);
                let high = pairs.narrow(2, 1, 1);
                (low + high.mul_scalar(16)).reshape([rows, cols / 2]).cast(IntDType::U8)
            }
        };
        Ok(QuantWeight { codes, scales: scales.reshape([rows / block, cols]), bits, block })
    }

    /// `[in, out]`.
    pub fn dims(&self) -> [usize; 2] {
        let [rows, cols] = self.codes.dims();
        match self.bits {
            QuantBits::Int8 => [rows, cols],
            QuantBits::Int4 => [rows, 2 * cols],
        }
    }

    /// Input rows `start..start + len` (both multiples of the block) as f32 values.
    pub fn dequantize_rows(&self, start: usize, len: usize) -> Tensor<B, 2> {
        let [_, cols] = self.dims();
        let codes = self.codes.clone().narrow(0, start, len);
        let values = match self.bits {
            QuantBits::Int8 => codes.cast(FloatDType::F32),
            QuantBits::Int4 => {
                let low = codes.clone().bitwise_and_scalar(15.elem());
                let high = codes.bitwise_right_shift_scalar(4.elem());
                let both = Tensor::stack::<3>(vec![low, high], 2).reshape([len, cols]);
                both.cast(FloatDType::F32).sub_scalar(8.0)
            }
        };
        let scales = self.scales.clone().narrow(0, start / self.block, len / self.block).reshape([len / self.block, 1, cols]);
        (values.reshape([len / self.block, self.block, cols]) * scales).reshape([len, cols])
    }

    /// The whole weight as f32 values (for merges and checks; the product never makes it).
    pub fn dequantize(&self) -> Tensor<B, 2> {
        self.dequantize_rows(0, self.dims()[0])
    }

    /// Input rows per tile of the product: whole blocks, about [`TILE_VALUES`] values.
    fn tile_rows(&self) -> usize {
        let [rows, cols] = self.dims();
        let blocks = (TILE_VALUES / (self.block * cols).max(1)).max(1);
        (blocks * self.block).min(rows)
    }

    /// Bytes the codes and scales take.
    pub fn bytes(&self) -> usize {
        let [rows, cols] = self.codes.dims();
        let [s_rows, s_cols] = self.scales.dims();
        rows * cols + 4 * s_rows * s_cols
    }
}

/// Values of the weight dequantized at once in the product (16 MiB of f32).
const TILE_VALUES: usize = 1 << 22;

/// `x @ weight` for `x` `[rows, in]` (f32) and a quantized `weight` `[in, out]`, the weight
/// dequantized a tile of input rows at a time; gradients for `x` only.
pub fn quant_matmul<B: Backend>(x: Tensor<B, 2>, weight: &QuantWeight<B>) -> Tensor<B, 2> {
    assert_eq!(x.dims()[1], weight.dims()[0], "activations {:?} for a weight {:?}", x.dims(), weight.dims());
    match try_autodiff((x, weight.clone())) {
        Ok(y) => y,
        Err((x, weight)) => tiled_product(x, &weight),
    }
}

/// `Σ_tiles x[:, tile] W[tile, :]`, in `x`'s dtype.
fn tiled_product<B: Backend>(x: Tensor<B, 2>, weight: &QuantWeight<B>) -> Tensor<B, 2> {
    let [rows, input] = x.dims();
    let [_, cols] = weight.dims();
    let dtype = x.dtype();
    let step = weight.tile_rows();
    let mut y: Option<Tensor<B, 2>> = None;
    for start in (0..input).step_by(step) {
        let len = step.min(input - start);
        let part = x.clone().narrow(1, start, len).matmul(cast_to(weight.dequantize_rows(start, len), dtype));
        y = Some(match y {
            Some(sum) => sum + part,
            None => part,
        });
    }
    y.unwrap_or_else(|| Tensor::zeros([rows, cols], &x.device()))
}

/// `dy W[tile, :]ᵀ` for every tile, side by side: `dx` `[rows, in]`.
fn tiled_transposed_product<B: Backend>(dy: Tensor<B, 2>, weight: &QuantWeight<B>) -> Tensor<B, 2> {
    let [input, _] = weight.dims();
    let dtype = dy.dtype();
    let step = weight.tile_rows();
    let parts: Vec<Tensor<B, 2>> = (0..input).step_by(step).map(|start| {
        let len = step.min(input - start);
        dy.clone().matmul(cast_to(weight.dequantize_rows(start, len), dtype).transpose())
    }).collect();
    Tensor::cat(parts, 1)
}

fn try_autodiff<B: Backend>(args: (Tensor<B, 2>, QuantWeight<B>)) -> Result<Tensor<B, 2>, (Tensor<B, 2>, QuantWeight<B>)> {
    let args = crate::on_autodiff!(args, (I, C, A) => (Tensor<A, 2>, QuantWeight<A>), |(x, w)| autodiff::<I, C>(x, w));
    Err(args)
}

fn autodiff<I: Backend, C: CheckpointStrategy>(x: Tensor<Autodiff<I, C>, 2>, weight: QuantWeight<Autodiff<I, C>>) -> Tensor<Autodiff<I, C>, 2> {
    let weight = QuantWeight { codes: weight.codes.inner(), scales: weight.scales.inner(), bits: weight.bits, block: weight.block };
    crate::frozen::frozen_linear(x, weight, |x, w| tiled_product(x, w), |dy, w| tiled_transposed_product(dy, w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Distribution, Tolerance};

    type AD = Autodiff<Flex>;

    fn weight(rows: usize, cols: usize) -> Tensor<Flex, 2> {
        let device = Default::default();
        Flex::seed(&device, 3);
        Tensor::random([rows, cols], Distribution::Normal(0.0, 0.05), &device)
    }

    /// Every value within half a step of its block's scale, the codes stored at the width promised.
    #[test]
    fn values_round_to_the_nearest_code_of_their_blocks_scale() {
        for (bits, block) in [(QuantBits::Int8, 32), (QuantBits::Int4, 64)] {
            let w = weight(128, 48);
            let q = QuantWeight::quantize(w.clone(), bits, block).unwrap();
            assert_eq!(q.dims(), [128, 48]);
            let (codes_dtype, code_cols) = match bits {
                QuantBits::Int8 => (DType::I8, 48),
                QuantBits::Int4 => (DType::U8, 24),
            };
            assert_eq!((q.codes.dtype(), q.codes.dims()), (codes_dtype, [128, code_cols]), "{bits:?}");
            assert_eq!(q.scales.dims(), [128 / block, 48]);
            let step: Vec<f32> = q.scales.clone().reshape([128 / block, 1, 48]).expand([128 / block, block, 48]).reshape([128 * 48]).into_data().to_vec().unwrap();
            let error: Vec<f32> = (q.dequantize() - w).abs().reshape([128 * 48]).into_data().to_vec().unwrap();
            for (e, s) in error.iter().zip(&step) {
                assert!(*e <= 0.5 * s * (1.0 + 1e-5), "{bits:?}: error {e} for a step of {s}");
            }
        }
    }

    #[test]
    fn values_on_the_grid_and_zero_blocks_come_back_exactly() {
        let device = Default::default();
        // one column, two blocks of four: multiples of the first block's step (absmax / max code), then zeros
        for (bits, values) in [(QuantBits::Int8, [1.27f32, 0.5, -0.01, 0.0]), (QuantBits::Int4, [0.7, 0.3, -0.1, 0.0])] {
            let all: Vec<f32> = values.iter().copied().chain([0.0; 4]).collect();
            let w = Tensor::<Flex, 1>::from_floats(all.as_slice(), &device).reshape([8, 1]);
            let w = if bits == QuantBits::Int4 { Tensor::cat(vec![w.clone(), w], 1) } else { w };
            let back = QuantWeight::quantize(w.clone(), bits, 4).unwrap().dequantize();
            back.into_data().assert_approx_eq::<f32>(&w.into_data(), Tolerance::absolute(1e-7));
        }
    }

    #[test]
    fn shapes_that_do_not_split_are_errors() {
        assert_eq!(QuantWeight::quantize(weight(100, 8), QuantBits::Int8, 64).unwrap_err(), QuantError::Block { rows: 100, block: 64 });
        assert_eq!(QuantWeight::quantize(weight(64, 7), QuantBits::Int4, 64).unwrap_err(), QuantError::OddColumns(7));
        assert_eq!(QuantWeight::quantize(weight(64, 8), QuantBits::Int8, 0).unwrap_err(), QuantError::Block { rows: 64, block: 0 });
    }

    /// The product and the input's gradient equal those of the plain product with the dequantized
    /// weight, over several tiles (a tile is a few blocks here).
    #[test]
    fn product_and_input_gradient_equal_the_dequantized_weights() {
        let device = Default::default();
        for bits in [QuantBits::Int8, QuantBits::Int4] {
            let w = weight(2048, 4096);
            let q = QuantWeight::<AD>::quantize(Tensor::from_inner(w), bits, 128).unwrap();
            assert_eq!(q.tile_rows(), 1024, "two tiles");
            let full = q.dequantize();
            AD::seed(&device, 5);
            let x = Tensor::<AD, 2>::random([6, 2048], Distribution::Normal(0.0, 1.0), &device).require_grad();
            let upstream = Tensor::<AD, 2>::random([6, 4096], Distribution::Normal(0.0, 1.0), &device);
            let y = quant_matmul(x.clone(), &q);
            let dx = x.grad(&(y.clone() * upstream.clone()).sum().backward()).unwrap();
            let plain_x = x.clone().detach().require_grad();
            let want = plain_x.clone().matmul(full.clone());
            let want_dx = plain_x.grad(&(want.clone() * upstream).sum().backward()).unwrap();
            y.into_data().assert_approx_eq::<f32>(&want.into_data(), Tolerance::absolute(1e-5));
            dx.into_data().assert_approx_eq::<f32>(&want_dx.into_data(), Tolerance::absolute(1e-5));
            // and without autodiff
            let inner = QuantWeight { codes: q.codes.clone().inner(), scales: q.scales.clone().inner(), bits, block: 128 };
            let y_inner = quant_matmul(x.clone().inner(), &inner);
            y_inner.into_data().assert_approx_eq::<f32>(&x.inner().matmul(full.inner()).into_data(), Tolerance::absolute(1e-5));
        }
    }
}
