//! The linear layer every dipole model projection is built from: a frozen-able base weight plus an
//! optional low-rank adapter (LoRA, Hu et al. 2021, arXiv:2106.09685).
//!
//! Layouts follow burn (`weight` is `[in, out]`, so `y = x @ W + b`); the adapter's `a` is `[in, r]`
//! and `b` is `[r, out]`. PEFT stores the transposes (`lora_A` `[r, in]`, `lora_B` `[out, r]`); the
//! conversion happens at the file boundary, never in the forward pass.

use burn::module::{Module, Param};
use burn::tensor::{Tensor, backend::Backend};

/// A low-rank adapter: `delta(x) = scale * (x @ a) @ b`.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// `[in, r]` (PEFT's `lora_A.weight` transposed).
    pub a: Param<Tensor<B, 2>>,
    /// `[r, out]` (PEFT's `lora_B.weight` transposed).
    pub b: Param<Tensor<B, 2>>,
    /// `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.
    pub scale: f64,
}

impl<B: Backend> LoraAdapter<B> {
    pub fn rank(&self) -> usize {
        self.a.dims()[1]
    }

    /// The adapter's contribution, computed through the rank bottleneck (never the dense delta).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let low = burn::tensor::module::linear(x, self.a.val(), None);
        burn::tensor::module::linear(low, self.b.val(), None).mul_scalar(self.scale)
    }
}

/// A linear projection with an optional LoRA adapter.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    /// `[in, out]`.
    pub weight: Param<Tensor<B, 2>>,
    /// `[out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub adapter: Option<LoraAdapter<B>>,
    /// When false the adapter is skipped: the layer computes the base projection exactly.
    pub adapter_enabled: bool,
}

impl<B: Backend> LoraLinear<B> {
    /// A plain linear layer from a `[in, out]` weight and optional `[out]` bias.
    pub fn new(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Self {
            weight: Param::from_tensor(weight),
            bias: bias.map(Param::from_tensor),
            adapter: None,
            adapter_enabled: true,
        }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let base = burn::tensor::module::linear(
            x.clone(),
            self.weight.val(),
            self.bias.as_ref().map(|b| b.val()),
        );
        match (&self.adapter, self.adapter_enabled) {
            (Some(adapter), true) => base + adapter.forward(x),
            _ => base,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    type B = Flex;

    #[test]
    fn base_projection_is_x_times_weight_plus_bias() {
        let device = Default::default();
        let w = Tensor::<B, 2>::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3]), &device);
        let b = Tensor::<B, 1>::from_data(TensorData::new(vec![0.5f32, -0.5, 1.0], [3]), &device);
        let layer = LoraLinear::new(w, Some(b));
        let x = Tensor::<B, 2>::from_data(TensorData::new(vec![1.0f32, -1.0], [1, 2]), &device);
        let y: Vec<f32> = layer.forward(x).into_data().to_vec().unwrap();
        assert_eq!(y, vec![1.0 - 4.0 + 0.5, 2.0 - 5.0 - 0.5, 3.0 - 6.0 + 1.0]);
    }

    #[test]
    fn adapter_adds_scaled_low_rank_delta_and_can_be_disabled() {
        let device = Default::default();
        let w = Tensor::<B, 2>::zeros([2, 2], &device);
        let mut layer = LoraLinear::new(w, None);
        layer.adapter = Some(LoraAdapter {
            a: Param::from_tensor(Tensor::from_data(TensorData::new(vec![1.0f32, 2.0], [2, 1]), &device)),
            b: Param::from_tensor(Tensor::from_data(TensorData::new(vec![3.0f32, -1.0], [1, 2]), &device)),
            scale: 2.0,
        });
        let x = Tensor::<B, 3>::from_data(TensorData::new(vec![1.0f32, 1.0], [1, 1, 2]), &device);
        let y: Vec<f32> = layer.forward(x.clone()).into_data().to_vec().unwrap();
        // (x @ a) = 3; 3 * b * 2 = [18, -6]
        assert_eq!(y, vec![18.0, -6.0]);
        layer.adapter_enabled = false;
        let y: Vec<f32> = layer.forward(x).into_data().to_vec().unwrap();
        assert_eq!(y, vec![0.0, 0.0]);
    }
}
