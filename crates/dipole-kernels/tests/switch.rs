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
    dipole_kernels::set_fused(true);
    assert!(dipole_kernels::swiglu::try_silu_mul(gate.clone(), gate).is_ok());

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
