//! Reading Hugging Face safetensors checkpoints (single file or sharded with an index) by tensor
//! name, with every dtype converted to f32 and every shape checked.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Metadata, SafeTensors};
use serde::Deserialize;

use crate::error::{ModelError, Result};

struct Shard {
    path: PathBuf,
    map: Mmap,
    data_start: usize,
    metadata: Metadata,
}

/// The tensors of a checkpoint folder, read lazily from memory-mapped files. Tracks which names
/// were taken so unused tensors can be reported.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// tensor name -> shard index
    names: BTreeMap<String, usize>,
    taken: BTreeSet<String>,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

impl Checkpoint {
    /// Opens `model.safetensors.index.json` (sharded) or `model.safetensors` in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut shards = Vec::new();
        let mut names = BTreeMap::new();
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|source| ModelError::Io {
                path: index_path.clone(),
                source,
            })?;
            let index: ShardIndex = serde_json::from_str(&text).map_err(|source| ModelError::Json {
                path: index_path.clone(),
                source,
            })?;
            let files: BTreeSet<&String> = index.weight_map.values().collect();
            let mut file_ids = HashMap::new();
            for file in files {
                file_ids.insert(file.clone(), shards.len());
                shards.push(open_shard(&dir.join(file))?);
            }
            for (name, file) in &index.weight_map {
                let id = file_ids[file];
                if !shards[id].metadata.tensors().contains_key(name) {
                    return Err(ModelError::Safetensors {
                        path: shards[id].path.clone(),
                        message: format!("the index names tensor {name:?} in this file, but it is not there"),
                    });
                }
                names.insert(name.clone(), id);
            }
        } else if single.exists() {
            let shard = open_shard(&single)?;
            for name in shard.metadata.tensors().keys() {
                names.insert(name.clone(), 0);
            }
            shards.push(shard);
        } else {
            return Err(ModelError::NoWeights { dir });
        }
        Ok(Self {
            dir,
            shards,
            names,
            taken: BTreeSet::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// The stored shape of `name`, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let shard = &self.shards[*self.names.get(name)?];
        shard.metadata.tensors().get(name).map(|info| info.shape.clone())
    }

    /// Reads `name` as f32 values in row-major order, checking it has shape `expected`.
    pub fn take(&mut self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let Some(&id) = self.names.get(name) else {
            return Err(ModelError::MissingTensor {
                name: name.to_string(),
                expected: expected.to_vec(),
                dir: self.dir.clone(),
            });
        };
        let shard = &self.shards[id];
        let tensors = shard.metadata.tensors();
        let info = tensors[name];
        if info.shape != expected {
            return Err(ModelError::Shape {
                name: name.to_string(),
                path: shard.path.clone(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
        let (begin, end) = info.data_offsets;
        let bytes = &shard.map[shard.data_start + begin..shard.data_start + end];
        let values = dipole_lora::peft::decode_f32(bytes, info.dtype).ok_or_else(|| ModelError::Dtype {
            name: name.to_string(),
            path: shard.path.clone(),
            dtype: format!("{:?}", info.dtype),
        })?;
        self.taken.insert(name.to_string());
        Ok(values)
    }

    /// Names present in the checkpoint that were never taken.
    pub fn untaken(&self) -> Vec<String> {
        self.names
            .keys()
            .filter(|n| !self.taken.contains(*n))
            .cloned()
            .collect()
    }
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = File::open(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: the checkpoint files are treated as read-only for the lifetime of the map; a file
    // modified underneath a running process is outside what any loader can defend against.
    let map = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |e: safetensors::SafeTensorError| ModelError::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    // Full validation (offsets inside the buffer, no overlaps) before trusting the header.
    SafeTensors::deserialize(&map).map_err(invalid)?;
    let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(invalid)?;
    Ok(Shard {
        path: path.to_path_buf(),
        data_start: 8 + header_len,
        map,
        metadata,
    })
}
