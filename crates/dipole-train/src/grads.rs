//! Gradient handling with PyTorch semantics: one global L2 norm over every trainable parameter
//! (burn's built-in clipping is per tensor) and scaling.

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, backend::Backend};

/// Ids and ranks of a module's float parameters, in visiting order.
fn float_params<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M) -> Vec<(ParamId, usize)> {
    struct Ids(Vec<(ParamId, usize)>);
    impl<B: Backend> ModuleVisitor<B> for Ids {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.push((param.id, D));
        }
    }
    let mut ids = Ids(Vec::new());
    module.visit(&mut ids);
    ids.0
}

macro_rules! per_rank {
    ($rank:expr, $d:ident => $body:expr) => {
        match $rank {
            1 => { const $d: usize = 1; $body }
            2 => { const $d: usize = 2; $body }
            3 => { const $d: usize = 3; $body }
            4 => { const $d: usize = 4; $body }
            r => panic!("parameters of rank {r} are not supported"),
        }
    };
}

/// Sum of squares of every gradient, in f64 on the host.
pub fn squared_norm<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M, grads: &GradientsParams) -> f64 {
    let mut total = 0.0;
    for (id, rank) in float_params::<B, M>(module) {
        per_rank!(rank, D => {
            if let Some(g) = grads.get::<B::InnerBackend, D>(id) {
                let s: f64 = g.powi_scalar(2).sum().into_scalar().elem_f64();
                total += s;
            }
        });
    }
    total
}

/// Multiplies every gradient by `factor`.
pub fn scale<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M, grads: &mut GradientsParams, factor: f64) {
    for (id, rank) in float_params::<B, M>(module) {
        per_rank!(rank, D => {
            if let Some(g) = grads.remove::<B::InnerBackend, D>(id) {
                grads.register::<B::InnerBackend, D>(id, g.mul_scalar(factor));
            }
        });
    }
}

/// PyTorch's `clip_grad_norm_`: scales all gradients by `min(1, max_norm / (norm + 1e-6))` and
/// returns the pre-clip global norm.
pub fn clip_global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
    max_norm: Option<f64>,
) -> f64 {
    let norm = squared_norm::<B, M>(module, grads).sqrt();
    if let Some(max) = max_norm {
        let coef = (max / (norm + 1e-6)).min(1.0);
        if coef < 1.0 {
            scale::<B, M>(module, grads, coef);
        }
    }
    norm
}

trait ElemF64 {
    fn elem_f64(self) -> f64;
}

impl<E: burn::tensor::ElementConversion> ElemF64 for E {
    fn elem_f64(self) -> f64 {
        self.elem::<f64>()
    }
}
