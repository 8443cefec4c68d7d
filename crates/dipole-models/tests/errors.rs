//! A broken checkpoint is an error that names what is wrong.

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use dipole_models::{CausalLm, ModelError};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

fn tiny_llama() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-llama")
}

/// A copy of tiny-llama whose tensors went through `edit` (name, shape, little-endian f32 bytes).
fn edited_copy(edit: impl Fn(&mut Vec<(String, Vec<usize>, Vec<u8>)>)) -> tempfile::TempDir {
    let src = tiny_llama();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec())).collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    dir
}

fn load_err(dir: &Path) -> ModelError {
    match CausalLm::<Flex>::load(dir, &Default::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn wrong_shape_names_the_tensor_and_both_shapes() {
    let dir = edited_copy(|t| {
        let q = t.iter_mut().find(|x| x.0 == "model.layers.1.self_attn.q_proj.weight").unwrap();
        q.1 = vec![32, 128]; // same byte count, wrong shape
    });
    let msg = load_err(dir.path()).to_string();
    assert!(msg.contains("model.layers.1.self_attn.q_proj.weight"), "{msg}");
    assert!(msg.contains("[32, 128]") && msg.contains("[64, 64]"), "{msg}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = edited_copy(|t| t.retain(|x| x.0 != "model.layers.0.mlp.down_proj.weight"));
    let err = load_err(dir.path());
    assert!(matches!(err, ModelError::MissingTensor { .. }), "{err:?}");
    assert!(err.to_string().contains("model.layers.0.mlp.down_proj.weight"), "{err}");
}

#[test]
fn unexpected_tensor_is_named() {
    let dir = edited_copy(|t| t.push(("model.layers.0.self_attn.rogue.weight".into(), vec![2], vec![0; 8])));
    let msg = load_err(dir.path()).to_string();
    assert!(msg.contains("model.layers.0.self_attn.rogue.weight"), "{msg}");
}

#[test]
fn truncated_file_is_named() {
    let dir = edited_copy(|_| {});
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(dir.path());
    assert!(matches!(err, ModelError::Safetensors { .. }), "{err:?}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn unknown_model_type_is_named() {
    let dir = edited_copy(|_| {});
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    std::fs::write(dir.path().join("config.json"), cfg.replace("\"model_type\": \"llama\"", "\"model_type\": \"falcon\"")).unwrap();
    let err = load_err(dir.path());
    assert!(matches!(err, ModelError::UnknownModelType { .. }), "{err:?}");
    assert!(err.to_string().contains("falcon"), "{err}");
}

#[test]
fn no_weights_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(tiny_llama().join("config.json"), dir.path().join("config.json")).unwrap();
    assert!(matches!(load_err(dir.path()), ModelError::NoWeights { .. }));
}
