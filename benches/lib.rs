//! Shared set-up of dipole's criterion benchmarks: the benchmark model shape of `cargo xtask bench`.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use dipole_models::rng::SeededRng;
use dipole_models::{CausalLm, LlamaShape, ModelConfig};

/// The benchmark shape ([`LlamaShape::BENCHMARK`]).
pub fn bench_config() -> ModelConfig {
    ModelConfig::llama(LlamaShape::BENCHMARK).expect("the benchmark shape is a valid Llama")
}

pub fn bench_model<B: Backend>(device: &B::Device) -> CausalLm<B> {
    CausalLm::init(bench_config(), 0, device)
}

/// `rows` random sequences of `len` ids.
pub fn random_ids<B: Backend>(rows: usize, len: usize, device: &B::Device) -> Tensor<B, 2, Int> {
    let mut rng = SeededRng::new(7);
    let ids: Vec<i64> = (0..rows * len).map(|_| 3 + (rng.next_u64() % 7997) as i64).collect();
    Tensor::from_data(TensorData::new(ids, [rows, len]), device)
}
