//! The graph GPU backends run, checked against TRL on the CPU: the fused CPU kernels off (this test
//! binary only, so every test in it runs the tensor-op forms of attention, SwiGLU and log-probs),
//! then the log-prob parity and the 3-step training goldens of `parity.rs` and `train.rs`.

mod common;

use common::{FIXTURES, check_parity, trl_three_steps};

fn tensor_ops() {
    dipole_kernels::set_fused(false);
    assert!(!dipole_kernels::fused_enabled());
}

#[test]
fn log_probs_match_trl_with_tensor_ops() {
    tensor_ops();
    for (model, format) in FIXTURES {
        check_parity(model, format, 4);
    }
}

common::per_fixture!(|model, format| {
    tensor_ops();
    trl_three_steps(model, format, 0)
});

/// The same three steps split into 3 shards on 3 threads and into 1 shard on 1 thread: other
/// summation orders must stay within the goldens' tolerances too.
#[test]
fn other_shard_and_thread_counts_match_trl_with_tensor_ops() {
    tensor_ops();
    for (threads, shards) in [(3, 3), (1, 1)] {
        let pool = rayon_core::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| trl_three_steps("tiny-qwen2", "standard", shards));
    }
}
