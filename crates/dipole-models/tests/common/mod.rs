//! Fixtures shared by this crate's integration tests.

use std::path::{Path, PathBuf};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name)
}

/// The tiny Mistral fixture with its sliding window set to `window`, in a temporary folder.
#[allow(dead_code)] // not every test binary uses it
pub fn mistral_with_window(window: usize) -> tempfile::TempDir {
    let src = fixture("tiny-mistral");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    assert!(cfg.contains("\"sliding_window\": 4096"), "the fixture's window is 4096");
    std::fs::write(dir.path().join("config.json"), cfg.replace("\"sliding_window\": 4096", &format!("\"sliding_window\": {window}"))).unwrap();
    dir
}
