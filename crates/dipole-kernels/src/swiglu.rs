//! SwiGLU's gated activation `silu(gate) * up`.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::{DType, Tensor, TensorPrimitive, backend::Backend};

use crate::simd::exp;
use crate::{TASK_ELEMENTS, contiguous, dims, f32s, in_parallel, on_cpu, tensor};

/// `silu(gate) * up` of f32 tensors of one shape.
#[allow(clippy::type_complexity)]
pub fn try_silu_mul<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    assert_eq!(gate.dims(), up.dims(), "SwiGLU gate and up projections differ in shape");
    if gate.dtype() != DType::F32 || up.dtype() != DType::F32 {
        return Err((gate, up));
    }
    on_cpu!((gate, up), X => (Tensor<X, D>, Tensor<X, D>),
        flex: |(gate, up)| Tensor::<X, D>::from_primitive(TensorPrimitive::Float(silu_mul_forward(gate.into_primitive().tensor(), up.into_primitive().tensor()))),
        autodiff: |(gate, up)| silu_mul_autodiff(gate, up),
    )
}

/// Backward step of [`try_silu_mul`]: the state is the forward's inputs (gate, up).
#[derive(Debug)]
struct SiluMulBackward;

impl Backward<Flex, 2> for SiluMulBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let [gate_node, up_node] = ops.parents;
        if gate_node.is_none() && up_node.is_none() {
            return;
        }
        let (gate, up) = ops.state;
        let (d_gate, d_up) = silu_mul_backward(gate, up, grad);
        if let Some(node) = gate_node {
            grads.register::<Flex>(node.id, d_gate);
        }
        if let Some(node) = up_node {
            grads.register::<Flex>(node.id, d_up);
        }
    }
}

fn silu_mul_autodiff<C: CheckpointStrategy, const D: usize>(gate: Tensor<Autodiff<Flex, C>, D>, up: Tensor<Autodiff<Flex, C>, D>) -> Tensor<Autodiff<Flex, C>, D> {
    let (gate, up) = (gate.into_primitive().tensor(), up.into_primitive().tensor());
    let out = silu_mul_forward(gate.primitive.clone(), up.primitive.clone());
    let out = match SiluMulBackward.prepare::<C>([gate.node.clone(), up.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((gate.primitive, up.primitive), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

fn silu_mul_forward(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
    let (gate, up) = (contiguous(gate), contiguous(up));
    let shape = dims(&gate);
    let (g, u) = (f32s(&gate), f32s(&up));
    let mut out = vec![0f32; g.len()];
    in_parallel(out.chunks_mut(TASK_ELEMENTS).enumerate(), |(task, chunk)| {
        let at = task * TASK_ELEMENTS;
        silu_mul_chunk(&g[at..at + chunk.len()], &u[at..at + chunk.len()], chunk);
    });
    tensor(out, shape)
}

fn silu_mul_backward(gate: FlexTensor, up: FlexTensor, grad: FlexTensor) -> (FlexTensor, FlexTensor) {
    let grad = contiguous(grad);
    let shape = dims(&gate);
    let (g, u, dy) = (f32s(&gate), f32s(&up), f32s(&grad));
    assert_eq!(g.len(), dy.len(), "SwiGLU gradient shape {:?} for output {shape:?}", dims(&grad));
    let (mut d_gate, mut d_up) = (vec![0f32; g.len()], vec![0f32; g.len()]);
    let parts = d_gate.chunks_mut(TASK_ELEMENTS).zip(d_up.chunks_mut(TASK_ELEMENTS)).enumerate();
    in_parallel(parts, |(task, (d_gate, d_up))| {
        let (at, n) = (task * TASK_ELEMENTS, d_gate.len());
        silu_mul_backward_chunk(&g[at..at + n], &u[at..at + n], &dy[at..at + n], d_gate, d_up);
    });
    (tensor(d_gate, shape.clone()), tensor(d_up, shape))
}

simd_dispatch! {
    fn silu_mul_chunk = silu_mul_kernel(gate: &[f32], up: &[f32], out: &mut [f32]);
    fn silu_mul_backward_chunk = silu_mul_backward_kernel(gate: &[f32], up: &[f32], grad: &[f32], d_gate: &mut [f32], d_up: &mut [f32]);
}

#[inline(always)]
fn sigmoid<const FMA: bool>(x: f32) -> f32 {
    1.0 / (1.0 + exp::<FMA>(-x))
}

#[inline(always)]
fn silu_mul_kernel<const FMA: bool>(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g * sigmoid::<FMA>(g) * u;
    }
}

/// d/dg [g σ(g) u] = u σ(g) (1 + g (1 − σ(g))), d/du = g σ(g).
#[inline(always)]
fn silu_mul_backward_kernel<const FMA: bool>(gate: &[f32], up: &[f32], grad: &[f32], d_gate: &mut [f32], d_up: &mut [f32]) {
    for ((((dg, du), &g), &u), &dy) in d_gate.iter_mut().zip(d_up.iter_mut()).zip(gate).zip(up).zip(grad) {
        let s = sigmoid::<FMA>(g);
        *du = dy * (g * s);
        *dg = dy * u * (s * (1.0 + g * (1.0 - s)));
    }
}
