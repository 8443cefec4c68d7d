//! PEFT's on-disk adapter: `adapter_config.json` + `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` (`[r, in]`) and `...lora_B.weight` (`[out, r]`).

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::config::LoraConfig;
use crate::error::{LoraError, Result};

/// One module's adapter matrices in PEFT's layout, row-major f32.
#[derive(Clone, Debug, PartialEq)]
pub struct PeftMatrices {
    /// `[r, in]`
    pub a: Vec<f32>,
    /// `[out, r]`
    pub b: Vec<f32>,
    pub r: usize,
    pub in_features: usize,
    pub out_features: usize,
}

/// A PEFT adapter folder in memory: its config and matrices by HF module name.
#[derive(Clone, Debug)]
pub struct PeftAdapter {
    pub config: LoraConfig,
    pub modules: BTreeMap<String, PeftMatrices>,
}

const PREFIX: &str = "base_model.model.";

impl PeftAdapter {
    /// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors`.
    pub fn load(dir: &Path) -> Result<Self> {
        let config = LoraConfig::from_peft_file(&dir.join("adapter_config.json"))?;
        let path = dir.join("adapter_model.safetensors");
        let bytes = std::fs::read(&path).map_err(|e| LoraError::io(&path, e))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| LoraError::File(path.clone(), format!("not a valid safetensors file: {e}")))?;
        let mut a_mats: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
        let mut b_mats: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
        for (key, view) in st.tensors() {
            let unexpected = || LoraError::File(path.clone(), format!("unexpected tensor {key:?} (expected {PREFIX}<module>.lora_A.weight / lora_B.weight)"));
            let rest = key.strip_prefix(PREFIX).ok_or_else(unexpected)?;
            let (module, which) = if let Some(m) = rest.strip_suffix(".lora_A.weight").or_else(|| rest.strip_suffix(".lora_A.default.weight")) {
                (m, 'A')
            } else if let Some(m) = rest.strip_suffix(".lora_B.weight").or_else(|| rest.strip_suffix(".lora_B.default.weight")) {
                (m, 'B')
            } else {
                return Err(unexpected());
            };
            let values = decode_f32(view.data(), view.dtype())
                .ok_or_else(|| LoraError::File(path.clone(), format!("tensor {key:?} has dtype {:?}", view.dtype())))?;
            if view.shape().len() != 2 {
                return Err(LoraError::File(path.clone(), format!("tensor {key:?} has shape {:?}, expected 2-D", view.shape())));
            }
            let target = if which == 'A' { &mut a_mats } else { &mut b_mats };
            target.insert(module.to_string(), (view.shape().to_vec(), values));
        }
        let mut modules = BTreeMap::new();
        for (module, (a_shape, a)) in a_mats {
            let (b_shape, b) = b_mats
                .remove(&module)
                .ok_or_else(|| LoraError::File(path.clone(), format!("{module}: lora_A without lora_B")))?;
            let (r, in_features, out_features) = (a_shape[0], a_shape[1], b_shape[0]);
            if b_shape[1] != r {
                return Err(LoraError::File(
                    path.clone(),
                    format!("{module}: lora_A is {a_shape:?} but lora_B is {b_shape:?} (ranks differ)"),
                ));
            }
            if r != config.r {
                return Err(LoraError::File(path.clone(), format!("{module}: rank {r}, adapter_config.json says r = {}", config.r)));
            }
            modules.insert(module, PeftMatrices { a, b, r, in_features, out_features });
        }
        if let Some(module) = b_mats.keys().next() {
            return Err(LoraError::File(path, format!("{module}: lora_B without lora_A")));
        }
        Ok(Self { config, modules })
    }

    /// Writes the PEFT folder (created if needed) atomically file by file.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| LoraError::io(dir, e))?;
        let mut bytes: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (module, m) in &self.modules {
            let le = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
            bytes.push((format!("{PREFIX}{module}.lora_A.weight"), vec![m.r, m.in_features], le(&m.a)));
            bytes.push((format!("{PREFIX}{module}.lora_B.weight"), vec![m.out_features, m.r], le(&m.b)));
        }
        let views: Vec<(String, TensorView)> = bytes
            .iter()
            .map(|(k, s, b)| (k.clone(), TensorView::new(Dtype::F32, s.clone(), b).expect("sizes match")))
            .collect();
        let metadata = Some([("format".to_string(), "pt".to_string())].into_iter().collect());
        let data = safetensors::serialize(views, metadata)
            .map_err(|e| LoraError::File(dir.to_path_buf(), format!("cannot serialise adapter: {e}")))?;
        write_atomic(&dir.join("adapter_model.safetensors"), &data)?;
        let config = serde_json::to_string_pretty(&self.config.to_peft_json()).expect("json");
        write_atomic(&dir.join("adapter_config.json"), config.as_bytes())
    }
}

/// Writes `path` through a temporary file and a rename, so a crash never leaves half a file.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).map_err(|e| LoraError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| LoraError::io(path, e))
}

/// Little-endian safetensors data of `dtype` (F32, BF16, F16 or F64) as f32 values.
pub fn decode_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F64 => bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect(),
        _ => return None,
    })
}
