//! Writing a Hugging Face weight folder one tensor at a time: safetensors shards (each header
//! written first from the planned shapes, then the tensors' bytes in order) and
//! `model.safetensors.index.json`, so that no more than one tensor is ever in memory; and a
//! random-initialised checkpoint of a config written that way ([`write_random_init`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::export::ExportDtype;
use crate::load::{ParamKind, RandomInit, WeightSource};

/// One tensor of the folder: its HF name and shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A folder being written: the planned shards, the open one and how far it is.
pub struct HfWriter {
    dir: PathBuf,
    dtype: ExportDtype,
    shards: Vec<(String, Vec<TensorSpec>)>,
    /// Index of the next tensor over all shards, in plan order.
    next: usize,
    open: Option<(usize, BufWriter<File>)>,
}

/// An I/O error of `path`, for `map_err`.
pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + use<> {
    let path = path.to_path_buf();
    move |source| ModelError::Io { path, source }
}

impl HfWriter {
    /// Plans shards of at most `max_shard_bytes` (a tensor larger than that gets a shard of its
    /// own) for `tensors` in this order, which is the order [`write`](Self::write) takes them in.
    pub fn create(dir: &Path, tensors: Vec<TensorSpec>, dtype: ExportDtype, max_shard_bytes: usize) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut groups: Vec<Vec<TensorSpec>> = vec![Vec::new()];
        let mut size = 0;
        for spec in tensors {
            let bytes = spec.numel() * dtype.bytes();
            if size > 0 && size + bytes > max_shard_bytes {
                groups.push(Vec::new());
                size = 0;
            }
            size += bytes;
            groups.last_mut().expect("one shard").push(spec);
        }
        let n = groups.len();
        let shards = groups
            .into_iter()
            .enumerate()
            .map(|(k, specs)| (if n == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{n:05}.safetensors", k + 1) }, specs))
            .collect();
        Ok(HfWriter { dir: dir.to_path_buf(), dtype, shards, next: 0, open: None })
    }

    /// Where the next tensor goes: `(shard, position in it)`.
    fn position(&self) -> Option<(usize, usize)> {
        let mut index = self.next;
        for (k, (_, specs)) in self.shards.iter().enumerate() {
            if index < specs.len() {
                return Some((k, index));
            }
            index -= specs.len();
        }
        None
    }

    /// Writes the plan's next tensor, `values` in its HF layout (row-major `shape`).
    pub fn write(&mut self, name: &str, values: &[f32]) -> Result<()> {
        let Some((k, i)) = self.position() else {
            return Err(ModelError::Write { dir: self.dir.clone(), message: format!("tensor {name} is beyond the {} planned ones", self.next) });
        };
        let spec = &self.shards[k].1[i];
        if spec.name != name || spec.numel() != values.len() {
            return Err(ModelError::Write {
                dir: self.dir.clone(),
                message: format!("expected tensor {} of shape {:?} next, got {name} with {} values", spec.name, spec.shape, values.len()),
            });
        }
        let path = self.dir.join(&self.shards[k].0);
        if self.open.as_ref().is_none_or(|(open, _)| *open != k) {
            self.close_shard()?;
            let mut file = BufWriter::with_capacity(1 << 22, File::create(&path).map_err(io(&path))?);
            file.write_all(&self.header(k)).map_err(io(&path))?;
            self.open = Some((k, file));
        }
        let (_, file) = self.open.as_mut().expect("a shard is open");
        file.write_all(&self.dtype.encode(values)).map_err(io(&path))?;
        self.next += 1;
        Ok(())
    }

    /// Shard `k`'s safetensors header: its length (u64, little-endian), then the JSON of every
    /// tensor's dtype, shape and byte range, padded with spaces to a multiple of 8 bytes.
    fn header(&self, k: usize) -> Vec<u8> {
        let mut entries = serde_json::Map::new();
        entries.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut offset = 0;
        for spec in &self.shards[k].1 {
            let end = offset + spec.numel() * self.dtype.bytes();
            entries.insert(spec.name.clone(), serde_json::json!({"dtype": self.dtype.safetensors_name(), "shape": spec.shape, "data_offsets": [offset, end]}));
            offset = end;
        }
        let mut json = serde_json::to_vec(&entries).expect("json");
        json.resize(json.len().div_ceil(8) * 8, b' ');
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend(json);
        out
    }

    fn close_shard(&mut self) -> Result<()> {
        if let Some((k, mut file)) = self.open.take() {
            let path = self.dir.join(&self.shards[k].0);
            file.flush().map_err(io(&path))?;
            file.into_inner().map_err(|e| ModelError::Io { path: path.clone(), source: e.into_error() })?.sync_all().map_err(io(&path))?;
        }
        Ok(())
    }

    /// Closes the last shard and, for more than one, writes `model.safetensors.index.json`; an
    /// error if a planned tensor was never written.
    pub fn finish(mut self) -> Result<()> {
        let planned: usize = self.shards.iter().map(|(_, specs)| specs.len()).sum();
        if self.next != planned {
            let missing = self.position().map(|(k, i)| self.shards[k].1[i].name.clone()).unwrap_or_default();
            return Err(ModelError::Write { dir: self.dir.clone(), message: format!("{} of {planned} tensors written; {missing} is next", self.next) });
        }
        self.close_shard()?;
        if self.shards.len() > 1 {
            let mut weight_map = BTreeMap::new();
            let mut total = 0;
            for (file, specs) in &self.shards {
                for spec in specs {
                    total += spec.numel() * self.dtype.bytes();
                    weight_map.insert(spec.name.clone(), file.clone());
                }
            }
            let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            let path = self.dir.join("model.safetensors.index.json");
            std::fs::write(&path, serde_json::to_string_pretty(&index).expect("json")).map_err(io(&path))?;
        }
        Ok(())
    }
}

impl ModelConfig {
    /// Every weight of a model of this config: HF name, HF shape (`[out, in]` for projections) and
    /// kind, in the order [`CausalLm::from_source`](crate::CausalLm::from_source) asks for them.
    pub fn hf_tensors(&self) -> Vec<(TensorSpec, ParamKind)> {
        let (h, v) = (self.hidden_size, self.vocab_size);
        let q_dim = self.num_attention_heads * self.head_dim;
        let kv_dim = self.num_key_value_heads * self.head_dim;
        let spec = |name: String, shape: Vec<usize>, kind| (TensorSpec { name, shape }, kind);
        let mut out = vec![spec("model.embed_tokens.weight".into(), vec![v, h], ParamKind::Matrix)];
        let linear = |out: &mut Vec<_>, name: String, in_dim: usize, out_dim: usize, bias: bool| {
            out.push(spec(format!("{name}.weight"), vec![out_dim, in_dim], ParamKind::Matrix));
            if bias {
                out.push(spec(format!("{name}.bias"), vec![out_dim], ParamKind::Bias));
            }
        };
        for i in 0..self.num_hidden_layers {
            let p = format!("model.layers.{i}");
            linear(&mut out, format!("{p}.self_attn.q_proj"), h, q_dim, self.qkv_bias);
            linear(&mut out, format!("{p}.self_attn.k_proj"), h, kv_dim, self.qkv_bias);
            linear(&mut out, format!("{p}.self_attn.v_proj"), h, kv_dim, self.qkv_bias);
            linear(&mut out, format!("{p}.self_attn.o_proj"), q_dim, h, self.o_bias);
            linear(&mut out, format!("{p}.mlp.gate_proj"), h, self.intermediate_size, self.mlp_bias);
            linear(&mut out, format!("{p}.mlp.up_proj"), h, self.intermediate_size, self.mlp_bias);
            linear(&mut out, format!("{p}.mlp.down_proj"), self.intermediate_size, h, self.mlp_bias);
            out.push(spec(format!("{p}.input_layernorm.weight"), vec![h], ParamKind::Norm));
            out.push(spec(format!("{p}.post_attention_layernorm.weight"), vec![h], ParamKind::Norm));
        }
        out.push(spec("model.norm.weight".into(), vec![h], ParamKind::Norm));
        if !self.tie_word_embeddings {
            linear(&mut out, "lm_head".into(), h, v, false);
        }
        out
    }
}

/// Writes `config.json` and the weights of a model of `config`, random-initialised as
/// [`CausalLm::init`](crate::CausalLm::init) does with `seed` (so loading the folder gives that model, up to
/// `dtype`'s rounding), tensor by tensor in shards of at most `max_shard_bytes`.
pub fn write_random_init(config: &ModelConfig, seed: u64, dtype: ExportDtype, max_shard_bytes: usize, dir: &Path) -> Result<()> {
    let tensors = config.hf_tensors();
    let mut writer = HfWriter::create(dir, tensors.iter().map(|(spec, _)| spec.clone()).collect(), dtype, max_shard_bytes)?;
    let mut source = RandomInit::new(seed, config.initializer_range);
    for (spec, kind) in &tensors {
        let values = source.tensor(&spec.name, &spec.shape, *kind)?;
        writer.write(&spec.name, &values)?;
    }
    writer.finish()?;
    crate::export::write_config(config, dtype, dir)
}
