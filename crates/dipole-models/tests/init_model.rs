//! Random-initialised checkpoints written tensor by tensor (`write_random_init`, `HfWriter`): the
//! folder loads back as the model `CausalLm::init` makes with the same seed, sharded with its index,
//! in f32 exactly and in bf16 to bf16's rounding; a writer used out of its plan is an error.

mod common;

use burn::backend::Flex;
use dipole_models::{CausalLm, ExportDtype, HfWriter, ModelConfig, TensorSpec, write_random_init};
use dipole_models::load::{ParamKind, WeightSource};

/// Every weight as HF names it, in the order loading asks for them.
struct Recorder(Vec<(String, Vec<usize>)>);

impl WeightSource for Recorder {
    fn tensor(&mut self, name: &str, shape: &[usize], _kind: ParamKind) -> dipole_models::Result<Vec<f32>> {
        self.0.push((name.to_string(), shape.to_vec()));
        Ok(vec![0.0; shape.iter().product()])
    }
}

fn weights(model: &CausalLm<Flex>) -> Vec<(String, Vec<f32>)> {
    model.hf_tensors().into_iter().map(|(name, _, values)| (name, values)).collect()
}

#[test]
fn hf_tensors_lists_what_loading_asks_for_in_its_order() {
    for name in ["tiny-llama", "tiny-qwen2", "tiny-mistral"] {
        let config = ModelConfig::from_dir(common::fixture(name)).unwrap();
        let mut recorder = Recorder(Vec::new());
        CausalLm::<Flex>::from_source(config.clone(), &mut recorder, &Default::default()).unwrap();
        let listed: Vec<(String, Vec<usize>)> = config.hf_tensors().into_iter().map(|(spec, _)| (spec.name, spec.shape)).collect();
        assert_eq!(listed, recorder.0, "{name}");
    }
}

#[test]
fn a_random_init_folder_loads_as_the_seeded_model() {
    let device = Default::default();
    for name in ["tiny-llama", "tiny-qwen2"] {
        let config = ModelConfig::from_dir(common::fixture(name)).unwrap();
        let want = weights(&CausalLm::<Flex>::init(config.clone(), 5, &device));
        let dir = tempfile::tempdir().unwrap();
        // small shards: several files and an index
        write_random_init(&config, 5, ExportDtype::F32, 200_000, dir.path()).unwrap();
        let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("model.safetensors.index.json")).unwrap()).unwrap();
        let files: std::collections::BTreeSet<&str> = index["weight_map"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
        assert!(files.len() > 1, "{name}: {files:?}");
        assert_eq!(index["weight_map"].as_object().unwrap().len(), config.hf_tensors().len());
        let (loaded, _) = CausalLm::<Flex>::load(dir.path(), &device).unwrap();
        assert_eq!(weights(&loaded), want, "{name}: f32 folder = CausalLm::init");

        let dir = tempfile::tempdir().unwrap();
        write_random_init(&config, 5, ExportDtype::BF16, usize::MAX, dir.path()).unwrap();
        assert!(dir.path().join("model.safetensors").exists() && !dir.path().join("model.safetensors.index.json").exists());
        let written: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(written["torch_dtype"], "bfloat16");
        let (loaded, _) = CausalLm::<Flex>::load(dir.path(), &device).unwrap();
        for ((tensor, got), (_, want)) in weights(&loaded).iter().zip(&want) {
            let worst = got.iter().zip(want).map(|(g, w)| ((g - w) / w.abs().max(1e-30)).abs()).fold(0f32, f32::max);
            assert!(worst <= 1.0 / 256.0, "{name} {tensor}: bf16 rounding off by {worst}");
        }
    }
}

#[test]
fn writing_out_of_plan_is_an_error_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let specs = vec![TensorSpec { name: "a".into(), shape: vec![2, 3] }, TensorSpec { name: "b".into(), shape: vec![4] }];
    let mut writer = HfWriter::create(dir.path(), specs.clone(), ExportDtype::F32, 1 << 20).unwrap();
    let err = writer.write("b", &[0.0; 4]).unwrap_err().to_string();
    assert!(err.contains("expected tensor a of shape [2, 3] next, got b"), "{err}");
    let err = writer.write("a", &[0.0; 5]).unwrap_err().to_string();
    assert!(err.contains("got a with 5 values"), "{err}");
    writer.write("a", &[0.0; 6]).unwrap();
    let err = writer.finish().unwrap_err().to_string();
    assert!(err.contains("1 of 2 tensors written; b is next"), "{err}");
    // written whole, the file is a valid safetensors file
    let mut writer = HfWriter::create(dir.path(), specs, ExportDtype::BF16, 1 << 20).unwrap();
    writer.write("a", &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    writer.write("b", &[0.5; 4]).unwrap();
    assert!(writer.write("c", &[0.0]).unwrap_err().to_string().contains("beyond the 2 planned"));
    writer.finish().unwrap();
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let a = st.tensor("a").unwrap();
    assert_eq!((a.dtype(), a.shape()), (safetensors::Dtype::BF16, &[2usize, 3][..]));
    assert_eq!(half::bf16::from_le_bytes([a.data()[10], a.data()[11]]).to_f32(), 6.0);
}
