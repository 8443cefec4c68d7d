//! The process-wide switch: with the kernels off every entry point hands its inputs back, so the
//! caller runs the tensor-op form (the graph GPU backends run). Its own test binary, with one test:
//! the switch and the environment are global to the process.

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};

#[test]
fn the_switch_and_the_variable_turn_the_kernels_off_and_on() {
    let device = Default::default();
    let x = || Tensor::<Flex, 4>::from_data(TensorData::new(vec![0.5f32; 2 * 3 * 4 * 6], [2, 3, 4, 6]), &device);
    assert!(dipole_kernels::attention::try_merge_heads(x()).is_ok(), "kernels are on by default");
    dipole_kernels::set_fused(false);
    assert!(!dipole_kernels::fused_enabled());
    assert!(dipole_kernels::attention::try_merge_heads(x()).is_err());
    let gate = Tensor::<Flex, 2>::from_data(TensorData::new(vec![1.0f32; 8], [2, 4]), &device);
    assert!(dipole_kernels::swiglu::try_silu_mul(gate.clone(), gate.clone()).is_err());
    let head_off = head_with_gradients();
    dipole_kernels::set_fused(true);
    assert!(dipole_kernels::swiglu::try_silu_mul(gate.clone(), gate).is_ok());
    // the fused head has no tensor-op twin to hand back to: with the kernels off its tiles run as
    // tensor ops (what GPU backends run), to the same values and gradients
    let head_on = head_with_gradients();
    for (name, off, on) in [("log-probs", &head_off[0], &head_on[0]), ("hidden gradient", &head_off[1], &head_on[1]), ("weight gradient", &head_off[2], &head_on[2])] {
        assert_eq!(off.len(), on.len(), "{name}");
        for (i, (a, b)) in off.iter().zip(on).enumerate() {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{name}[{i}]: tensor ops {a}, kernel {b}");
        }
    }

    // SAFETY: the only test of this binary; nothing else runs while the variable changes
    unsafe { std::env::set_var(dipole_kernels::FUSED_KERNELS_VAR, "off") };
    assert_eq!(dipole_kernels::fused_from_env(), Ok(Some(false)));
    unsafe { std::env::set_var(dipole_kernels::FUSED_KERNELS_VAR, "TRUE") };
    assert_eq!(dipole_kernels::fused_from_env(), Ok(Some(true)));
    unsafe { std::env::set_var(dipole_kernels::FUSED_KERNELS_VAR, "2") };
    assert_eq!(dipole_kernels::fused_from_env(), Err(dipole_kernels::FusedVarError::Value("2".into())));
    assert_eq!(dipole_kernels::fused_from_env().unwrap_err().to_string(), "DIPOLE_FUSED_KERNELS=\"2\": expected 1/on/true or 0/off/false");
    unsafe { std::env::remove_var(dipole_kernels::FUSED_KERNELS_VAR) };
    assert_eq!(dipole_kernels::fused_from_env(), Ok(None));
}

/// The fused head's log-probs and the gradients of their sum, over several tiles.
fn head_with_gradients() -> [Vec<f32>; 3] {
    use burn::backend::Autodiff;
    use burn::tensor::Int;
    use dipole_kernels::head::{HeadOptions, head_logps};
    type AD = Autodiff<Flex>;
    let [n, h, vocab] = [5, 8, 90];
    let values = |len: usize, seed: f32| (0..len).map(|i| ((i as f32 + 1.0) * 0.618 + seed).sin() * 2.0).collect::<Vec<f32>>();
    let device = Default::default();
    let hidden = Tensor::<AD, 2>::from_data(TensorData::new(values(n * h, 0.1), [n, h]), &device).require_grad();
    let weight = Tensor::<AD, 2>::from_data(TensorData::new(values(h * vocab, 0.7), [h, vocab]), &device).require_grad();
    let labels = Tensor::<AD, 1, Int>::from_data(TensorData::new(vec![3i64, 89, 0, 45, 46], [n]), &device);
    let options = HeadOptions { tile_elements: 60, vocab_chunk: 30, ..HeadOptions::default() };
    let logps = head_logps(hidden.clone(), weight.clone(), labels, options).logps;
    let grads = logps.clone().sum().backward();
    let host = |t: Tensor<burn::backend::Flex, 2>| t.into_data().to_vec::<f32>().unwrap();
    [logps.into_data().to_vec::<f32>().unwrap(), host(hidden.grad(&grads).unwrap()), host(weight.grad(&grads).unwrap())]
}
