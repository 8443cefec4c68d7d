//! Fixtures shared by this crate's integration tests.

use std::path::{Path, PathBuf};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name)
}

/// The tiny Mistral fixture with its sliding window set to `window`, in a temporary folder.
#[allow(dead_code)] // not every test binary uses it
pub fn mistral_with_window(window: usize) -> tempfile::TempDir {
    let src = fixture("tiny-mistral");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    assert!(cfg.contains("\"sliding_window\": 4096"), "the fixture's window is 4096");
    std::fs::write(dir.path().join("config.json"), cfg.replace("\"sliding_window\": 4096", &format!("\"sliding_window\": {window}"))).unwrap();
    dir
}

/// Largest difference over real positions (`lens[r]` of row `r`) of two `[rows, T, hidden]` tensors.
#[allow(dead_code)] // not every test binary uses it
pub fn real_positions_diff<B: burn::tensor::backend::Backend>(a: burn::tensor::Tensor<B, 3>, b: burn::tensor::Tensor<B, 3>, lens: &[usize]) -> f32 {
    let [rows, t, h] = a.dims();
    let (a, b): (Vec<f32>, Vec<f32>) = (a.into_data().to_vec().unwrap(), b.into_data().to_vec().unwrap());
    (0..rows)
        .flat_map(|r| (0..lens[r]).flat_map(move |i| (0..h).map(move |j| (r * t + i) * h + j)))
        .map(|k| (a[k] - b[k]).abs())
        .fold(0.0, f32::max)
}

#[allow(dead_code)] // not every test binary uses it
pub type AD = burn::backend::Autodiff<burn::backend::Flex>;

/// The gradients, for the embeddings and layer 0's q, k and down projections, of a fixed weighting
/// of the real positions' hidden states `[rows, T, hidden]` (padding weighted 0) as the loss.
#[allow(dead_code)] // not every test binary uses it
pub fn hidden_gradients(model: &dipole_models::CausalLm<AD>, hidden: burn::tensor::Tensor<AD, 3>, lens: &[usize]) -> [Vec<f32>; 4] {
    let [rows, t, h] = hidden.dims();
    let weights: Vec<f32> = (0..rows * t * h)
        .map(|k| if k / h % t < lens[k / h / t] { ((k * 37 % 101) as f32 - 50.0) / 50.0 } else { 0.0 })
        .collect();
    let weights = burn::tensor::Tensor::<AD, 3>::from_data(burn::tensor::TensorData::new(weights, [rows, t, h]), &hidden.device());
    let g = (hidden * weights).sum().backward();
    let layer = &model.layers[0];
    [model.embed_tokens.val(), layer.self_attn.q_proj.weight.val(), layer.self_attn.k_proj.weight.val(), layer.mlp.down_proj.weight.val()]
        .map(|p| p.grad(&g).expect("a gradient").into_data().to_vec::<f32>().unwrap())
}

/// Two [`hidden_gradients`] within 1e-4 of each parameter's largest gradient.
#[allow(dead_code)] // not every test binary uses it
pub fn assert_same_gradients(got: &[Vec<f32>; 4], want: &[Vec<f32>; 4]) {
    for (name, (a, b)) in ["embed_tokens", "q_proj", "k_proj", "down_proj"].iter().zip(got.iter().zip(want)) {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(scale > 0.0 && diff < 1e-4 * scale, "{name}: gradients differ by {diff} (scale {scale})");
    }
}
