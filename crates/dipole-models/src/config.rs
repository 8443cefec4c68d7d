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

/// The sizes of a Llama built in code ([`ModelConfig::llama`]), named as in `config.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LlamaShape {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
}

impl LlamaShape {
    /// The shape of `cargo xtask bench` and the criterion benches: hidden 384, 6 layers, 6 heads
    /// (6 KV), intermediate 1024, vocabulary 8000 (16.8 M parameters).
    pub const BENCHMARK: Self = Self {
        vocab_size: 8000,
        hidden_size: 384,
        intermediate_size: 1024,
        num_hidden_layers: 6,
        num_attention_heads: 6,
        num_key_value_heads: 6,
        max_position_embeddings: 2048,
    };
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
        let bad = |message: String| ModelError::Config {
            path: path.to_path_buf(),
            message,
        };
        check_types(&raw).map_err(bad)?;
        // Cannot fail on a config check_types passed; kept as an error rather than a panic.
        let cfg: RawConfig = serde_json::from_value(raw.clone()).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let architecture = architecture(&cfg, path)?;
        let (heads, kv_heads, head_dim) = attention_shape(&cfg).map_err(bad)?;
        check_scalars(&cfg).map_err(bad)?;
        let max_position_embeddings = cfg.max_position_embeddings.unwrap_or(2048);
        let rope = parse_rope(&cfg, max_position_embeddings).map_err(bad)?;
        let sliding_window = sliding_windows(&cfg, architecture).map_err(bad)?;
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
            num_hidden_layers: cfg.num_hidden_layers,
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

    /// A Llama config built in code (benchmarks, tests) from its sizes; the rest is Llama's
    /// defaults (RMSNorm eps 1e-6, rope theta 1e4, untied, no biases). An error names a size that
    /// does not fit (heads not dividing the hidden size, say), as a `config.json` would.
    pub fn llama(shape: LlamaShape) -> Result<Self> {
        let LlamaShape { vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, max_position_embeddings } = shape;
        let raw = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads,
            "num_key_value_heads": num_key_value_heads,
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
    }
}

/// The model family `model_type` names; all three use SiLU.
fn architecture(cfg: &RawConfig, path: &Path) -> Result<Architecture> {
    let model_type = cfg.model_type.clone().ok_or_else(|| ModelError::Config {
        path: path.to_path_buf(),
        message: "missing key \"model_type\" (expected \"llama\", \"mistral\" or \"qwen2\")".into(),
    })?;
    let architecture = match model_type.as_str() {
        "llama" => Architecture::Llama,
        "mistral" => Architecture::Mistral,
        "qwen2" => Architecture::Qwen2,
        _ => return Err(ModelError::UnknownModelType { path: path.to_path_buf(), found: model_type }),
    };
    if let Some(act) = &cfg.hidden_act
        && act != "silu"
        && act != "swish"
    {
        return Err(ModelError::Config { path: path.to_path_buf(), message: format!("key \"hidden_act\": expected \"silu\", found {act:?}") });
    }
    Ok(architecture)
}

/// Zero sizes would build empty matrices and fail (or divide by zero) far from the cause.
fn positive(key: &str, value: usize) -> Result<(), String> {
    if value == 0 { Err(format!("key {key:?}: expected a positive integer, found 0")) } else { Ok(()) }
}

/// (attention heads, key/value heads, head dim), each checked against the others.
fn attention_shape(cfg: &RawConfig) -> Result<(usize, usize, usize), String> {
    positive("vocab_size", cfg.vocab_size)?;
    positive("hidden_size", cfg.hidden_size)?;
    positive("intermediate_size", cfg.intermediate_size)?;
    positive("num_attention_heads", cfg.num_attention_heads)?;
    let heads = cfg.num_attention_heads;
    let kv_heads = cfg.num_key_value_heads.unwrap_or(heads);
    positive("num_key_value_heads", kv_heads)?;
    if !heads.is_multiple_of(kv_heads) {
        return Err(format!("key \"num_key_value_heads\": expected a divisor of num_attention_heads ({heads}), found {kv_heads}"));
    }
    let head_dim = match cfg.head_dim {
        Some(d) => {
            positive("head_dim", d)?;
            if !d.is_multiple_of(2) {
                return Err(format!("key \"head_dim\": expected an even number (rotary embeddings rotate pairs), found {d}"));
            }
            d
        }
        None if !cfg.hidden_size.is_multiple_of(heads) => {
            return Err(format!(
                "key \"num_attention_heads\": expected a divisor of hidden_size ({}) as no head_dim is given, found {heads}",
                cfg.hidden_size
            ));
        }
        None if !(cfg.hidden_size / heads).is_multiple_of(2) => {
            return Err(format!(
                "key \"hidden_size\": expected hidden_size / num_attention_heads (the head dim, no head_dim is given) \
                 to be even (rotary embeddings rotate pairs), found {} / {heads} = {}",
                cfg.hidden_size,
                cfg.hidden_size / heads
            ));
        }
        None => cfg.hidden_size / heads,
    };
    Ok((heads, kv_heads, head_dim))
}

/// Norm epsilon, init scale and context length in range. JSON has no NaN, so plain comparisons
/// cover every value these keys can hold.
fn check_scalars(cfg: &RawConfig) -> Result<(), String> {
    if let Some(eps) = cfg.rms_norm_eps
        && eps <= 0.0
    {
        return Err(format!("key \"rms_norm_eps\": expected a positive number, found {eps:?}"));
    }
    if let Some(std) = cfg.initializer_range
        && std < 0.0
    {
        return Err(format!("key \"initializer_range\": expected a non-negative number, found {std:?}"));
    }
    positive("max_position_embeddings", cfg.max_position_embeddings.unwrap_or(2048))
}

/// Each layer's sliding attention window (`None`: full attention).
fn sliding_windows(cfg: &RawConfig, architecture: Architecture) -> Result<Vec<Option<usize>>, String> {
    let layers = cfg.num_hidden_layers;
    let windows = match architecture {
        Architecture::Llama => vec![None; layers],
        Architecture::Mistral => vec![cfg.sliding_window; layers],
        Architecture::Qwen2 => {
            if let Some(types) = &cfg.layer_types {
                if types.len() != layers {
                    return Err(format!(
                        "key \"layer_types\": expected one entry per layer (num_hidden_layers is {layers}), found {}",
                        types.len()
                    ));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "sliding_attention" => Ok(cfg.sliding_window),
                        "full_attention" => Ok(None),
                        other => Err(format!("key \"layer_types\": expected \"full_attention\" or \"sliding_attention\", found {other:?}")),
                    })
                    .collect::<Result<Vec<_>, String>>()?
            } else if cfg.use_sliding_window.unwrap_or(false) {
                let from = cfg.max_window_layers.unwrap_or(layers);
                (0..layers).map(|i| if i >= from { cfg.sliding_window } else { None }).collect()
            } else {
                vec![None; layers]
            }
        }
    };
    // Only a window some layer uses must be positive: Qwen2 configs carry one when it is off.
    if windows.contains(&Some(0)) {
        return Err("key \"sliding_window\": expected a positive integer, found 0".into());
    }
    Ok(windows)
}

/// A key that is there and not `null` (transformers writes `null` for unset options).
fn present(v: &&Value) -> bool {
    !v.is_null()
}

fn parse_rope(cfg: &RawConfig, max_position_embeddings: usize) -> Result<RopeConfig, String> {
    // transformers 5 writes `rope_parameters` (theta included); older configs `rope_theta` + `rope_scaling`.
    let params = cfg.rope_parameters.as_ref().filter(present);
    let scaling = cfg.rope_scaling.as_ref().filter(present);
    let (theta_key, theta) = match params.and_then(|p| p.get("rope_theta")).filter(present) {
        Some(v) => (
            "rope_parameters.rope_theta",
            v.as_f64().ok_or_else(|| type_error("rope_parameters.rope_theta", "a number", v))?,
        ),
        None => ("rope_theta", cfg.rope_theta.unwrap_or(10000.0)),
    };
    if theta <= 0.0 {
        return Err(format!("key {theta_key:?}: expected a positive number, found {theta:?}"));
    }
    let scaling = match params.map(|p| ("rope_parameters", p)).or(scaling.map(|s| ("rope_scaling", s))) {
        Some((section, spec)) => rope_scaling(section, spec, max_position_embeddings)?,
        None => RopeScaling::Default,
    };
    Ok(RopeConfig { theta, scaling })
}

/// The scaling that `section` (`rope_parameters` or `rope_scaling`) describes.
fn rope_scaling(section: &str, spec: &Value, max_position_embeddings: usize) -> Result<RopeScaling, String> {
    let key = |name: &str| format!("{section}.{name}");
    let kind_key = if spec.get("rope_type").is_some() { "rope_type" } else { "type" };
    let kind = match spec.get(kind_key).filter(present) {
        None => "default",
        Some(Value::String(kind)) => kind.as_str(),
        Some(v) => return Err(type_error(&key(kind_key), "a string", v)),
    };
    let get = |name: &str, expected: &str| {
        spec.get(name)
            .filter(present)
            .ok_or_else(|| format!("missing key {:?} (rope type {kind:?} needs {expected})", key(name)))
    };
    let num = |name: &str| -> Result<f64, String> {
        let v = get(name, "a positive number")?;
        let x = v.as_f64().ok_or_else(|| type_error(&key(name), "a positive number", v))?;
        if x > 0.0 {
            Ok(x)
        } else {
            Err(format!("key {:?}: expected a positive number, found {x:?}", key(name)))
        }
    };
    let original = |required: bool| -> Result<Option<usize>, String> {
        const NAME: &str = "original_max_position_embeddings";
        let v = match get(NAME, "a positive integer") {
            Ok(v) => v,
            Err(_) if !required => return Ok(None),
            Err(e) => return Err(e),
        };
        match v.as_u64() {
            Some(0) => Err(format!("key {:?}: expected a positive integer, found 0", key(NAME))),
            Some(n) => Ok(Some(n as usize)),
            None => Err(type_error(&key(NAME), "a positive integer", v)),
        }
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "dynamic" => RopeScaling::Dynamic {
            factor: num("factor")?,
            original_max_position_embeddings: original(false)?.unwrap_or(max_position_embeddings),
        },
        "llama3" => {
            let factor = num("factor")?;
            let (low_freq_factor, high_freq_factor) = (num("low_freq_factor")?, num("high_freq_factor")?);
            // The smoothing band divides by high - low.
            if high_freq_factor <= low_freq_factor {
                return Err(format!(
                    "key {:?}: expected a number above low_freq_factor ({low_freq_factor:?}), found {high_freq_factor:?}",
                    key("high_freq_factor")
                ));
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original(true)?.expect("required"),
            }
        }
        other => {
            return Err(format!(
                "key {:?}: expected \"default\", \"linear\", \"dynamic\" or \"llama3\", found {other:?}",
                key(kind_key)
            ));
        }
    };
    Ok(scaling)
}

/// What a `config.json` key must hold. Checked on the JSON before serde reads it: serde's errors
/// from a `Value` say "invalid type: string \"64\", expected usize" without naming the key.
#[derive(Clone, Copy)]
enum Kind {
    Count,
    Number,
    Bool,
    Text,
    Object,
    Texts,
    TokenIds,
}

impl Kind {
    fn expected(self) -> &'static str {
        match self {
            Kind::Count => "an unsigned integer",
            Kind::Number => "a number",
            Kind::Bool => "true or false",
            Kind::Text => "a string",
            Kind::Object => "an object",
            Kind::Texts => "a list of strings",
            Kind::TokenIds => "a token id or a list of token ids",
        }
    }
}

/// Every key [`RawConfig`] reads, with its kind and whether it must be present. Keep in step with
/// `RawConfig`: a key missing here gets serde's unnamed message instead.
const KEYS: &[(&str, Kind, bool)] = &[
    // A missing model_type has its own message (it lists the supported architectures).
    ("model_type", Kind::Text, false),
    ("vocab_size", Kind::Count, true),
    ("hidden_size", Kind::Count, true),
    ("intermediate_size", Kind::Count, true),
    ("num_hidden_layers", Kind::Count, true),
    ("num_attention_heads", Kind::Count, true),
    ("num_key_value_heads", Kind::Count, false),
    ("head_dim", Kind::Count, false),
    ("rms_norm_eps", Kind::Number, false),
    ("rope_theta", Kind::Number, false),
    ("rope_scaling", Kind::Object, false),
    ("rope_parameters", Kind::Object, false),
    ("max_position_embeddings", Kind::Count, false),
    ("tie_word_embeddings", Kind::Bool, false),
    ("attention_bias", Kind::Bool, false),
    ("mlp_bias", Kind::Bool, false),
    ("sliding_window", Kind::Count, false),
    ("use_sliding_window", Kind::Bool, false),
    ("max_window_layers", Kind::Count, false),
    ("layer_types", Kind::Texts, false),
    ("hidden_act", Kind::Text, false),
    ("initializer_range", Kind::Number, false),
    ("bos_token_id", Kind::TokenIds, false),
    ("eos_token_id", Kind::TokenIds, false),
    ("pad_token_id", Kind::TokenIds, false),
];

/// Checks each known key's JSON type, naming the first key that is missing or of the wrong type.
/// `null` counts as absent for optional keys, as transformers writes it for unset options.
fn check_types(raw: &Value) -> Result<(), String> {
    let Some(obj) = raw.as_object() else {
        return Err(format!("expected a JSON object at the top level, found {}", describe(raw)));
    };
    for &(key, kind, required) in KEYS {
        let value = match obj.get(key) {
            Some(Value::Null) | None if !required => continue,
            None => return Err(format!("missing key {key:?} (expected {})", kind.expected())),
            Some(v) => v,
        };
        let token = |v: &Value| v.as_u64().is_some_and(|id| u32::try_from(id).is_ok());
        let ok = match kind {
            Kind::Count => value.is_u64(),
            Kind::Number => value.is_number(),
            Kind::Bool => value.is_boolean(),
            Kind::Text => value.is_string(),
            Kind::Object => value.is_object(),
            Kind::Texts | Kind::TokenIds => {
                let element_ok: &dyn Fn(&Value) -> bool = match kind {
                    Kind::Texts => &Value::is_string,
                    _ => &token,
                };
                match value {
                    Value::Array(items) => {
                        if let Some((i, item)) = items.iter().enumerate().find(|(_, item)| !element_ok(item)) {
                            let element = if matches!(kind, Kind::Texts) { "a string" } else { "a token id" };
                            return Err(format!(
                                "key {key:?}: element {i}: expected {element}, found {}",
                                describe(item)
                            ));
                        }
                        true
                    }
                    single => matches!(kind, Kind::TokenIds) && token(single),
                }
            }
        };
        if !ok {
            return Err(type_error(key, kind.expected(), value));
        }
    }
    Ok(())
}

fn type_error(key: &str, expected: &str, found: &Value) -> String {
    format!("key {key:?}: expected {expected}, found {}", describe(found))
}

/// A JSON value for an error message: scalars as written, containers by kind only (they can be
/// large).
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => format!("number {n}"),
        Value::String(_) => format!("string {value}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
    }
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
