//! A run's folder on disk: the lock that keeps a second run out of it, checkpoints (and the final
//! weights) written durably (every file and folder synced before the rename that publishes them)
//! with a BLAKE3 checksum of each file verified on resume, and the resume checks (the config still
//! describes the same run).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::optim::Optimizer;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use dipole_models::{CausalLm, ExportDtype};
use serde::Serialize;

use crate::error::{TrainError, TrainResult, at};
use crate::config::TrainConfig;
use crate::trainer::TrainerState;

/// Writes `bytes` to `path` durably: a temporary file beside it, synced, renamed over `path`, and
/// the folder synced, so a crash leaves either the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> TrainResult<()> {
    // one temporary name per process: two runs sharing a cache folder never write the same file
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    let mut file = std::fs::File::create(&tmp).map_err(at(&tmp))?;
    file.write_all(bytes).and_then(|_| file.sync_all()).map_err(at(&tmp))?;
    std::fs::rename(&tmp, path).map_err(at(path))?;
    sync_dir(parent(path))
}

/// The folder holding `path` (`.` for a bare name).
fn parent(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Makes a folder's entries (new files, renames) durable.
pub fn sync_dir(dir: &Path) -> TrainResult<()> {
    // opening a folder to sync it is a Unix notion; elsewhere renames are durable already
    #[cfg(unix)]
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(at(dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

pub fn write_json(path: &Path, value: &impl Serialize) -> TrainResult<()> {
    let text = serde_json::to_string_pretty(value).map_err(at(path))?;
    std::fs::write(path, text).map_err(at(path))
}

/// The file listing each checkpoint file's BLAKE3 digest.
pub const CHECKSUMS: &str = "checksums.json";

fn files_under(dir: &Path) -> TrainResult<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(at(&d))? {
            let path = entry.map_err(at(&d))?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn relative(dir: &Path, path: &Path) -> String {
    path.strip_prefix(dir).unwrap_or(path).to_string_lossy().replace('\\', "/")
}

/// Syncs every file and folder under `dir` and writes [`CHECKSUMS`] over its files.
pub fn seal(dir: &Path) -> TrainResult<()> {
    let mut sums = BTreeMap::new();
    let files: Vec<PathBuf> = files_under(dir)?.into_iter().filter(|p| *p != dir.join(CHECKSUMS)).collect();
    for path in &files {
        // a handle opened for writing: Windows cannot flush a read-only one
        std::fs::OpenOptions::new().write(true).open(path).and_then(|f| f.sync_all()).map_err(at(path))?;
        sums.insert(relative(dir, path), crate::precompute::file_blake3(path)?);
    }
    let text = serde_json::to_string_pretty(&sums).map_err(at(dir))?;
    let list = dir.join(CHECKSUMS);
    let mut file = std::fs::File::create(&list).map_err(at(&list))?;
    file.write_all(text.as_bytes()).and_then(|_| file.sync_all()).map_err(at(&list))?;
    // every folder holding a file, `dir` itself (which now holds the checksums) among them
    let folders: std::collections::BTreeSet<&Path> = files.iter().filter_map(|p| p.parent()).chain([dir]).collect();
    for folder in folders {
        sync_dir(folder)?;
    }
    Ok(())
}

/// Checks every file [`CHECKSUMS`] lists against its digest: a checkpoint with a garbled,
/// truncated or missing file is an error naming it. Checkpoints written before checksums existed
/// pass with a note.
pub fn verify(dir: &Path) -> TrainResult<()> {
    let list = dir.join(CHECKSUMS);
    let text = match std::fs::read_to_string(&list) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!("note: {} has no {CHECKSUMS} (written by an older dipole); its files are not verified", dir.display());
            return Ok(());
        }
        Err(e) => return Err(at(&list)(e)),
    };
    let sums: BTreeMap<String, String> = serde_json::from_str(&text).map_err(at(&list))?;
    for (name, want) in &sums {
        let path = dir.join(name);
        if !path.exists() {
            return Err(TrainError::checkpoint(&path, format!("listed in {CHECKSUMS} but missing: the checkpoint is incomplete")));
        }
        let got = crate::precompute::file_blake3(&path)?;
        if &got != want {
            return Err(TrainError::checkpoint(&path, format!("checksum mismatch (BLAKE3 {got}, {CHECKSUMS} says {want}): the file is damaged")));
        }
    }
    Ok(())
}

/// Checkpoint folders of `output_dir` by step, oldest first.
pub fn checkpoint_dirs(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(output_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().join("trainer_state.json").exists().then_some((step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Publishes the sealed folder `tmp` as `dest` (replacing an older one) and syncs their parent.
pub fn publish(tmp: &Path, dest: &Path) -> TrainResult<()> {
    seal(tmp)?;
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(at(dest))?;
    }
    std::fs::rename(tmp, dest).map_err(at(dest))?;
    sync_dir(parent(dest))
}

/// Whether `dir` was published whole by [`publish`] (it holds its [`CHECKSUMS`]).
pub fn is_sealed(dir: &Path) -> bool {
    dir.join(CHECKSUMS).is_file()
}

/// Where a run's trainable weights go inside `dir`: `adapter/` (LoRA) or `model/`.
pub(crate) fn weights_dir(config: &TrainConfig, dir: &Path) -> PathBuf {
    dir.join(if config.lora.enabled { "adapter" } else { "model" })
}

/// Saves the trainable weights of `policy` into [`weights_dir`] of `dir` (PEFT adapter, or an f32
/// HF folder).
pub(crate) fn save_weights<B: AutodiffBackend>(config: &TrainConfig, policy: &CausalLm<B>, dir: &Path) -> TrainResult<()> {
    let dest = weights_dir(config, dir);
    if config.lora.enabled {
        let lora = config.lora.lora_config(&config.model.path)?;
        Ok(policy.save_adapter(&dest, &lora)?)
    } else {
        Ok(policy.save_hf(&dest, ExportDtype::F32, usize::MAX, Some(&config.model.path))?)
    }
}

/// Writes the final weights into `final_dir/adapter` (LoRA) or `final_dir/model`, whole or not at
/// all: a partial folder, sealed, then renamed into place.
pub(crate) fn save_final<B: AutodiffBackend>(config: &TrainConfig, policy: &CausalLm<B>, final_dir: &Path) -> TrainResult<PathBuf> {
    let partial = final_dir.join(".partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(at(&partial))?;
    }
    save_weights(config, policy, &partial)?;
    let dest = weights_dir(config, final_dir);
    publish(&weights_dir(config, &partial), &dest)?;
    std::fs::remove_dir_all(&partial).map_err(at(&partial))?;
    Ok(dest)
}

/// Writes the weights kept by `train.save_best` into `<output_dir>/best` with `best.json`,
/// replacing the previous best whole (a partial folder, sealed, then renamed into place).
pub(crate) fn save_best<B: AutodiffBackend>(config: &TrainConfig, policy: &CausalLm<B>, best: &crate::trainer::BestEval) -> TrainResult<()> {
    let out_dir = &config.train.output_dir;
    let tmp = out_dir.join(".best.tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(at(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(at(&tmp))?;
    save_weights(config, policy, &tmp)?;
    write_json(&tmp.join("best.json"), best)?;
    publish(&tmp, &out_dir.join("best"))
}

/// Writes `checkpoint-<step>` durably (temporary folder, every file synced and checksummed, then
/// renamed) and prunes old ones.
pub(crate) fn save_checkpoint<B: AutodiffBackend, O: Optimizer<CausalLm<B>, B>>(
    config: &TrainConfig,
    policy: &CausalLm<B>,
    moving_reference: Option<&CausalLm<B::InnerBackend>>,
    optimizer: &O,
    state: &TrainerState,
    recorder: &NamedMpkFileRecorder<FullPrecisionSettings>,
) -> TrainResult<()> {
    let out_dir = &config.train.output_dir;
    let dest = out_dir.join(format!("checkpoint-{}", state.step));
    let tmp = out_dir.join(format!(".checkpoint-{}.tmp", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(at(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(at(&tmp))?;
    save_weights(config, policy, &tmp)?;
    if let Some(reference) = moving_reference {
        reference.save_hf(&tmp.join("reference"), ExportDtype::F32, usize::MAX, None)?;
    }
    recorder
        .record(optimizer.to_record(), tmp.join("optimizer"))
        .map_err(at(&tmp))?;
    write_json(&tmp.join("trainer_state.json"), state)?;
    write_json(&tmp.join("config.json"), config)?;
    publish(&tmp, &dest)?;
    if let Some(limit) = config.train.save_total_limit {
        let dirs = checkpoint_dirs(out_dir);
        for (_, dir) in dirs.iter().take(dirs.len().saturating_sub(limit.max(1))) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    Ok(())
}

/// The lock a run holds on its `train.output_dir`: an OS file lock on `dipole.lock`, which the
/// kernel releases when the process ends however it ends, so a killed run never leaves the folder
/// locked (nor does a pid reused after a restart). The file holds the owner's pid while it runs, for
/// the message, and is emptied when the run ends cleanly.
#[derive(Debug)]
pub struct RunLock {
    file: std::fs::File,
}

pub const LOCK_FILE: &str = "dipole.lock";

impl RunLock {
    pub fn acquire(output_dir: &Path) -> TrainResult<Self> {
        let path = output_dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(at(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let owner = std::fs::read_to_string(&path).unwrap_or_default();
                let owner = match owner.trim() {
                    "" => String::new(),
                    pid => format!(" (pid {pid})"),
                };
                return Err(TrainError::Run(format!(
                    "train.output_dir {} is in use by a live run{owner}, which holds {}: give this run another output_dir, or wait for that one to end",
                    output_dir.display(),
                    path.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(at(&path)(e)),
        }
        let mut before = String::new();
        std::io::Read::read_to_string(&mut file, &mut before).map_err(at(&path))?;
        if !before.trim().is_empty() {
            tracing::info!("note: {} names pid {}, a run that ended without finishing; taking it over", path.display(), before.trim());
        }
        file.set_len(0).map_err(at(&path))?;
        std::io::Seek::rewind(&mut file).map_err(at(&path))?;
        writeln!(file, "{}", std::process::id()).map_err(at(&path))?;
        Ok(Self { file })
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // the file stays (removing it would let a waiting opener lock a deleted file); emptied, it
        // says the run ended cleanly, and closing it releases the lock
        let _ = self.file.set_len(0);
    }
}

/// Config keys that a resumed run may change: they steer logging, saving, evaluation output,
/// where files go and how work is spread over threads, not the weights a step computes.
const FREE_ON_RESUME: &[&str] = &[
    "train.logging_steps",
    "train.eval_steps",
    "train.save_steps",
    "train.save_total_limit",
    "train.output_dir",
    "train.progress",
    "train.generations",
    "train.max_new_tokens",
    "train.generation_temperature",
    "train.generation_top_p",
    "train.eval_on_start",
    "train.final_dir",
    "train.backend",
    "train.cache_dir",
    "train.save_best",
    "train.metric_for_best_model",
    "train.greater_is_better",
    "train.batch_shards",
    "train.skip_nonfinite",
    "train.max_skipped_fraction",
    "train.gradient_checkpointing",
    "train.prefix_sharing",
    "train.fused_lm_head",
    "train.padding_free",
    "train.attention_recompute",
    // the training examples themselves are compared on resume (`TrainerState::train_data`)
    "data.eval",
    "data.skip_invalid",
];

/// Config keys a resumed run may change knowingly, said on stderr with what follows.
const NOTED_ON_RESUME: &[(&str, &str)] = &[
    ("train.max_steps", "the learning-rate schedule follows the new length"),
    ("train.num_train_epochs", "the learning-rate schedule follows the new length"),
    ("train.mixed_precision", "the steps from here on compute in the new precision"),
];

fn flatten(prefix: &str, value: &serde_json::Value, out: &mut BTreeMap<String, serde_json::Value>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// Compares the config a checkpoint was written with (`saved`, its `config.json`) with the
/// resumed run's: a difference that changes what the steps compute is an error naming the key and
/// both values.
pub fn check_resume_config(saved: &TrainConfig, now: &TrainConfig, checkpoint: &Path) -> TrainResult<()> {
    let keys = |c: &TrainConfig| {
        let mut out = BTreeMap::new();
        flatten("", &serde_json::to_value(c).expect("config serializes"), &mut out);
        out
    };
    let (before, after) = (keys(saved), keys(now));
    let all: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    let null = serde_json::Value::Null;
    for key in all {
        let (a, b) = (before.get(key).unwrap_or(&null), after.get(key).unwrap_or(&null));
        if a == b || FREE_ON_RESUME.contains(&key.as_str()) {
            continue;
        }
        if let Some((_, what)) = NOTED_ON_RESUME.iter().find(|(k, _)| k == key) {
            tracing::warn!("note: {key} was {a} in {}, now {b}: {what}", checkpoint.display());
            continue;
        }
        return Err(TrainError::resume(
            checkpoint,
            format!("{key} was {a} when the checkpoint was written, now {b}; that changes what the run computes (resume with the checkpoint's value, or start a new run in another output_dir)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_refuses_and_a_released_one_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let lock = RunLock::acquire(dir.path()).unwrap();
        let err = RunLock::acquire(dir.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "train.output_dir {} is in use by a live run (pid {}), which holds {}: give this run another output_dir, or wait for that one to end",
                dir.path().display(),
                std::process::id(),
                dir.path().join(LOCK_FILE).display()
            )
        );
        drop(lock);
        assert_eq!(std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap(), "", "a clean end empties the file");
        // a file naming a pid but locked by nobody: its run was killed
        std::fs::write(dir.path().join(LOCK_FILE), "12345\n").unwrap();
        let _taken = RunLock::acquire(dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap(), format!("{}\n", std::process::id()));
    }

    #[test]
    fn checksums_catch_a_garbled_file() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("ckpt");
        std::fs::create_dir_all(ckpt.join("model")).unwrap();
        std::fs::write(ckpt.join("model/weights.bin"), vec![7u8; 4096]).unwrap();
        std::fs::write(ckpt.join("optimizer.mpk"), vec![1u8; 1000]).unwrap();
        seal(&ckpt).unwrap();
        verify(&ckpt).unwrap();
        let mut bytes = std::fs::read(ckpt.join("optimizer.mpk")).unwrap();
        bytes[500] ^= 0xff;
        std::fs::write(ckpt.join("optimizer.mpk"), &bytes).unwrap();
        let err = verify(&ckpt).unwrap_err().to_string();
        assert!(err.contains("optimizer.mpk: checksum mismatch"), "{err}");
        std::fs::remove_file(ckpt.join("model/weights.bin")).unwrap();
        seal(&ckpt).unwrap();
        verify(&ckpt).unwrap();
        std::fs::write(ckpt.join(CHECKSUMS), r#"{"model/weights.bin": "00"}"#).unwrap();
        let err = verify(&ckpt).unwrap_err().to_string();
        assert!(err.contains("weights.bin: listed in checksums.json but missing"), "{err}");
    }

    #[test]
    fn resume_refuses_a_changed_rank_and_allows_a_changed_log_interval() {
        let saved = TrainConfig::default();
        let mut now = saved.clone();
        now.train.logging_steps = 3;
        now.train.max_steps = Some(100);
        check_resume_config(&saved, &now, Path::new("runs/x/checkpoint-4")).unwrap();
        now.lora.r = 16;
        let err = check_resume_config(&saved, &now, Path::new("runs/x/checkpoint-4")).unwrap_err();
        assert!(matches!(err, TrainError::Resume { .. }));
        assert_eq!(
            err.to_string(),
            "--resume runs/x/checkpoint-4: lora.r was 8 when the checkpoint was written, now 16; that changes what the run computes (resume with the checkpoint's value, or start a new run in another output_dir)"
        );
    }
}
