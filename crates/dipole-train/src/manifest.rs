//! `manifest.json` in a run's `output_dir`: what it takes to tell what a run was and to run it
//! again — the dipole build, the whole config, the model's and the data's digests, the machine and
//! the backend. Written when the run starts (again on each resume).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checkpoint::write_json;
use crate::config::TrainConfig;
use crate::error::TrainResult;
use crate::precompute::{DigestMemo, FileDigest};

pub const MANIFEST: &str = "manifest.json";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunManifest {
    pub dipole_version: String,
    /// `git describe --always --dirty` of the dipole checkout this build came from (at build
    /// time), when it was built from one.
    pub git_commit: Option<String>,
    /// Seconds since the Unix epoch when this start of the run began.
    pub started_unix_s: u64,
    /// The checkpoint this start resumed from.
    pub resumed_from: Option<PathBuf>,
    /// The burn backend type and the device it ran on.
    pub backend: String,
    pub device: String,
    pub machine: Machine,
    /// Every file of the model folder.
    pub model: Vec<FileDigest>,
    pub data: DataDigests,
    pub config: TrainConfig,
}

/// The data a run trains and evaluates on: its files, and the examples as tokenised.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataDigests {
    /// The files of `data.train` (the file, or a folder's dataset files in name order).
    pub train_files: Vec<FileDigest>,
    pub eval_files: Option<Vec<FileDigest>>,
    pub train_examples: usize,
    pub eval_examples: usize,
    /// BLAKE3 of the training examples' token ids, masks and labels in order (what resume checks).
    pub train_examples_blake3: String,
}

/// The machine a run ran on (the CPU matters: its SIMD level changes speed, and float rounding).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub os: String,
    pub arch: String,
    pub cpu: Option<String>,
    /// SIMD extensions the CPU has (`avx512f`, `avx2`, `fma`, `neon`), as detected at run time.
    pub simd: Vec<String>,
    pub threads: usize,
    pub memory_gib: Option<f64>,
}

impl Machine {
    pub fn detect() -> Self {
        Self {
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            cpu: proc_field("/proc/cpuinfo", "model name"),
            simd: simd_features(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: proc_field("/proc/meminfo", "MemTotal")
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .map(|kib| (kib / (1u64 << 20) as f64 * 10.0).round() / 10.0),
        }
    }
}

/// The value of the first `key: value` line of a `/proc` file (Linux only; `None` elsewhere).
fn proc_field(path: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

fn simd_features() -> Vec<String> {
    #[allow(unused_mut)]
    let mut found: Vec<&str> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        for (name, present) in [
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
        ] {
            if present {
                found.push(name);
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    if std::arch::is_aarch64_feature_detected!("neon") {
        found.push("neon");
    }
    found.into_iter().map(String::from).collect()
}

/// What the trainer knows when it writes the manifest.
pub(crate) struct ManifestInputs<'a> {
    pub config: &'a TrainConfig,
    pub resumed_from: Option<&'a Path>,
    pub backend: &'a str,
    pub device: String,
    pub examples: (usize, usize),
    pub train_examples_blake3: String,
}

impl RunManifest {
    /// Hashes the model and data files (memoised beside the reference cache, or in `output_dir`).
    pub(crate) fn new(inputs: ManifestInputs) -> TrainResult<Self> {
        let config = inputs.config;
        let mut digests = DigestMemo::open(Some(config.train.cache_dir.as_deref().unwrap_or(&config.train.output_dir)));
        let model = digests.folder(&config.model.path, |_| true)?;
        let mut dataset = |path: &Path| -> TrainResult<Vec<FileDigest>> {
            dipole_data::record::dataset_files(path, None)?.iter().map(|(file, _)| digests.digest(file)).collect()
        };
        let train_files = dataset(&config.data.train)?;
        let eval_files = config.data.eval.as_deref().map(&mut dataset).transpose()?;
        digests.save();
        Ok(Self {
            dipole_version: env!("CARGO_PKG_VERSION").into(),
            git_commit: option_env!("DIPOLE_GIT_DESCRIBE").map(String::from),
            started_unix_s: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            resumed_from: inputs.resumed_from.map(Path::to_path_buf),
            backend: inputs.backend.into(),
            device: inputs.device,
            machine: Machine::detect(),
            model,
            data: DataDigests {
                train_files,
                eval_files,
                train_examples: inputs.examples.0,
                eval_examples: inputs.examples.1,
                train_examples_blake3: inputs.train_examples_blake3,
            },
            config: config.clone(),
        })
    }

    pub fn write(&self, output_dir: &Path) -> TrainResult<()> {
        write_json(&output_dir.join(MANIFEST), self)
    }

    pub fn read(output_dir: &Path) -> TrainResult<Self> {
        let path = output_dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(crate::error::at(&path))?;
        serde_json::from_str(&text).map_err(crate::error::at(&path))
    }
}
