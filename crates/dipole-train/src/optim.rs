//! AdamW as PyTorch defines it (decoupled weight decay, bias-corrected moments), each parameter's
//! step one fused pass on the CPU backend (`dipole_kernels::adamw`). Its state is burn's
//! `AdamWState`, so checkpoints hold the same record as burn's `AdamW` writes.

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamWState, AdaptiveMomentumState, LearningRate, SimpleOptimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Device, Tensor};
use dipole_kernels::adamw::{AdamWStep, adamw_step};

use crate::config::OptimSection;

/// AdamW's hyper-parameters (no AMSGrad).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FusedAdamW {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
}

impl FusedAdamW {
    /// The hyper-parameters of a config's `[optim]` section.
    pub fn of(optim: &OptimSection) -> Self {
        FusedAdamW { beta_1: optim.adam_beta1 as f32, beta_2: optim.adam_beta2 as f32, epsilon: optim.adam_epsilon as f32, weight_decay: optim.weight_decay as f32 }
    }

    /// The optimizer over a module's parameters (burn's adaptor: one state per parameter id).
    pub fn init<B: AutodiffBackend, M: AutodiffModule<B>>(self) -> OptimizerAdaptor<FusedAdamW, M, B> {
        OptimizerAdaptor::from(self)
    }
}

impl<B: Backend> SimpleOptimizer<B> for FusedAdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(&self, lr: LearningRate, tensor: Tensor<B, D>, grad: Tensor<B, D>, state: Option<Self::State<D>>) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let (time, moments) = match state {
            Some(AdamWState { momentum }) => (momentum.time + 1, Some((momentum.moment_1, momentum.moment_2))),
            None => (1, None),
        };
        let step = AdamWStep { lr, beta_1: self.beta_1, beta_2: self.beta_2, epsilon: self.epsilon, weight_decay: self.weight_decay, time: time as i32 };
        let [tensor, moment_1, moment_2] = adamw_step(tensor, grad, moments, step);
        (tensor, Some(AdamWState { momentum: AdaptiveMomentumState { time, moment_1, moment_2, max_moment_2: None } }))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device<B>) -> Self::State<D> {
        let m = state.momentum;
        AdamWState { momentum: AdaptiveMomentumState { time: m.time, moment_1: m.moment_1.to_device(device), moment_2: m.moment_2.to_device(device), max_moment_2: m.max_moment_2.map(|t| t.to_device(device)) } }
    }
}
