//! LoRA options, read from and written as PEFT's `adapter_config.json`.

use std::path::Path;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{LoraError, Result};

/// Which modules get an adapter, as PEFT's `target_modules` says it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module-name suffixes (`"q_proj"` matches `model.layers.0.self_attn.q_proj`); the single entry
    /// `"all-linear"` means every linear layer but the output head.
    List(Vec<String>),
    /// A regular expression that must match the whole module name.
    Regex(String),
}

/// How a fresh adapter's A matrix is initialised (B always starts at zero, so the adapted model
/// starts equal to the base).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum LoraInit {
    /// PEFT's default: Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)).
    #[default]
    #[serde(rename = "kaiming", alias = "kaiming_uniform")]
    KaimingUniform,
    /// PEFT's `"gaussian"`: N(0, 1/r).
    #[serde(rename = "gaussian")]
    Gaussian,
}

/// LoRA hyper-parameters. Field names follow PEFT's `LoraConfig`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    /// Only these decoder layers get adapters (all when `None`).
    pub layers_to_transform: Option<Vec<usize>>,
    /// rsLoRA: scale by `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    pub init: LoraInit,
    /// Recorded in `adapter_config.json` so PEFT knows the base model.
    pub base_model_name_or_path: Option<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            target_modules: TargetModules::List(vec!["q_proj".into(), "v_proj".into()]),
            layers_to_transform: None,
            use_rslora: false,
            init: LoraInit::KaimingUniform,
            base_model_name_or_path: None,
        }
    }
}

/// The PEFT `adapter_config.json` keys dipole reads; everything else is ignored on read.
#[derive(Deserialize)]
struct PeftConfigFile {
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: Option<TargetModules>,
    layers_to_transform: Option<LayersToTransform>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    bias: Option<String>,
    #[serde(default)]
    fan_in_fan_out: bool,
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    rank_pattern: serde_json::Map<String, Value>,
    #[serde(default)]
    alpha_pattern: serde_json::Map<String, Value>,
    init_lora_weights: Option<Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum LayersToTransform {
    One(usize),
    Many(Vec<usize>),
}

impl LoraConfig {
    /// `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Whether the linear layer `module` (an HF module name such as
    /// `model.layers.3.mlp.up_proj`) gets an adapter, with PEFT's matching rules.
    pub fn targets(&self, module: &str) -> bool {
        if let Some(layers) = &self.layers_to_transform {
            match layer_index(module) {
                Some(i) if layers.contains(&i) => {}
                _ => return false,
            }
        }
        match &self.target_modules {
            TargetModules::List(names) if names.len() == 1 && names[0] == "all-linear" => {
                module != "lm_head" && !module.ends_with(".lm_head")
            }
            TargetModules::List(names) => names
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}"))),
            TargetModules::Regex(pattern) => Regex::new(&format!("^(?:{pattern})$"))
                .map(|re| re.is_match(module))
                .unwrap_or(false),
        }
    }

    /// Checks values a user may get wrong; errors name the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(LoraError::Config(m));
        if self.r == 0 {
            return bad("r must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(format!("lora_dropout must be in [0, 1), got {}", self.lora_dropout));
        }
        if let TargetModules::Regex(p) = &self.target_modules
            && let Err(e) = Regex::new(p) {
                return bad(format!("target_modules regex {p:?} does not compile: {e}"));
            }
        if let TargetModules::List(l) = &self.target_modules
            && l.is_empty() {
                return bad("target_modules is empty".into());
            }
        Ok(())
    }

    /// Reads PEFT's `adapter_config.json`. Features dipole does not implement (DoRA, per-module
    /// ranks, `fan_in_fan_out`, trained biases) are errors rather than silently different models.
    pub fn from_peft_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| LoraError::io(path, e))?;
        let file: PeftConfigFile = serde_json::from_str(&text)
            .map_err(|e| LoraError::File(path.to_path_buf(), format!("invalid adapter_config.json: {e}")))?;
        let unsupported = |what: &str| Err(LoraError::File(path.to_path_buf(), format!("{what} is not supported")));
        match file.peft_type.as_deref() {
            Some("LORA") | None => {}
            Some(other) => return unsupported(&format!("peft_type {other:?} (only LORA)")),
        }
        if file.use_dora {
            return unsupported("use_dora = true");
        }
        if file.fan_in_fan_out {
            return unsupported("fan_in_fan_out = true");
        }
        if !file.rank_pattern.is_empty() || !file.alpha_pattern.is_empty() {
            return unsupported("a non-empty rank_pattern / alpha_pattern");
        }
        if let Some(bias) = &file.bias
            && bias != "none" {
                return unsupported(&format!("bias = {bias:?} (only \"none\")"));
            }
        let init = match &file.init_lora_weights {
            Some(Value::String(s)) if s == "gaussian" => LoraInit::Gaussian,
            _ => LoraInit::KaimingUniform,
        };
        let config = Self {
            r: file.r,
            lora_alpha: file.lora_alpha,
            lora_dropout: file.lora_dropout,
            target_modules: file
                .target_modules
                .ok_or_else(|| LoraError::File(path.to_path_buf(), "no target_modules".into()))?,
            layers_to_transform: file.layers_to_transform.map(|l| match l {
                LayersToTransform::One(i) => vec![i],
                LayersToTransform::Many(v) => v,
            }),
            use_rslora: file.use_rslora,
            init,
            base_model_name_or_path: file.base_model_name_or_path,
        };
        config
            .validate()
            .map_err(|e| LoraError::File(path.to_path_buf(), e.to_string()))?;
        Ok(config)
    }

    /// PEFT's `adapter_config.json` for this adapter.
    pub fn to_peft_json(&self) -> Value {
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": self.target_modules,
            "layers_to_transform": self.layers_to_transform,
            "use_rslora": self.use_rslora,
            "use_dora": false,
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": match self.init { LoraInit::KaimingUniform => Value::Bool(true), LoraInit::Gaussian => Value::String("gaussian".into()) },
            "base_model_name_or_path": self.base_model_name_or_path,
            "modules_to_save": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "inference_mode": true,
            "revision": null,
        })
    }
}

/// `model.layers.12.mlp.up_proj` -> 12.
fn layer_index(module: &str) -> Option<usize> {
    let mut parts = module.split('.');
    while let Some(p) = parts.next() {
        if p == "layers" || p == "h" || p == "blocks" {
            return parts.next()?.parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_matching_rules() {
        let c = LoraConfig::default();
        assert!(c.targets("model.layers.0.self_attn.q_proj"));
        assert!(!c.targets("model.layers.0.self_attn.k_proj"));
        let all = LoraConfig {
            target_modules: TargetModules::List(vec!["all-linear".into()]),
            layers_to_transform: Some(vec![1]),
            ..Default::default()
        };
        assert!(all.targets("model.layers.1.mlp.down_proj"));
        assert!(!all.targets("model.layers.0.mlp.down_proj"));
        assert!(!all.targets("lm_head"));
        let re = LoraConfig {
            target_modules: TargetModules::Regex(r".*\.(q|v)_proj".into()),
            ..Default::default()
        };
        assert!(re.targets("model.layers.3.self_attn.v_proj"));
        assert!(!re.targets("model.layers.3.self_attn.o_proj"));
    }

    #[test]
    fn rslora_scale() {
        let c = LoraConfig { r: 16, lora_alpha: 32.0, use_rslora: true, ..Default::default() };
        assert_eq!(c.scale(), 8.0);
        assert_eq!(LoraConfig { use_rslora: false, ..c }.scale(), 2.0);
    }

    #[test]
    fn bad_values_name_the_key() {
        let c = LoraConfig { lora_dropout: 1.5, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("lora_dropout"));
        let c = LoraConfig { target_modules: TargetModules::Regex("(".into()), ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("target_modules"));
    }
}
