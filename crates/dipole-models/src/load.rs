//! Building a [`CausalLm`] from a Hugging Face folder (weights addressed by their HF names) or from a
//! seeded random initialisation.

use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::{DType, Tensor, TensorCreationOptions, TensorData, backend::Backend};
pub use dipole_lora::transpose;
use dipole_lora::LoraLinear;

use crate::precision::MixedPrecision;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::llama::{Attention, CausalLm, DecoderLayer, Mlp, RmsNorm};
use crate::rng::SeededRng;
use crate::weights::Checkpoint;

/// What kind of parameter a tensor is; random initialisation depends on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    Matrix,
    Norm,
    Bias,
}

/// Where parameter values come from. Shapes are HF's (`[out, in]` for projections).
pub trait WeightSource {
    fn tensor(&mut self, name: &str, shape: &[usize], kind: ParamKind) -> Result<Vec<f32>>;

    /// The dtype `name` is stored in, where the source has one (a checkpoint); `None` reads as f32.
    fn stored_dtype(&self, _name: &str) -> Option<DType> {
        None
    }
}

impl WeightSource for Checkpoint {
    fn tensor(&mut self, name: &str, shape: &[usize], _kind: ParamKind) -> Result<Vec<f32>> {
        self.take(name, shape)
    }

    fn stored_dtype(&self, name: &str) -> Option<DType> {
        self.dtype(name)
    }
}

/// The dtype a model holds its weight matrices in (embeddings, projections, LM head); norms and
/// biases are always f32. Parameters that train need f32 (their master copy); frozen ones (a LoRA
/// base, a frozen reference) can stay as stored and take half the memory in bf16. Every product
/// computes in the activations' dtype (f32, or the mixed-precision dtype): a weight in another
/// dtype is cast inside the op, so the values are the stored ones either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MatrixDtype {
    /// f32 whatever is stored.
    #[default]
    F32,
    /// As stored: BF16 and F16 stay so, F32 and F64 give f32.
    Stored,
    /// Converted to this dtype.
    Cast(DType),
}

impl MatrixDtype {
    fn resolve(self, source: &dyn WeightSource, name: &str) -> DType {
        match self {
            MatrixDtype::F32 => DType::F32,
            MatrixDtype::Stored => match source.stored_dtype(name) {
                Some(d @ (DType::BF16 | DType::F16)) => d,
                _ => DType::F32,
            },
            MatrixDtype::Cast(d) => d,
        }
    }
}

/// Seeded random weights as transformers initialises them: N(0, initializer_range) matrices, unit
/// norms, zero biases. Generated on the host so every backend gets identical weights for a seed.
pub struct RandomInit {
    rng: SeededRng,
    std: f32,
}

impl RandomInit {
    pub fn new(seed: u64, std: f64) -> Self {
        Self {
            rng: SeededRng::new(seed),
            std: std as f32,
        }
    }
}

impl WeightSource for RandomInit {
    fn tensor(&mut self, _name: &str, shape: &[usize], kind: ParamKind) -> Result<Vec<f32>> {
        let n: usize = shape.iter().product();
        Ok(match kind {
            ParamKind::Matrix => (0..n).map(|_| self.rng.normal() * self.std).collect(),
            ParamKind::Norm => vec![1.0; n],
            ParamKind::Bias => vec![0.0; n],
        })
    }
}

/// What loading found besides the model: tensors in the file that the model does not use.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Known-harmless leftovers (a tied `lm_head.weight`, rotary `inv_freq` buffers).
    pub ignored: Vec<String>,
}

impl<B: Backend> CausalLm<B> {
    /// Loads `config.json` and the safetensors weights of a Hugging Face model folder, in f32.
    pub fn load(dir: impl AsRef<Path>, device: &B::Device) -> Result<(Self, LoadReport)> {
        Self::load_with(dir, MatrixDtype::F32, device)
    }

    /// [`load`](Self::load) with the weight matrices in `matrices` (see [`MatrixDtype`]), read
    /// tensor by tensor (each one's file pages released once it is decoded).
    pub fn load_with(dir: impl AsRef<Path>, matrices: MatrixDtype, device: &B::Device) -> Result<(Self, LoadReport)> {
        let dir = dir.as_ref();
        let config = ModelConfig::from_dir(dir)?;
        let mut checkpoint = Checkpoint::open(dir)?;
        let model = Self::from_source_with(config, &mut checkpoint, matrices, device)?;
        let ignored = leftovers(&checkpoint, &model.config, dir)?;
        Ok((model, LoadReport { ignored }))
    }

    /// A randomly initialised model (benchmarks, from-scratch training).
    pub fn init(config: ModelConfig, seed: u64, device: &B::Device) -> Self {
        let std = config.initializer_range;
        Self::from_source(config, &mut RandomInit::new(seed, std), device)
            .expect("random initialisation cannot fail")
    }

    /// Builds the model in f32, asking `source` for each tensor by its HF name.
    pub fn from_source(config: ModelConfig, source: &mut dyn WeightSource, device: &B::Device) -> Result<Self> {
        Self::from_source_with(config, source, MatrixDtype::F32, device)
    }

    /// [`from_source`](Self::from_source) with the weight matrices in `matrices`.
    pub fn from_source_with(config: ModelConfig, source: &mut dyn WeightSource, matrices: MatrixDtype, device: &B::Device) -> Result<Self> {
        let c = &config;
        let (h, v) = (c.hidden_size, c.vocab_size);
        let q_dim = c.num_attention_heads * c.head_dim;
        let kv_dim = c.num_key_value_heads * c.head_dim;

        let embed_dtype = matrices.resolve(source, "model.embed_tokens.weight");
        let embed = source.tensor("model.embed_tokens.weight", &[v, h], ParamKind::Matrix)?;
        let embed_tokens = Param::from_tensor(tensor2::<B>("model.embed_tokens.weight", embed, [v, h], embed_dtype, device)?);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut proj = |name: &str, in_dim: usize, out_dim: usize, bias: bool| -> Result<LoraLinear<B>> {
                load_linear(source, &format!("{p}.{name}"), [in_dim, out_dim], bias, matrices, device)
            };
            let self_attn = Attention {
                q_proj: proj("self_attn.q_proj", h, q_dim, c.qkv_bias)?,
                k_proj: proj("self_attn.k_proj", h, kv_dim, c.qkv_bias)?,
                v_proj: proj("self_attn.v_proj", h, kv_dim, c.qkv_bias)?,
                o_proj: proj("self_attn.o_proj", q_dim, h, c.o_bias)?,
                num_heads: c.num_attention_heads,
                num_kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
            };
            let mlp = Mlp {
                gate_proj: proj("mlp.gate_proj", h, c.intermediate_size, c.mlp_bias)?,
                up_proj: proj("mlp.up_proj", h, c.intermediate_size, c.mlp_bias)?,
                down_proj: proj("mlp.down_proj", c.intermediate_size, h, c.mlp_bias)?,
            };
            layers.push(DecoderLayer {
                self_attn,
                mlp,
                input_layernorm: load_norm(source, &format!("{p}.input_layernorm.weight"), c, device)?,
                post_attention_layernorm: load_norm(
                    source,
                    &format!("{p}.post_attention_layernorm.weight"),
                    c,
                    device,
                )?,
                sliding_window: c.sliding_window[i],
            });
        }
        let norm = load_norm(source, "model.norm.weight", c, device)?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(load_linear(source, "lm_head", [h, v], false, matrices, device)?)
        };
        Ok(CausalLm {
            embed_tokens,
            layers,
            norm,
            lm_head,
            config,
            mixed_precision: MixedPrecision::No,
            prefix_sharing: true,
            padding_free: true,
            attention_recompute: true,
            layer_recompute: false,
            fused_head: true,
        })
    }
}

/// The tensors of `checkpoint` a model of `config` did not take: the known-harmless ones (a tied
/// `lm_head.weight`, rotary `inv_freq` buffers), or an error naming the others.
pub(crate) fn leftovers(checkpoint: &Checkpoint, config: &ModelConfig, dir: &Path) -> Result<Vec<String>> {
    let (ignored, unexpected): (Vec<String>, Vec<String>) = checkpoint
        .untaken()
        .into_iter()
        .partition(|name| name == "lm_head.weight" || name.ends_with("rotary_emb.inv_freq"));
    if !unexpected.is_empty() {
        return Err(ModelError::Unexpected { dir: PathBuf::from(dir), architecture: config.architecture.model_type().to_string(), names: unexpected });
    }
    Ok(ignored)
}

/// Tensor `name` `[rows, cols]` of `values` held in `dtype`; an error where a value is beyond f16's
/// range (it would become infinite).
fn tensor2<B: Backend>(name: &str, values: Vec<f32>, shape: [usize; 2], dtype: DType, device: &B::Device) -> Result<Tensor<B, 2>> {
    if dtype == DType::F16
        && let Some(index) = values.iter().position(|v| v.abs() > f32::from(half::f16::MAX))
    {
        return Err(ModelError::Config {
            path: PathBuf::from(name),
            message: format!("element {index} ({}) is beyond f16's range; hold the weights in bf16 or f32 (model.dtype)", values[index]),
        });
    }
    let data = TensorData::new(values, shape);
    let data = if dtype == DType::F32 { data } else { data.convert_dtype(dtype) };
    Ok(Tensor::from_data(data, TensorCreationOptions::new(device.clone()).with_dtype(dtype)))
}

/// Loads `<name>.weight` (HF `[out, in]`, stored transposed as `[in, out]`) and `<name>.bias`.
fn load_linear<B: Backend>(
    source: &mut dyn WeightSource,
    name: &str,
    [in_dim, out_dim]: [usize; 2],
    bias: bool,
    matrices: MatrixDtype,
    device: &B::Device,
) -> Result<LoraLinear<B>> {
    let weight_name = format!("{name}.weight");
    let dtype = matrices.resolve(source, &weight_name);
    let w = source.tensor(&weight_name, &[out_dim, in_dim], ParamKind::Matrix)?;
    let weight = tensor2::<B>(&weight_name, transpose(&w, out_dim, in_dim), [in_dim, out_dim], dtype, device)?;
    let bias = if bias {
        let b = source.tensor(&format!("{name}.bias"), &[out_dim], ParamKind::Bias)?;
        Some(Tensor::from_data(TensorData::new(b, [out_dim]), device))
    } else {
        None
    };
    Ok(LoraLinear::new(weight, bias))
}

fn load_norm<B: Backend>(
    source: &mut dyn WeightSource,
    name: &str,
    c: &ModelConfig,
    device: &B::Device,
) -> Result<RmsNorm<B>> {
    let w = source.tensor(name, &[c.hidden_size], ParamKind::Norm)?;
    Ok(RmsNorm {
        weight: Param::from_tensor(Tensor::from_data(TensorData::new(w, [c.hidden_size]), device)),
        eps: c.rms_norm_eps,
    })
}
