//! `config.json` as Hugging Face writes it, for the Llama family (Llama, Mistral, Qwen2).
//!
//! Both rope spellings are read: the classic `rope_theta` + `rope_scaling` keys and transformers 5's
//! `rope_parameters`. The original JSON is kept so an exported checkpoint carries it unchanged.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{ModelError, Result};

/// The architectures dipole implements; all are pre-norm decoders with RoPE, SwiGLU and GQA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
        }
    }
}

/// How rotary frequencies are derived from `rope_theta`.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor` (position interpolation).
    Linear { factor: f64 },
    /// NTK-aware base stretching once the sequence exceeds `original_max_position_embeddings`.
    Dynamic {
        factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Llama 3.1's band-wise frequency scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// A resolved model configuration: every default applied, every architecture quirk made explicit.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v (Qwen2 always; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama with `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Per layer: the attention window, when the layer uses sliding-window attention.
    pub sliding_window: Vec<Option<usize>>,
    pub initializer_range: f64,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The JSON the config was read from (written back unchanged on export).
    pub raw: Value,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    hidden_act: Option<String>,
    initializer_range: Option<f64>,
    bos_token_id: Option<TokenIds>,
    eos_token_id: Option<TokenIds>,
    pad_token_id: Option<TokenIds>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    fn into_vec(self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![id],
            TokenIds::Many(ids) => ids,
        }
    }
}

impl ModelConfig {
    /// Reads `<dir>/config.json`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_json_str(&text, &path)
    }

    /// Parses a `config.json` text; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let raw: Value = serde_json::from_str(text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg: RawConfig = serde_json::from_value(raw.clone()).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |message: String| ModelError::Config {
            path: path.to_path_buf(),
            message,
        };

        let model_type = cfg.model_type.clone().ok_or_else(|| {
            bad("missing \"model_type\" (expected \"llama\", \"mistral\" or \"qwen2\")".into())
        })?;
        let architecture = match model_type.as_str() {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            _ => {
                return Err(ModelError::UnknownModelType {
                    path: path.to_path_buf(),
                    found: model_type,
                });
            }
        };
        if let Some(act) = &cfg.hidden_act
            && act != "silu" && act != "swish" {
                return Err(bad(format!("hidden_act {act:?} is not supported (expected \"silu\")")));
            }
        let heads = cfg.num_attention_heads;
        let kv_heads = cfg.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(bad(format!(
                "num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads ({kv_heads})"
            )));
        }
        let head_dim = match cfg.head_dim {
            Some(d) => d,
            None if cfg.hidden_size.is_multiple_of(heads) => cfg.hidden_size / heads,
            None => {
                return Err(bad(format!(
                    "hidden_size ({}) is not divisible by num_attention_heads ({heads}) and no head_dim is given",
                    cfg.hidden_size
                )));
            }
        };
        if head_dim % 2 != 0 {
            return Err(bad(format!("head_dim ({head_dim}) must be even for rotary embeddings")));
        }
        let max_position_embeddings = cfg.max_position_embeddings.unwrap_or(2048);
        let rope = parse_rope(&cfg, max_position_embeddings).map_err(bad)?;

        let layers = cfg.num_hidden_layers;
        let sliding_window = match architecture {
            Architecture::Llama => vec![None; layers],
            Architecture::Mistral => vec![cfg.sliding_window; layers],
            Architecture::Qwen2 => {
                if let Some(types) = &cfg.layer_types {
                    if types.len() != layers {
                        return Err(bad(format!(
                            "layer_types has {} entries, num_hidden_layers is {layers}",
                            types.len()
                        )));
                    }
                    types
                        .iter()
                        .map(|t| match t.as_str() {
                            "sliding_attention" => Ok(cfg.sliding_window),
                            "full_attention" => Ok(None),
                            other => Err(bad(format!(
                                "layer_types entry {other:?} (expected \"full_attention\" or \"sliding_attention\")"
                            ))),
                        })
                        .collect::<Result<Vec<_>>>()?
                } else if cfg.use_sliding_window.unwrap_or(false) {
                    let from = cfg.max_window_layers.unwrap_or(layers);
                    (0..layers).map(|i| if i >= from { cfg.sliding_window } else { None }).collect()
                } else {
                    vec![None; layers]
                }
            }
        };
        let attention_bias = cfg.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias, mlp_bias) = match architecture {
            Architecture::Llama => (attention_bias, attention_bias, cfg.mlp_bias.unwrap_or(false)),
            Architecture::Mistral => (false, false, false),
            Architecture::Qwen2 => (true, false, false),
        };

        Ok(ModelConfig {
            architecture,
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: cfg.rms_norm_eps.unwrap_or(1e-6),
            rope,
            max_position_embeddings,
            tie_word_embeddings: cfg.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            sliding_window,
            initializer_range: cfg.initializer_range.unwrap_or(0.02),
            bos_token_id: cfg.bos_token_id.and_then(|t| t.into_vec().first().copied()),
            eos_token_ids: cfg.eos_token_id.map(TokenIds::into_vec).unwrap_or_default(),
            pad_token_id: cfg.pad_token_id.and_then(|t| t.into_vec().first().copied()),
            raw,
        })
    }

    /// Number of parameters (embedding and head included, counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let attn = h * q + 2 * h * kv + q * h
            + if self.qkv_bias { q + 2 * kv } else { 0 }
            + if self.o_bias { h } else { 0 };
        let mlp = 3 * h * i + if self.mlp_bias { 2 * i + h } else { 0 };
        let layer = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers * layer + h + head
    }

    /// A small Llama config built in code (benchmarks, the demo model, tests).
    #[allow(clippy::too_many_arguments)]
    pub fn llama(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
        max_position_embeddings: usize,
    ) -> Self {
        let raw = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads,
            "num_key_value_heads": num_key_value_heads,
            "head_dim": hidden_size / num_attention_heads,
            "max_position_embeddings": max_position_embeddings,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": false,
            "attention_bias": false,
            "mlp_bias": false,
            "initializer_range": 0.02,
            "torch_dtype": "float32",
        });
        Self::from_json_str(&raw.to_string(), &PathBuf::from("<built-in llama config>"))
            .expect("built-in config is valid")
    }
}

fn parse_rope(cfg: &RawConfig, max_position_embeddings: usize) -> Result<RopeConfig, String> {
    // transformers 5 writes `rope_parameters` (theta included); older configs `rope_theta` + `rope_scaling`.
    let params = cfg.rope_parameters.as_ref().filter(|v| !v.is_null());
    let scaling = cfg.rope_scaling.as_ref().filter(|v| !v.is_null());
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64)
        .or(cfg.rope_theta)
        .unwrap_or(10000.0);
    let Some(spec) = params.or(scaling) else {
        return Ok(RopeConfig {
            theta,
            scaling: RopeScaling::Default,
        });
    };
    let kind = spec
        .get("rope_type")
        .or_else(|| spec.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64, String> {
        spec.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("rope type {kind:?} needs a numeric {key:?}"))
    };
    let original = spec
        .get("original_max_position_embeddings")
        .and_then(Value::as_u64)
        .map(|v| v as usize);
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "dynamic" => RopeScaling::Dynamic {
            factor: num("factor")?,
            original_max_position_embeddings: original.unwrap_or(max_position_embeddings),
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: original.ok_or_else(|| {
                "rope type \"llama3\" needs \"original_max_position_embeddings\"".to_string()
            })?,
        },
        other => {
            return Err(format!(
                "rope type {other:?} is not supported (expected default, linear, dynamic or llama3)"
            ));
        }
    };
    Ok(RopeConfig { theta, scaling })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(json, Path::new("config.json"))
    }

    const BASE: &str = r#""vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2"#;

    #[test]
    fn unknown_model_type_is_named() {
        let err = parse(&format!(r#"{{"model_type": "gpt2", {BASE}}}"#)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("\"gpt2\"") && msg.contains("config.json"), "{msg}");
    }

    #[test]
    fn classic_rope_scaling_keys_are_read() {
        let cfg = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "rope_theta": 500000.0,
                "rope_scaling": {{"type": "linear", "factor": 4.0}}}}"#
        ))
        .unwrap();
        assert_eq!(cfg.rope.theta, 500000.0);
        assert_eq!(cfg.rope.scaling, RopeScaling::Linear { factor: 4.0 });
        assert_eq!(cfg.head_dim, 4);
    }

    #[test]
    fn qwen2_sliding_window_follows_max_window_layers() {
        let cfg = parse(&format!(
            r#"{{"model_type": "qwen2", {BASE}, "use_sliding_window": true, "sliding_window": 8,
                "max_window_layers": 1}}"#
        ))
        .unwrap();
        assert_eq!(cfg.sliding_window, vec![None, Some(8)]);
        assert!(cfg.qkv_bias);
    }

    #[test]
    fn llama3_rope_without_original_length_is_an_error() {
        let err = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "rope_parameters": {{"rope_type": "llama3",
                "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}}}}"#
        ))
        .unwrap_err();
        assert!(err.to_string().contains("original_max_position_embeddings"), "{err}");
    }

    #[test]
    fn bad_head_counts_are_rejected() {
        let err = parse(
            r#"{"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 3}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("num_key_value_heads"), "{err}");
    }
}
