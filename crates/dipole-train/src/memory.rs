//! A check before the first forward pass that the batch holding the longest row can fit in memory
//! at all, so a `max_length` far beyond what the machine holds is an error naming the setting, not
//! an allocation that aborts the process minutes later.

use burn::tensor::backend::Backend;
use dipole_models::ModelConfig;

use crate::error::{TrainError, TrainResult};

/// Bytes that attention over a batch of `pairs` pairs padded to `len` tokens holds at the least, in
/// f32: in each pair, whichever part runs as its own queries (the whole rows, or a shared prompt and
/// then the completions against it) has at least `len / 2` queries, each scoring at least `len / 2`
/// keys in every head, and a batch's pairs run together.
pub fn attention_floor_bytes(config: &ModelConfig, pairs: usize, len: usize) -> u128 {
    let half = len.div_ceil(2) as u128;
    pairs as u128 * config.num_attention_heads as u128 * half * half * 4
}

/// Memory the system can still give (Linux `MemAvailable`); `None` where it cannot be read.
pub fn available_bytes() -> Option<u128> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// [`check_batch_fits`] for `pairs` scored `batch_size` at a time in order, unsharded (`cargo xtask
/// logps`, `eval`, `score`): the batch holding the longest row pads every pair to it.
pub fn check_pairs_fit<B: Backend>(device: &B::Device, config: &ModelConfig, pairs: &[dipole_data::PairInputs], batch_size: usize, setting: &str) -> TrainResult<()> {
    let longest = pairs.iter().map(|p| p.chosen.input_ids.len().max(p.rejected.input_ids.len())).max().unwrap_or(0);
    check_batch_fits::<B>(device, config, batch_size.min(pairs.len()), longest, setting)
}

/// An error naming `setting` when a batch of `pairs` pairs padded to `len` tokens cannot fit on a
/// CPU backend: the floor of [`attention_floor_bytes`] alone exceeds the memory available. GPU
/// memory is not checked here.
pub fn check_batch_fits<B: Backend>(device: &B::Device, config: &ModelConfig, pairs: usize, len: usize, setting: &str) -> TrainResult<()> {
    if !dipole_models::is_cpu_backend::<B>(device) {
        return Ok(());
    }
    let (Some(available), need) = (available_bytes(), attention_floor_bytes(config, pairs, len)) else { return Ok(()) };
    if need > available {
        let gib = |b: u128| b as f64 / (1u128 << 30) as f64;
        return Err(TrainError::Run(format!(
            "{setting}: the longest row has {len} tokens; attention over a batch of {pairs} pairs that long needs at least {:.1} GiB ({} heads), more than the {:.1} GiB this machine has available: lower {setting} or the batch size",
            gib(need),
            config.num_attention_heads,
            gib(available)
        )));
    }
    Ok(())
}
