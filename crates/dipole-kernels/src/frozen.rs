//! The product of activations with a frozen weight kept in another dtype than they compute in (a
//! bf16 base under f32 compute): `y = x W`, `dx = dy Wᵀ`, the weight cast to `x`'s dtype inside
//! each pass and dropped after it. The plain form (`x.matmul(W.cast(..))`) would keep the cast f32
//! copy on the tape for the backward pass (burn-autodiff's matmul saves its inputs), one f32 copy
//! of every frozen weight, which is the memory the stored dtype saves; this custom autodiff op keeps
//! the weight's own handle instead. Written over the backend's tensor ops, for every autodiff
//! backend `on_autodiff!` names (`Flex`, and `Cuda` / `Wgpu` with the crate's features).

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::{Tensor, TensorPrimitive, backend::Backend};

use crate::cast_to;

/// `x @ weight` for `x` `[rows, in]` and a frozen `weight` `[in, out]` of any float dtype, computed
/// in `x`'s dtype; gradients for `x` only. Elsewhere than under autodiff (nothing is kept then) and
/// on other backends it is the plain product with the weight cast.
pub fn frozen_matmul<B: Backend>(x: Tensor<B, 2>, weight: Tensor<B, 2>) -> Tensor<B, 2> {
    assert_eq!(x.dims()[1], weight.dims()[0], "activations {:?} for a weight {:?}", x.dims(), weight.dims());
    match try_autodiff((x, weight)) {
        Ok(y) => y,
        Err((x, weight)) => {
            let dtype = x.dtype();
            x.matmul(cast_to(weight, dtype))
        }
    }
}

fn try_autodiff<B: Backend>(args: (Tensor<B, 2>, Tensor<B, 2>)) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>)> {
    let args = crate::on_autodiff!(args, (I, C, A) => (Tensor<A, 2>, Tensor<A, 2>), |(x, w)| autodiff::<I, C>(x, w));
    Err(args)
}

fn autodiff<I: Backend, C: CheckpointStrategy>(x: Tensor<Autodiff<I, C>, 2>, weight: Tensor<Autodiff<I, C>, 2>) -> Tensor<Autodiff<I, C>, 2> {
    let product = |x: Tensor<I, 2>, w: &Tensor<I, 2>| {
        let dtype = x.dtype();
        x.matmul(cast_to(w.clone(), dtype))
    };
    let input_grad = |dy: Tensor<I, 2>, w: &Tensor<I, 2>| {
        let dtype = dy.dtype();
        dy.matmul(cast_to(w.clone(), dtype).transpose())
    };
    frozen_linear(x, weight.inner(), product, input_grad)
}

/// The custom autodiff op of a product with a frozen weight held as `state`: `y = product(x,
/// state)`; the backward pass gives `x` the gradient `input_grad(dy, state)` and the weight none.
/// The state (the weight as stored, in whatever form) is what the op keeps for the backward pass.
pub(crate) fn frozen_linear<I: Backend, C: CheckpointStrategy, S: Clone + Send + std::fmt::Debug + 'static>(
    x: Tensor<Autodiff<I, C>, 2>,
    state: S,
    product: fn(Tensor<I, 2>, &S) -> Tensor<I, 2>,
    input_grad: fn(Tensor<I, 2>, &S) -> Tensor<I, 2>,
) -> Tensor<Autodiff<I, C>, 2> {
    let x = x.into_primitive().tensor();
    let x_inner = Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(x.primitive.clone()));
    let y = product(x_inner, &state).into_primitive().tensor();
    let y = match (FrozenLinearBackward { input_grad }).prepare::<C>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(state, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(y))
}

struct FrozenLinearBackward<I: Backend, S> {
    input_grad: fn(Tensor<I, 2>, &S) -> Tensor<I, 2>,
}

impl<I: Backend, S> std::fmt::Debug for FrozenLinearBackward<I, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrozenLinearBackward")
    }
}

impl<I: Backend, S: Clone + Send + std::fmt::Debug + 'static> Backward<I, 1> for FrozenLinearBackward<I, S> {
    type State = S;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(grads.consume::<I>(&ops.node)));
        let [parent] = ops.parents;
        if let Some(node) = parent {
            let dx = (self.input_grad)(grad, &ops.state);
            grads.register::<I>(node.id, dx.into_primitive().tensor());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{DType, Distribution, TensorCreationOptions};

    type AD = Autodiff<Flex>;

    /// Against the plain product with an f32 copy of the bf16 weight: the same output and input
    /// gradient, the weight given none (it is frozen).
    #[test]
    fn output_and_input_gradient_equal_the_f32_copys() {
        let device = Default::default();
        AD::seed(&device, 1);
        let weight = Tensor::<AD, 2>::random([24, 40], Distribution::Normal(0.0, 0.2), &device);
        let stored = Tensor::<AD, 2>::from_data(weight.to_data().convert_dtype(DType::BF16), TensorCreationOptions::new(device).with_dtype(DType::BF16));
        let copy = stored.clone().cast(DType::F32);
        let x = Tensor::<AD, 2>::random([7, 24], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let upstream = Tensor::<AD, 2>::random([7, 40], Distribution::Normal(0.0, 1.0), &device);
        let y = frozen_matmul(x.clone(), stored);
        let grads = (y.clone() * upstream.clone()).sum().backward();
        let dx = x.grad(&grads).unwrap();
        let x_plain = x.clone().detach().require_grad();
        let want = x_plain.clone().matmul(copy);
        let want_grads = (want.clone() * upstream).sum().backward();
        let want_dx = x_plain.grad(&want_grads).unwrap();
        y.into_data().assert_approx_eq::<f32>(&want.into_data(), burn::tensor::Tolerance::absolute(1e-6));
        dx.into_data().assert_approx_eq::<f32>(&want_dx.into_data(), burn::tensor::Tolerance::absolute(1e-6));
    }
}
