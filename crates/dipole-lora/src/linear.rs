//! The linear layer every model projection is built from: a base weight plus an optional low-rank
//! adapter (LoRA, Hu et al. 2021, arXiv:2106.09685) and an optional frozen reference adapter.
//!
//! Layouts follow burn (`weight` is `[in, out]`, so `y = x @ W + b`); the adapter's `a` is `[in, r]`
//! and `b` is `[r, out]`. PEFT stores the transposes (`lora_A` `[r, in]`, `lora_B` `[out, r]`); the
//! conversion happens at the file boundary, never in the forward pass.

use crate::rng::SeededRng;
use burn::module::{Module, Param};
use burn::tensor::{DType, Distribution, Tensor, TensorData, backend::Backend};

use crate::config::{LoraConfig, LoraInit};
use crate::peft::PeftMatrices;

/// A low-rank adapter: `delta(x) = scale * (dropout(x) @ a) @ b`.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// `[in, r]` (PEFT's `lora_A.weight` transposed).
    pub a: Param<Tensor<B, 2>>,
    /// `[r, out]` (PEFT's `lora_B.weight` transposed).
    pub b: Param<Tensor<B, 2>>,
    /// `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.
    pub scale: f64,
    /// Dropout on the adapter's input; active only under autodiff (training).
    pub dropout: f64,
}

impl<B: Backend> LoraAdapter<B> {
    /// A fresh adapter: A from `config.init` with `seed`, B = 0 (so the layer starts unchanged).
    pub fn init(config: &LoraConfig, in_features: usize, out_features: usize, seed: u64, device: &B::Device) -> Self {
        let r = config.r;
        let a = match config.init {
            // Kaiming-uniform with a = sqrt(5) on a [r, in] matrix: bound = 1 / sqrt(in).
            LoraInit::KaimingUniform => {
                let bound = 1.0 / (in_features as f64).sqrt();
                uniform_matrix(seed, in_features * r, -bound, bound)
            }
            LoraInit::Gaussian => {
                let std = 1.0 / r as f64;
                normal_matrix(seed, in_features * r, std)
            }
        };
        Self {
            a: Param::from_tensor(Tensor::from_data(TensorData::new(a, [in_features, r]), device)),
            b: Param::from_tensor(Tensor::zeros([r, out_features], device)),
            scale: config.scale(),
            dropout: config.lora_dropout,
        }
    }

    /// From PEFT's matrices (`lora_A` `[r, in]`, `lora_B` `[out, r]`).
    pub fn from_peft(m: &PeftMatrices, scale: f64, dropout: f64, device: &B::Device) -> Self {
        let a = transpose(&m.a, m.r, m.in_features);
        let b = transpose(&m.b, m.out_features, m.r);
        Self {
            a: Param::from_tensor(Tensor::from_data(TensorData::new(a, [m.in_features, m.r]), device)),
            b: Param::from_tensor(Tensor::from_data(TensorData::new(b, [m.r, m.out_features]), device)),
            scale,
            dropout,
        }
    }

    /// In PEFT's layout.
    pub fn to_peft(&self) -> PeftMatrices {
        let [in_features, r] = self.a.dims();
        let [_, out_features] = self.b.dims();
        let a: Vec<f32> = self.a.val().into_data().convert::<f32>().to_vec().expect("f32");
        let b: Vec<f32> = self.b.val().into_data().convert::<f32>().to_vec().expect("f32");
        PeftMatrices {
            a: transpose(&a, in_features, r),
            b: transpose(&b, r, out_features),
            r,
            in_features,
            out_features,
        }
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[1]
    }

    /// The adapter's contribution, computed through the rank bottleneck (never the dense delta).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let x = if self.dropout > 0.0 && B::ad_enabled(&x.device()) {
            let keep = 1.0 - self.dropout;
            let mask = x.random_like(Distribution::Bernoulli(keep));
            x * mask / keep
        } else {
            x
        };
        let dtype = x.dtype();
        let low = burn::tensor::module::linear(x, cast_to(self.a.val(), dtype), None);
        // the scale folded into the small `[r, out]` matrix (in the parameter's dtype, before any
        // cast): no pass over the `[rows, out]` output
        burn::tensor::module::linear(low, cast_to(self.b.val().mul_scalar(self.scale), dtype), None)
    }

    /// The dense `[in, out]` update `scale * a @ b` (for merging only).
    pub fn delta(&self) -> Tensor<B, 2> {
        self.a.val().matmul(self.b.val()).mul_scalar(self.scale)
    }

    /// The same adapter with its parameters excluded from gradients.
    pub fn frozen(self) -> Self {
        Self {
            a: self.a.set_require_grad(false),
            b: self.b.set_require_grad(false),
            ..self
        }
    }
}

/// Which weights a [`LoraLinear`] computes with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AdapterMode {
    /// Base + trainable adapter (the policy).
    #[default]
    Active,
    /// The base weight alone (LoRA DPO's reference: no second copy of the model).
    Disabled,
    /// Base + the frozen reference adapter (DPO after an SFT adapter: the reference is base + SFT).
    Reference,
}

/// A linear projection with an optional LoRA adapter and an optional frozen reference adapter.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    /// `[in, out]`.
    pub weight: Param<Tensor<B, 2>>,
    /// `[out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub adapter: Option<LoraAdapter<B>>,
    pub reference_adapter: Option<LoraAdapter<B>>,
    pub mode: AdapterMode,
    /// True while the adapter's delta is folded into `weight` (the adapter is then skipped).
    pub merged: bool,
    /// Mixed precision: the dtype the matmul runs in (input and weights are cast to it, the output
    /// stays in it); `None` computes in the input's dtype. The parameters themselves keep their
    /// dtype (the f32 master copy), so their gradients come back through the cast in f32.
    pub compute_dtype: Option<DType>,
}

pub use dipole_kernels::cast_to;

impl<B: Backend> LoraLinear<B> {
    /// A plain linear layer from a `[in, out]` weight and optional `[out]` bias.
    pub fn new(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Self {
            weight: Param::from_tensor(weight),
            bias: bias.map(Param::from_tensor),
            adapter: None,
            reference_adapter: None,
            mode: AdapterMode::Active,
            merged: false,
            compute_dtype: None,
        }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// `x @ weight (+ bias) (+ adapter)` over the last dimension of `x`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        // Every leading dimension folded into rows: burn's linear on a batched input runs one small
        // gemm per batch row, and its weight gradient sums per-batch products; on `[rows, in]` both
        // are single large gemms.
        let mut out_dims = x.dims();
        out_dims[D - 1] = self.out_features();
        let rows = out_dims[..D - 1].iter().product();
        self.forward_rows(x.reshape([rows, self.in_features()])).reshape(out_dims)
    }

    fn forward_rows(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let x = match self.compute_dtype {
            Some(dtype) => cast_to(x, dtype),
            None => x,
        };
        let dtype = x.dtype();
        let weight = self.weight.val();
        let bias = self.bias.as_ref().map(|b| cast_to(b.val(), dtype));
        let base = if !weight.is_require_grad() && weight.dtype() != dtype {
            // a frozen weight stored in another dtype: cast inside the op, never kept in `dtype`
            let y = dipole_kernels::frozen::frozen_matmul(x.clone(), weight);
            match bias {
                Some(b) => y + b.unsqueeze::<2>(),
                None => y,
            }
        } else {
            burn::tensor::module::linear(x.clone(), cast_to(weight, dtype), bias)
        };
        match self.active_adapter() {
            Some(adapter) => base + adapter.forward(x),
            None => base,
        }
    }

    /// The adapter the forward pass adds to the base projection in the current mode, if any.
    fn active_adapter(&self) -> Option<&LoraAdapter<B>> {
        match self.mode {
            AdapterMode::Active if !self.merged => self.adapter.as_ref(),
            AdapterMode::Reference => self.reference_adapter.as_ref(),
            _ => None,
        }
    }

    /// The `[in, out]` weight when the layer is that weight alone (no bias, no adapter in the
    /// current mode), for callers that fuse the projection into what follows it.
    pub fn plain_weight(&self) -> Option<Tensor<B, 2>> {
        (self.bias.is_none() && self.active_adapter().is_none()).then(|| self.weight.val())
    }

    /// Freezes (or unfreezes) the base weight and bias. A weight made trainable is held in f32 (its
    /// master copy) whatever dtype it was stored in.
    pub fn set_base_trainable(&mut self, trainable: bool) {
        if trainable && self.weight.val().dtype() != DType::F32 {
            self.weight = Param::initialized(self.weight.id, self.weight.val().detach().cast(DType::F32));
        }
        self.weight = self.weight.clone().set_require_grad(trainable);
        self.bias = self.bias.take().map(|b| b.set_require_grad(trainable));
    }

    /// Folds the adapter into the base weight: `W += scale * a @ b`. A no-op without an adapter.
    pub fn merge(&mut self) {
        if self.merged {
            return;
        }
        if let Some(delta) = self.adapter.as_ref().map(|a| a.delta().detach()) {
            self.shift_weight(delta);
            self.merged = true;
        }
    }

    /// Undoes [`merge`](Self::merge) (exact up to float rounding).
    pub fn unmerge(&mut self) {
        if !self.merged {
            return;
        }
        if let Some(delta) = self.adapter.as_ref().map(|a| a.delta().detach()) {
            self.shift_weight(delta.neg());
        }
        self.merged = false;
    }

    /// `weight += delta`, added in the delta's dtype and stored in the weight's; the parameter
    /// keeps its id and whether it trains.
    fn shift_weight(&mut self, delta: Tensor<B, 2>) {
        let w = self.weight.val().detach();
        let (dtype, trainable) = (w.dtype(), self.weight.val().is_require_grad());
        let shifted = cast_to(cast_to(w, delta.dtype()) + delta, dtype);
        self.weight = Param::initialized(self.weight.id, shifted.set_require_grad(trainable));
    }
}

/// Row-major `[rows, cols]` -> `[cols, rows]`.
pub fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

fn uniform_matrix(seed: u64, n: usize, low: f64, high: f64) -> Vec<f32> {
    let mut rng = SeededRng::new(seed);
    (0..n).map(|_| (low + (high - low) * rng.uniform()) as f32).collect()
}

fn normal_matrix(seed: u64, n: usize, std: f64) -> Vec<f32> {
    let mut rng = SeededRng::new(seed);
    (0..n).map(|_| (rng.normal_f64() * std) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    type B = Flex;

    fn t2(v: Vec<f32>, shape: [usize; 2]) -> Tensor<B, 2> {
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    #[test]
    fn base_projection_is_x_times_weight_plus_bias() {
        let b = Tensor::<B, 1>::from_data(TensorData::new(vec![0.5f32, -0.5, 1.0], [3]), &Default::default());
        let layer = LoraLinear::new(t2(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3]), Some(b));
        let y: Vec<f32> = layer.forward(t2(vec![1.0, -1.0], [1, 2])).into_data().to_vec().unwrap();
        assert_eq!(y, vec![1.0 - 4.0 + 0.5, 2.0 - 5.0 - 0.5, 3.0 - 6.0 + 1.0]);
    }

    fn with_adapter() -> LoraLinear<B> {
        let mut layer = LoraLinear::new(Tensor::zeros([2, 2], &Default::default()), None);
        layer.adapter = Some(LoraAdapter {
            a: Param::from_tensor(t2(vec![1.0, 2.0], [2, 1])),
            b: Param::from_tensor(t2(vec![3.0, -1.0], [1, 2])),
            scale: 2.0,
            dropout: 0.0,
        });
        layer
    }

    #[test]
    fn adapter_adds_scaled_low_rank_delta_and_can_be_disabled() {
        let mut layer = with_adapter();
        let x = t2(vec![1.0, 1.0], [1, 2]);
        let y: Vec<f32> = layer.forward(x.clone()).into_data().to_vec().unwrap();
        // (x @ a) = 3; 3 * b * 2 = [18, -6]
        assert_eq!(y, vec![18.0, -6.0]);
        layer.mode = AdapterMode::Disabled;
        let y: Vec<f32> = layer.forward(x).into_data().to_vec().unwrap();
        assert_eq!(y, vec![0.0, 0.0]);
    }

    #[test]
    fn merge_then_unmerge_restores_the_base_and_keeps_outputs() {
        let mut layer = with_adapter();
        let x = t2(vec![0.3, -0.7], [1, 2]);
        let before: Vec<f32> = layer.forward(x.clone()).into_data().to_vec().unwrap();
        layer.merge();
        let merged: Vec<f32> = layer.forward(x.clone()).into_data().to_vec().unwrap();
        for (a, b) in before.iter().zip(&merged) {
            assert!((a - b).abs() < 1e-6);
        }
        layer.unmerge();
        let w: Vec<f32> = layer.weight.val().into_data().to_vec().unwrap();
        assert!(w.iter().all(|v| v.abs() < 1e-6), "{w:?}");
    }

    #[test]
    fn peft_layout_round_trip() {
        let m = PeftMatrices { a: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], b: vec![7.0, 8.0, 9.0, 10.0], r: 2, in_features: 3, out_features: 2 };
        let adapter = LoraAdapter::<B>::from_peft(&m, 1.0, 0.0, &Default::default());
        assert_eq!(adapter.a.dims(), [3, 2]);
        assert_eq!(adapter.to_peft(), m);
    }

    #[test]
    fn kaiming_init_is_bounded_and_b_is_zero() {
        let cfg = LoraConfig::default();
        let adapter = LoraAdapter::<B>::init(&cfg, 64, 32, 7, &Default::default());
        let a: Vec<f32> = adapter.a.val().into_data().to_vec().unwrap();
        assert!(a.iter().all(|v| v.abs() <= 0.125));
        assert!(a.iter().any(|v| v.abs() > 0.1));
        let b: Vec<f32> = adapter.b.val().into_data().to_vec().unwrap();
        assert!(b.iter().all(|v| *v == 0.0));
    }
}
