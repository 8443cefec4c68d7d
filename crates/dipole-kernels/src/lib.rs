//! Fused kernels for burn's CPU backend (`Flex`, with or without autodiff): the elementwise chains
//! of a decoder step that burn runs as several tensor ops, each a pass over memory that allocates its
//! output (and libm's scalar `expf` per element), run here as one pass forward and one backward with
//! a vectorized `exp`, each a custom autodiff op that keeps fewer tensors for the backward pass.
//! Attention's masked softmax and head layout (with RoPE), SwiGLU's `silu(gate) * up`, and the
//! log-probs of labels under a vocabulary of logits.
//!
//! Every entry point is a `try_*` function generic over the backend: on `Flex`, `Autodiff<Flex>` and
//! `Autodiff<Flex, BalancedCheckpointing>` with f32 tensors it runs the kernel, otherwise it hands its
//! inputs back (`Err`) for the caller's tensor-op form (which GPU backends fuse themselves). The
//! crates that own the maths (dipole-models, dipole-loss) keep that form and test the kernels
//! against it. Inference and training run the same kernel, so a frozen reference equal to the policy
//! gives bit-identical log-probs.

use std::any::Any;
use std::sync::atomic::{AtomicU8, Ordering};

use burn::backend::flex::FlexTensor;
use burn::tensor::TensorData;

#[macro_use]
mod simd;
pub mod adamw;
pub mod attention;
pub mod frozen;
pub mod head;
pub mod logps;
pub mod quant;
pub mod recompute;
pub mod swiglu;

/// The environment variable that turns the fused kernels off (`0`, `off`, `false`) or on (`1`,
/// `on`, `true`) for a whole process: with them off the CPU backend runs the tensor-op forms, which
/// is the graph GPU backends run, so that graph can be checked on a machine without a GPU.
pub const FUSED_KERNELS_VAR: &str = "DIPOLE_FUSED_KERNELS";

const UNSET: u8 = 0;
const ON: u8 = 1;
const OFF: u8 = 2;
static FUSED: AtomicU8 = AtomicU8::new(UNSET);

/// What [`FUSED_KERNELS_VAR`] asks for: `None` when it is unset, an error naming the variable and
/// the values it takes when it holds anything else.
pub fn fused_from_env() -> Result<Option<bool>, FusedVarError> {
    match std::env::var(FUSED_KERNELS_VAR) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Ok(v) if ["1", "on", "true"].contains(&v.to_ascii_lowercase().as_str()) => Ok(Some(true)),
        Ok(v) if ["0", "off", "false"].contains(&v.to_ascii_lowercase().as_str()) => Ok(Some(false)),
        Ok(v) => Err(FusedVarError::Value(v)),
        Err(std::env::VarError::NotUnicode(_)) => Err(FusedVarError::NotUnicode),
    }
}

/// A [`FUSED_KERNELS_VAR`] that holds neither an on nor an off value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FusedVarError {
    #[error("DIPOLE_FUSED_KERNELS={0:?}: expected 1/on/true or 0/off/false")]
    Value(String),
    #[error("DIPOLE_FUSED_KERNELS: not valid unicode")]
    NotUnicode,
}

/// Turns the fused kernels on or off for the whole process (every thread, every model).
pub fn set_fused(enabled: bool) {
    FUSED.store(if enabled { ON } else { OFF }, Ordering::Relaxed);
}

/// Whether the `try_*` entry points run their kernels: what [`set_fused`] last said, else
/// [`FUSED_KERNELS_VAR`], else on. A malformed variable leaves them on; programs that want it
/// to be an error check [`fused_from_env`] first (`cargo xtask` does).
pub fn fused_enabled() -> bool {
    match FUSED.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => {
            let enabled = fused_from_env().ok().flatten().unwrap_or(true);
            // a racing `set_fused` wins over the environment
            let _ = FUSED.compare_exchange(UNSET, if enabled { ON } else { OFF }, Ordering::Relaxed, Ordering::Relaxed);
            FUSED.load(Ordering::Relaxed) == ON
        }
    }
}

/// `t` in `dtype`; no cast (and no autodiff node) when it already is.
pub fn cast_to<B: burn::tensor::backend::Backend, const D: usize>(t: burn::tensor::Tensor<B, D>, dtype: burn::tensor::DType) -> burn::tensor::Tensor<B, D> {
    if t.dtype() == dtype { t } else { t.cast(dtype) }
}

/// `value` as a `U` if it is one (the kernels' backends are concrete types, callers' generic).
fn cast<T: 'static, U: 'static>(value: T) -> Result<U, T> {
    let boxed: Box<dyn Any> = Box::new(value);
    match boxed.downcast::<U>() {
        Ok(u) => Ok(*u),
        Err(boxed) => Err(*boxed.downcast::<T>().expect("the value's own type")),
    }
}

/// A kernel's result back as the caller's type (which [`cast`] found it to be).
fn back<T: 'static, U: 'static>(value: T) -> U {
    cast(value).unwrap_or_else(|_| unreachable!("the kernel returns the type it was given"))
}

/// Returns `Ok` from the enclosing `try_*` function with `$flex` if `$args` are `$ty` with `$X` =
/// `Flex`, with `$autodiff` if they are with `$X` = `Autodiff<Flex>` under either checkpointing
/// strategy; evaluates to `Err($args)` otherwise, and always when the kernels are off
/// ([`fused_enabled`]).
macro_rules! on_cpu {
    ($args:expr, $X:ident => $ty:ty, flex: |$f:pat_param| $flex:expr, autodiff: |$a:pat_param| $autodiff:expr $(,)?) => {{
        use burn::backend::{Autodiff, Flex, autodiff::checkpoint::strategy::BalancedCheckpointing};
        let args = $args;
        if !$crate::fused_enabled() {
            return Err(args);
        }
        let args = {
            type $X = Flex;
            match $crate::cast::<_, $ty>(args) {
                Ok($f) => return Ok($crate::back($flex)),
                Err(args) => args,
            }
        };
        let args = {
            type $X = Autodiff<Flex>;
            match $crate::cast::<_, $ty>(args) {
                Ok($a) => return Ok($crate::back($autodiff)),
                Err(args) => args,
            }
        };
        let args = {
            type $X = Autodiff<Flex, BalancedCheckpointing>;
            match $crate::cast::<_, $ty>(args) {
                Ok($a) => return Ok($crate::back($autodiff)),
                Err(args) => args,
            }
        };
        Err(args)
    }};
}
pub(crate) use on_cpu;

/// Returns `Ok($run)` (cast back to the caller's type) from the enclosing function if `$args` are
/// `$ty` with `$A = Autodiff<$I, $C>` for `$I` = `Flex` (and, with this crate's `cuda` / `wgpu`
/// features, `Cuda` / `Wgpu`) and `$C` either checkpointing strategy; evaluates to `$args`
/// otherwise. For the ops written over a backend's own tensor ops, which every backend can run.
macro_rules! on_autodiff {
    ($args:expr, ($I:ident, $C:ident, $A:ident) => $ty:ty, |$a:pat_param| $run:expr $(,)?) => {{
        let args = $args;
        let args = $crate::on_autodiff!(@backend args, burn::backend::Flex, ($I, $C, $A) => $ty, |$a| $run);
        #[cfg(feature = "cuda")]
        let args = $crate::on_autodiff!(@backend args, burn::backend::Cuda, ($I, $C, $A) => $ty, |$a| $run);
        #[cfg(feature = "wgpu")]
        let args = $crate::on_autodiff!(@backend args, burn::backend::Wgpu, ($I, $C, $A) => $ty, |$a| $run);
        args
    }};
    (@backend $args:ident, $inner:ty, ($I:ident, $C:ident, $A:ident) => $ty:ty, |$a:pat_param| $run:expr) => {{
        let args = $crate::on_autodiff!(@one $args, $inner, NoCheckpointing, ($I, $C, $A) => $ty, |$a| $run);
        $crate::on_autodiff!(@one args, $inner, BalancedCheckpointing, ($I, $C, $A) => $ty, |$a| $run)
    }};
    (@one $args:ident, $inner:ty, $strategy:ident, ($I:ident, $C:ident, $A:ident) => $ty:ty, |$a:pat_param| $run:expr) => {{
        type $I = $inner;
        type $C = burn::backend::autodiff::checkpoint::strategy::$strategy;
        type $A = burn::backend::Autodiff<$I, $C>;
        match $crate::cast::<_, $ty>($args) {
            Ok($a) => return Ok($crate::back($run)),
            Err(args) => args,
        }
    }};
}
pub(crate) use on_autodiff;

// Flex tensors in and out of the kernels: contiguous slices in, a new tensor out, work split over
// the current rayon pool.

pub(crate) fn dims(t: &FlexTensor) -> Vec<usize> {
    t.layout().shape().as_slice().to_vec()
}

pub(crate) fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.is_contiguous() { t } else { t.to_contiguous() }
}

pub(crate) fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a contiguous f32 tensor")
}

pub(crate) fn tensor(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// Elements per parallel task: enough that a task's work outweighs handing it to a thread.
pub(crate) const TASK_ELEMENTS: usize = 1 << 15;

/// Runs `f` on each of `parts` (chunks of the outputs), in parallel on the current rayon pool.
pub(crate) fn in_parallel<T: Send>(parts: impl Iterator<Item = T>, f: impl Fn(T) + Sync) {
    if rayon_core::current_num_threads() == 1 {
        parts.for_each(f);
        return;
    }
    let (f, parts): (_, Vec<T>) = (&f, parts.collect());
    rayon_core::scope(|scope| {
        for part in parts {
            scope.spawn(move |_| f(part));
        }
    });
}

/// Rows per parallel task for rows `len` long.
pub(crate) fn rows_per_task(len: usize) -> usize {
    (TASK_ELEMENTS / len.max(1)).max(1)
}

/// Runs `f(r, row)` for every row `r` of `out` (rows `len` long), the rows split into tasks on the
/// current rayon pool; nothing for an empty output.
pub(crate) fn for_each_row(out: &mut [f32], len: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if out.is_empty() || len == 0 {
        return;
    }
    let per_task = rows_per_task(len);
    in_parallel(out.chunks_mut(per_task * len).enumerate(), |(task, chunk)| {
        for (i, row) in chunk.chunks_mut(len).enumerate() {
            f(task * per_task + i, row);
        }
    });
}
