//! Writing a model back as a Hugging Face folder that transformers loads unchanged: `config.json`,
//! safetensors shards with `model.safetensors.index.json`, and the tokenizer files of the source.

use std::path::Path;

use burn::tensor::{DType, Tensor, backend::Backend};
use dipole_lora::{LoraError, PeftMatrices, cast_to};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::hf_writer::{HfWriter, TensorSpec, io};
use crate::llama::CausalLm;
use crate::load::{ParamKind, leftovers, transpose};
use crate::weights::Checkpoint;

/// Storage type of exported weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ExportDtype {
    #[default]
    F32,
    BF16,
    F16,
}

impl ExportDtype {
    /// transformers' name of the dtype (`config.json`'s `torch_dtype`).
    pub fn hf_name(self) -> &'static str {
        match self {
            ExportDtype::F32 => "float32",
            ExportDtype::BF16 => "bfloat16",
            ExportDtype::F16 => "float16",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32" | "float32" | "fp32" => Some(Self::F32),
            "bf16" | "bfloat16" => Some(Self::BF16),
            "f16" | "float16" | "fp16" => Some(Self::F16),
            _ => None,
        }
    }

    /// Bytes per value.
    pub fn bytes(self) -> usize {
        match self {
            ExportDtype::F32 => 4,
            ExportDtype::BF16 | ExportDtype::F16 => 2,
        }
    }

    /// The safetensors header's name of the dtype.
    pub(crate) fn safetensors_name(self) -> &'static str {
        match self {
            ExportDtype::F32 => "F32",
            ExportDtype::BF16 => "BF16",
            ExportDtype::F16 => "F16",
        }
    }

    pub(crate) fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            ExportDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ExportDtype::BF16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
            ExportDtype::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        }
    }
}

/// Tokenizer and generation files copied from the source folder when present.
const SIDE_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "tokenizer.model",
];

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().expect("f32 values")
}

impl<B: Backend> CausalLm<B> {
    /// Every weight under its HF name and shape (`[out, in]` for projections), adapters merged in.
    pub fn hf_tensors(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut out = Vec::new();
        let [v, h] = self.embed_tokens.dims();
        out.push(("model.embed_tokens.weight".into(), vec![v, h], values(self.embed_tokens.val())));
        for (name, linear) in self.linears() {
            // in f32: a frozen base may be held in bf16 (`MatrixDtype::Stored`), the adapter in f32
            let mut w = cast_to(linear.weight.val(), DType::F32);
            if let (Some(adapter), false) = (&linear.adapter, linear.merged) {
                w = w + cast_to(adapter.delta(), DType::F32);
            }
            let [i, o] = w.dims();
            out.push((format!("{name}.weight"), vec![o, i], transpose(&values(w), i, o)));
            if let Some(b) = &linear.bias {
                out.push((format!("{name}.bias"), vec![o], values(b.val())));
            }
        }
        for (i, layer) in self.layers.iter().enumerate() {
            for (norm, p) in [("input_layernorm", &layer.input_layernorm), ("post_attention_layernorm", &layer.post_attention_layernorm)] {
                out.push((format!("model.layers.{i}.{norm}.weight"), vec![h], values(p.weight.val())));
            }
        }
        out.push(("model.norm.weight".into(), vec![h], values(self.norm.weight.val())));
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Writes an HF model folder to `dir`: adapters merged, `dtype` storage, shards of at most
    /// `max_shard_bytes`, tokenizer files copied from `source_dir` when given.
    pub fn save_hf(&self, dir: &Path, dtype: ExportDtype, max_shard_bytes: usize, source_dir: Option<&Path>) -> Result<()> {
        let tensors = self.hf_tensors();
        let specs = tensors.iter().map(|(name, shape, _)| TensorSpec { name: name.clone(), shape: shape.clone() }).collect();
        let mut writer = HfWriter::create(dir, specs, dtype, max_shard_bytes)?;
        for (name, _, values) in &tensors {
            writer.write(name, values)?;
        }
        writer.finish()?;
        write_config(&self.config, dtype, dir)?;
        match source_dir {
            Some(src) => copy_side_files(src, dir),
            None => Ok(()),
        }
    }
}

/// The tokenizer and generation files of `src` ([`SIDE_FILES`]) that exist, copied into `dir`.
fn copy_side_files(src: &Path, dir: &Path) -> Result<()> {
    for name in SIDE_FILES {
        let from = src.join(name);
        if from.exists() {
            std::fs::copy(&from, dir.join(name)).map_err(io(&from))?;
        }
    }
    Ok(())
}

/// `config.json` of `config` as read, its dtype keys set to `dtype`.
pub(crate) fn write_config(config: &ModelConfig, dtype: ExportDtype, dir: &Path) -> Result<()> {
    let mut raw = config.raw.clone();
    if let Some(obj) = raw.as_object_mut() {
        obj.insert("torch_dtype".into(), dtype.hf_name().into());
        obj.insert("dtype".into(), dtype.hf_name().into());
    }
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&raw).expect("json")).map_err(|source| ModelError::Io { path, source })
}

/// Merges the PEFT adapter in `adapter` (if any) into the checkpoint in `base` and writes the merged
/// Hugging Face folder to `out`, one tensor at a time: each is read (its file pages released), the
/// adapter's `scale * B A` added in f32, and written to the shard being filled, so memory stays at
/// one tensor whatever the model's size. `dtype` `None` writes the base's stored dtype. Tokenizer
/// files are copied. Returns the dtype written.
pub fn merge_checkpoint(base: &Path, adapter: Option<&Path>, out: &Path, dtype: Option<ExportDtype>, max_shard_bytes: usize) -> Result<ExportDtype> {
    let config = ModelConfig::from_dir(base)?;
    let mut checkpoint = Checkpoint::open(base)?;
    let tensors = config.hf_tensors();
    let peft = adapter.map(crate::adapters::load_finite).transpose()?;
    if let Some(peft) = &peft {
        for (module, m) in &peft.modules {
            let name = format!("{module}.weight");
            match tensors.iter().find(|(spec, kind)| spec.name == name && *kind == ParamKind::Matrix) {
                Some((spec, _)) if spec.shape == [m.out_features, m.in_features] => {}
                Some((spec, _)) => {
                    return Err(LoraError::Mismatch(format!("{module}: adapter is {}x{} (out x in), the layer is {}x{}", m.out_features, m.in_features, spec.shape[0], spec.shape[1])).into());
                }
                None => return Err(LoraError::Mismatch(format!("the adapter has {module:?}, which this model does not")).into()),
            }
        }
    }
    let dtype = dtype.unwrap_or(match checkpoint.dtype("model.embed_tokens.weight") {
        Some(DType::BF16) => ExportDtype::BF16,
        Some(DType::F16) => ExportDtype::F16,
        _ => ExportDtype::F32,
    });
    let mut writer = HfWriter::create(out, tensors.iter().map(|(spec, _)| spec.clone()).collect(), dtype, max_shard_bytes)?;
    for (spec, _) in &tensors {
        let mut values = checkpoint.take(&spec.name, &spec.shape)?;
        let module = spec.name.strip_suffix(".weight");
        if let (Some(peft), Some(module)) = (&peft, module)
            && let Some(m) = peft.modules.get(module)
        {
            add_delta(&mut values, m, peft.config.scale() as f32);
        }
        writer.write(&spec.name, &values)?;
    }
    leftovers(&checkpoint, &config, base)?;
    writer.finish()?;
    write_config(&config, dtype, out)?;
    copy_side_files(base, out)?;
    Ok(dtype)
}

/// `w += scale * B A` for PEFT's `A` `[r, in]` and `B` `[out, r]`, `w` `[out, in]` row-major.
fn add_delta(w: &mut [f32], m: &PeftMatrices, scale: f32) {
    let (r, n) = (m.r, m.in_features);
    for (o, row) in w.chunks_mut(n).enumerate() {
        for k in 0..r {
            let b = scale * m.b[o * r + k];
            if b != 0.0 {
                row.iter_mut().zip(&m.a[k * n..(k + 1) * n]).for_each(|(x, a)| *x += b * a);
            }
        }
    }
}
