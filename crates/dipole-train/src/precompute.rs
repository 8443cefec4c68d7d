//! Precomputed reference log-probs, cached on disk under a key of model + data + tokenisation, so a
//! later run with the same inputs skips the reference pass entirely (TRL recomputes it every run).

use std::hash::{Hash, Hasher};
use std::path::Path;

use dipole_data::PairInputs;
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReferenceCache {
    pub key: String,
    /// `(chosen, rejected)` reference log-probs: training pairs, then eval pairs.
    pub values: Vec<(f32, f32)>,
}

/// FNV-1a over everything that determines the reference log-probs.
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// The model is identified by its `config.json` and its weight files' names, sizes and first
/// megabyte (headers hold every tensor's name, shape and offsets); the data by its token ids and
/// masks after truncation; plus the reference settings (LD-DPO alpha, reference adapter).
pub fn cache_key(config: &TrainConfig, train: &[PairInputs], eval: &[PairInputs]) -> Result<String, String> {
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    let model = &config.model.path;
    let mut files: Vec<_> = std::fs::read_dir(model)
        .map_err(|e| format!("{}: {e}", model.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors" || x == "json"))
        .collect();
    files.sort();
    for path in files {
        let name = path.file_name().unwrap_or_default().to_string_lossy().to_string();
        if name.starts_with("tokenizer") {
            continue;
        }
        name.hash(&mut h);
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        bytes.len().hash(&mut h);
        bytes[..bytes.len().min(1 << 20)].hash(&mut h);
    }
    for p in train.iter().chain(eval) {
        p.chosen.input_ids.hash(&mut h);
        p.chosen.completion_mask.hash(&mut h);
        p.rejected.input_ids.hash(&mut h);
        p.rejected.completion_mask.hash(&mut h);
    }
    train.len().hash(&mut h);
    config.objective.ld_alpha.map(f64::to_bits).hash(&mut h);
    config.lora.reference_adapter.hash(&mut h);
    // the reference computes in the run's precision: bf16 log-probs are not f32's
    config.train.mixed_precision.name().hash(&mut h);
    Ok(format!("{:016x}", h.finish()))
}

impl ReferenceCache {
    /// Reads `<dir>/<key>.json`, or computes the values and writes them there.
    pub fn load_or_compute(
        dir: &Path,
        key: &str,
        compute: impl FnOnce() -> Result<Vec<(f32, f32)>, String>,
    ) -> Result<Self, String> {
        let path = dir.join(format!("{key}.json"));
        if let Ok(text) = std::fs::read_to_string(&path) {
            let cache: Self = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            eprintln!("reference log-probs: reusing {}", path.display());
            return Ok(cache);
        }
        let values = compute()?;
        let cache = Self { key: key.to_string(), values };
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_string(&cache).expect("json")).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("reference log-probs: computed and cached in {}", path.display());
        Ok(cache)
    }
}
