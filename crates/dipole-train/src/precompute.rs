//! Precomputed reference log-probs, cached on disk under a key of everything that determines them
//! (the reference model's bytes, the tokenised data, the reference settings), so a later run with
//! the same inputs skips the reference pass entirely (TRL recomputes it every run). The inputs are
//! stored beside the values and compared on reuse: a cache never serves another model's log-probs.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use dipole_data::PairInputs;
use serde::{Deserialize, Serialize};

use crate::error::{TrainResult, at};
use crate::config::{TrainConfig, WeightDtype};

/// A file by its content: name, size and BLAKE3 digest (hex).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub name: String,
    pub bytes: u64,
    pub blake3: String,
}

/// What determines the reference log-probs of a precomputed run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheInputs {
    /// Every file of the model folder but the tokenizer's (the data's token ids stand for those).
    pub model: Vec<FileDigest>,
    /// `model.from_scratch`: the reference is the seeded random init.
    pub from_scratch_seed: Option<u64>,
    /// The files of `lora.reference_adapter`, when the reference is base + that adapter.
    pub reference_adapter: Option<Vec<FileDigest>>,
    /// BLAKE3 of every pair's token ids and completion masks after truncation, training then eval.
    pub data: String,
    pub train_pairs: usize,
    pub eval_pairs: usize,
    pub ld_alpha: Option<f64>,
    /// The reference computes in the run's precision: bf16 log-probs are not f32's.
    pub mixed_precision: String,
    /// `model.dtype` when it rounds the stored weights (`bf16`, `f16`); `stored` for `auto` and
    /// `f32`, which hold the stored values exactly.
    #[serde(default)]
    pub model_dtype: String,
}

impl CacheInputs {
    /// The inputs of `config`'s reference over `train` and `eval`. Model files are hashed in full,
    /// streamed in fixed-size reads; `memo`, when given, remembers digests by (path, size, mtime)
    /// so a large checkpoint is read once, not every run.
    pub fn of(config: &TrainConfig, train: &[PairInputs], eval: &[PairInputs], memo: Option<&Path>) -> TrainResult<Self> {
        let mut digests = DigestMemo::open(memo);
        let model = digests.folder(&config.model.path, |name| !name.starts_with("tokenizer"))?;
        let reference_adapter = match &config.lora.reference_adapter {
            Some(dir) => Some(digests.folder(dir, |_| true)?),
            None => None,
        };
        digests.save();
        let mut data = blake3::Hasher::new();
        for p in train.iter().chain(eval) {
            hash_sequence(&mut data, &p.chosen);
            hash_sequence(&mut data, &p.rejected);
        }
        Ok(Self {
            model,
            from_scratch_seed: config.model.from_scratch.then_some(config.train.seed),
            reference_adapter,
            data: data.finalize().to_hex().to_string(),
            train_pairs: train.len(),
            eval_pairs: eval.len(),
            ld_alpha: config.objective.ld_alpha,
            mixed_precision: config.train.mixed_precision.name().to_string(),
            // a precomputed reference is the initial policy: held in model.dtype only with LoRA
            model_dtype: match config.model.dtype {
                WeightDtype::Bf16 if config.lora.enabled => "bf16".into(),
                WeightDtype::F16 if config.lora.enabled => "f16".into(),
                _ => "stored".into(),
            },
        })
    }

    /// The cache file's name: BLAKE3 of the inputs (128 bits, hex).
    pub fn key(&self) -> String {
        let text = serde_json::to_string(self).expect("inputs serialize");
        blake3::hash(text.as_bytes()).to_hex()[..32].to_string()
    }

    /// The first input that differs from `other`, named (for the message when a cache is refused).
    fn first_difference(&self, other: &Self) -> String {
        let files = |what: &str, a: &[FileDigest], b: &[FileDigest]| -> Option<String> {
            let names = |v: &[FileDigest]| v.iter().map(|f| f.name.clone()).collect::<Vec<_>>();
            if names(a) != names(b) {
                return Some(format!("{what} files {:?} vs {:?}", names(a), names(b)));
            }
            a.iter().zip(b).find(|(x, y)| x != y).map(|(x, _)| format!("{what} file {} has other content", x.name))
        };
        if let Some(d) = files("model", &self.model, &other.model) {
            return d;
        }
        match (&self.reference_adapter, &other.reference_adapter) {
            (Some(a), Some(b)) => {
                if let Some(d) = files("reference adapter", a, b) {
                    return d;
                }
            }
            (None, None) => {}
            _ => return "reference adapter present in one, absent in the other".into(),
        }
        let fields = [
            ("data", self.data != other.data),
            ("training pair count", self.train_pairs != other.train_pairs),
            ("eval pair count", self.eval_pairs != other.eval_pairs),
            ("objective.ld_alpha", self.ld_alpha != other.ld_alpha),
            ("train.mixed_precision", self.mixed_precision != other.mixed_precision),
            ("model.dtype", self.model_dtype != other.model_dtype),
            ("model.from_scratch / train.seed", self.from_scratch_seed != other.from_scratch_seed),
        ];
        fields.iter().find(|(_, differs)| *differs).map_or("nothing (same inputs)".into(), |(name, _)| format!("{name} differs"))
    }
}

/// Feeds one tokenised row (its length, ids and completion mask) to `hasher`.
pub fn hash_sequence(hasher: &mut blake3::Hasher, seq: &dipole_data::Sequence) {
    hasher.update(&(seq.input_ids.len() as u64).to_le_bytes());
    for id in &seq.input_ids {
        hasher.update(&id.to_le_bytes());
    }
    hasher.update(&seq.completion_mask);
}

/// Streams `path` through BLAKE3 in 1 MiB reads (a 14 GB checkpoint is never held in memory).
pub fn file_blake3(path: &Path) -> TrainResult<String> {
    let mut file = std::fs::File::open(path).map_err(at(path))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(at(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// A remembered digest: valid while the file keeps its size, modification time and identity.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Remembered {
    bytes: u64,
    modified_ns: u128,
    /// Device, inode and change time on Unix: `cp -p`, `rsync -a` and `touch -r` carry a file's
    /// size and mtime over, but a change time only the kernel sets.
    #[serde(default)]
    identity: String,
    blake3: String,
}

#[cfg(unix)]
fn identity(meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!("{}:{}:{}.{}", meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec())
}

#[cfg(not(unix))]
fn identity(_: &std::fs::Metadata) -> String {
    String::new()
}

/// Digests of files already hashed, kept in `<cache dir>/file-digests.json`, so that an unchanged
/// file is hashed once.
pub(crate) struct DigestMemo {
    path: Option<PathBuf>,
    known: BTreeMap<PathBuf, Remembered>,
    changed: bool,
}

impl DigestMemo {
    pub(crate) fn open(dir: Option<&Path>) -> Self {
        let path = dir.map(|d| d.join("file-digests.json"));
        // an unreadable memo only costs a re-hash
        let known = path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        Self { path, known, changed: false }
    }

    pub(crate) fn digest(&mut self, path: &Path) -> TrainResult<FileDigest> {
        let meta = std::fs::metadata(path).map_err(at(path))?;
        let modified_ns = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
        let full = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let name = path.file_name().unwrap_or_default().to_string_lossy().to_string();
        let identity = identity(&meta);
        let blake3 = match self.known.get(&full) {
            Some(r) if r.bytes == meta.len() && r.modified_ns == modified_ns && modified_ns != 0 && r.identity == identity => r.blake3.clone(),
            _ => {
                let digest = file_blake3(path)?;
                self.known.insert(full, Remembered { bytes: meta.len(), modified_ns, identity, blake3: digest.clone() });
                self.changed = true;
                digest
            }
        };
        Ok(FileDigest { name, bytes: meta.len(), blake3 })
    }

    /// Digests of the regular files of `dir` whose names `keep`, sorted by name.
    pub(crate) fn folder(&mut self, dir: &Path, keep: impl Fn(&str) -> bool) -> TrainResult<Vec<FileDigest>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(at(dir))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file() && p.file_name().is_some_and(|n| keep(&n.to_string_lossy())))
            .collect();
        files.sort();
        files.iter().map(|p| self.digest(p)).collect()
    }

    pub(crate) fn save(&self) {
        let Some(path) = self.path.as_ref().filter(|_| self.changed) else { return };
        // best effort: a memo that cannot be written is re-hashed next time
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Ok(text) = serde_json::to_string(&self.known) {
            let _ = crate::checkpoint::write_atomic(path, text.as_bytes());
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReferenceCache {
    pub key: String,
    pub inputs: CacheInputs,
    /// `(chosen, rejected)` reference log-probs: training pairs, then eval pairs.
    pub values: Vec<(f32, f32)>,
}

impl ReferenceCache {
    /// Reads `<dir>/<key>.json` when it was made from exactly `inputs`, or computes the values and
    /// writes them there (a file made from other inputs, or unreadable, is recomputed, said on stderr).
    pub fn load_or_compute(dir: &Path, inputs: &CacheInputs, compute: impl FnOnce() -> TrainResult<Vec<(f32, f32)>>) -> TrainResult<Self> {
        let key = inputs.key();
        let path = dir.join(format!("{key}.json"));
        if let Ok(text) = std::fs::read_to_string(&path) {
            match serde_json::from_str::<Self>(&text) {
                Ok(cache) if cache.inputs == *inputs && cache.values.len() == inputs.train_pairs + inputs.eval_pairs => {
                    tracing::info!("reference log-probs: reusing {}", path.display());
                    return Ok(cache);
                }
                Ok(cache) if cache.inputs != *inputs => {
                    tracing::info!("reference log-probs: {} was made from other inputs ({}); recomputing", path.display(), inputs.first_difference(&cache.inputs));
                }
                Ok(cache) => tracing::info!(
                    "reference log-probs: {} holds {} values for {} pairs; recomputing",
                    path.display(),
                    cache.values.len(),
                    inputs.train_pairs + inputs.eval_pairs
                ),
                Err(e) => tracing::info!("reference log-probs: {} is unreadable ({e}); recomputing", path.display()),
            }
        }
        let values = compute()?;
        let cache = Self { key, inputs: inputs.clone(), values };
        std::fs::create_dir_all(dir).map_err(at(dir))?;
        let text = serde_json::to_string(&cache).map_err(at(&path))?;
        crate::checkpoint::write_atomic(&path, text.as_bytes())?;
        tracing::info!("reference log-probs: computed and cached in {}", path.display());
        Ok(cache)
    }
}
