//! One AdamW step of one parameter (PyTorch's `AdamW`, burn's order of operations): the moments,
//! their bias corrections, the decoupled weight decay and the update, as one pass over memory on
//! the CPU backend instead of fifteen tensor ops that each read and allocate a parameter-sized
//! tensor. Elsewhere (other backends, other dtypes, the kernels off) the same formula as tensor ops.

use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::{DType, Tensor, TensorPrimitive, backend::Backend};

use crate::{TASK_ELEMENTS, contiguous, dims, f32s, fused_enabled, in_parallel, tensor};

/// The step's hyper-parameters; `time` is the step's number, from 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
    pub time: i32,
}

impl AdamWStep {
    /// The scalars every element uses: `(1 - b1^t, 1 - b2^t, 1 - lr * wd, lr)` in f32, as burn's
    /// scalar ops take them.
    fn scalars(&self) -> (f32, f32, Option<f32>, f32) {
        let decay = self.lr * self.weight_decay as f64;
        let keep = (decay != 0.0).then_some((1.0 - decay) as f32);
        (1.0 - self.beta_1.powi(self.time), 1.0 - self.beta_2.powi(self.time), keep, self.lr as f32)
    }
}

/// The parameter, first and second moments after one step from `param`, its `grad` and the
/// moments before (`None` on the first step: zeros).
pub fn adamw_step<B: Backend, const D: usize>(param: Tensor<B, D>, grad: Tensor<B, D>, moments: Option<(Tensor<B, D>, Tensor<B, D>)>, step: AdamWStep) -> [Tensor<B, D>; 3] {
    assert_eq!(param.dims(), grad.dims(), "a gradient {:?} for a parameter {:?}", grad.dims(), param.dims());
    let all_f32 = param.dtype() == DType::F32 && grad.dtype() == DType::F32 && moments.as_ref().is_none_or(|(m, v)| m.dtype() == DType::F32 && v.dtype() == DType::F32);
    if all_f32 && fused_enabled() {
        match crate::cast::<_, (Tensor<Flex, D>, Tensor<Flex, D>, Option<(Tensor<Flex, D>, Tensor<Flex, D>)>)>((param, grad, moments)) {
            Ok((p, g, m)) => return fused(p, g, m, step).map(crate::back),
            Err((p, g, m)) => return tensor_ops(p, g, m, step),
        }
    }
    tensor_ops(param, grad, moments, step)
}

/// burn's `AdamW::step` as tensor ops.
fn tensor_ops<B: Backend, const D: usize>(param: Tensor<B, D>, grad: Tensor<B, D>, moments: Option<(Tensor<B, D>, Tensor<B, D>)>, step: AdamWStep) -> [Tensor<B, D>; 3] {
    let (f1, f2) = (1.0 - step.beta_1, 1.0 - step.beta_2);
    let (m, v) = match moments {
        Some((m, v)) => (m.mul_scalar(step.beta_1).add(grad.clone().mul_scalar(f1)), v.mul_scalar(step.beta_2).add(grad.square().mul_scalar(f2))),
        None => (grad.clone().mul_scalar(f1), grad.square().mul_scalar(f2)),
    };
    let (c1, c2, keep, lr) = step.scalars();
    let delta = m.clone().div_scalar(c1).div(v.clone().div_scalar(c2).sqrt().add_scalar(step.epsilon));
    let decayed = match keep {
        Some(keep) => param.mul_scalar(keep),
        None => param,
    };
    [decayed - delta.mul_scalar(lr), m, v]
}

fn fused<const D: usize>(param: Tensor<Flex, D>, grad: Tensor<Flex, D>, moments: Option<(Tensor<Flex, D>, Tensor<Flex, D>)>, step: AdamWStep) -> [Tensor<Flex, D>; 3] {
    let raw = |t: Tensor<Flex, D>| -> FlexTensor { contiguous(t.into_primitive().tensor()) };
    let (p, g) = (raw(param), raw(grad));
    let moments = moments.map(|(m, v)| (raw(m), raw(v)));
    let shape = dims(&p);
    let n = f32s(&p).len();
    let (mut p_out, mut m_out, mut v_out) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    let (c1, c2, keep, lr) = step.scalars();
    let (b1, b2, eps) = (step.beta_1, step.beta_2, step.epsilon);
    let (f1, f2) = (1.0 - b1, 1.0 - b2);
    let (ps, gs) = (f32s(&p), f32s(&g));
    let old = moments.as_ref().map(|(m, v)| (f32s(m), f32s(v)));
    let parts = p_out.chunks_mut(TASK_ELEMENTS).zip(m_out.chunks_mut(TASK_ELEMENTS)).zip(v_out.chunks_mut(TASK_ELEMENTS)).enumerate();
    in_parallel(parts, |(k, ((p_out, m_out), v_out))| {
        let start = k * TASK_ELEMENTS;
        for i in 0..p_out.len() {
            let (x, gi) = (ps[start + i], gs[start + i]);
            // the tensor ops' roundings, in their order
            let (m, v) = match old {
                Some((m, v)) => (m[start + i] * b1 + gi * f1, v[start + i] * b2 + (gi * gi) * f2),
                None => (gi * f1, (gi * gi) * f2),
            };
            let delta = (m / c1) / ((v / c2).sqrt() + eps);
            let decayed = match keep {
                Some(keep) => x * keep,
                None => x,
            };
            p_out[i] = decayed - delta * lr;
            m_out[i] = m;
            v_out[i] = v;
        }
    });
    [p_out, m_out, v_out].map(|values| Tensor::from_primitive(TensorPrimitive::Float(tensor(values, shape.clone()))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    fn values(n: usize, seed: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|k| (((k * 7919 + seed * 104729) % 2003) as f32 / 1001.0 - 1.0) * scale).collect()
    }

    /// The kernel's three results equal the tensor ops' bit for bit, first step and later, with
    /// and without weight decay, over more than one parallel task.
    #[test]
    fn the_kernel_rounds_as_the_tensor_ops_do() {
        let device = Default::default();
        let n = TASK_ELEMENTS * 2 + 37;
        let t = |v: Vec<f32>| Tensor::<Flex, 1>::from_data(TensorData::new(v, [n]), &device);
        for (weight_decay, time, with_moments) in [(0.0, 1, false), (0.01, 5, true), (0.1, 1000, true)] {
            let step = AdamWStep { lr: 1e-3, beta_1: 0.9, beta_2: 0.999, epsilon: 1e-8, weight_decay, time };
            let moments = || with_moments.then(|| (t(values(n, 3, 0.01)), t(values(n, 4, 1e-4).iter().map(|x| x.abs()).collect())));
            let (p, g) = (values(n, 1, 1.0), values(n, 2, 0.1));
            let fused = fused(t(p.clone()), t(g.clone()), moments(), step);
            let plain = tensor_ops(t(p), t(g), moments(), step);
            for (k, (a, b)) in fused.into_iter().zip(plain).enumerate() {
                assert_eq!(a.into_data().to_vec::<f32>().unwrap(), b.into_data().to_vec::<f32>().unwrap(), "result {k}, wd {weight_decay}, step {time}");
            }
        }
    }
}
