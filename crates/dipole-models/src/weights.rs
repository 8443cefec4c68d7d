//! Reading Hugging Face safetensors checkpoints (single file or sharded with an index) by tensor
//! name, with every dtype converted to f32 and every shape checked.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::SafeTensorError;
use safetensors::tensor::{Dtype, Metadata, SafeTensors, TensorInfo};
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

    /// The dtype `name` is stored in, if present and one dipole reads.
    pub fn dtype(&self, name: &str) -> Option<burn::tensor::DType> {
        let shard = &self.shards[*self.names.get(name)?];
        match shard.metadata.tensors().get(name)?.dtype {
            Dtype::F32 => Some(burn::tensor::DType::F32),
            Dtype::BF16 => Some(burn::tensor::DType::BF16),
            Dtype::F16 => Some(burn::tensor::DType::F16),
            Dtype::F64 => Some(burn::tensor::DType::F64),
            _ => None,
        }
    }

    /// Reads `name` as f32 values in row-major order, checking it has shape `expected`. The
    /// tensor's pages of the memory-mapped file are released once decoded, so reading a whole
    /// checkpoint never holds the file's pages beside the decoded values.
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
        let (values, non_finite) = decode_f32(bytes, info.dtype).ok_or_else(|| ModelError::Dtype {
            name: name.to_string(),
            path: shard.path.clone(),
            dtype: format!("{:?}", info.dtype),
        })?;
        if non_finite > 0 {
            let (index, value) = first_non_finite(&values, bytes, info.dtype);
            return Err(ModelError::NonFinite {
                path: shard.path.clone(),
                name: name.to_string(),
                count: non_finite,
                index,
                value,
            });
        }
        release(&shard.map, shard.data_start + begin, end - begin);
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

/// Drops `len` bytes from `offset` of a read-only file mapping from this process's memory (the
/// whole pages inside the range; the kernel reads them again from the file if they are touched).
fn release(map: &Mmap, offset: usize, len: usize) {
    #[cfg(unix)]
    {
        // a multiple of every page size Linux uses (4, 16 and 64 KiB), so the range is aligned
        const PAGE: usize = 1 << 16;
        let start = offset.div_ceil(PAGE) * PAGE;
        let end = (offset + len) / PAGE * PAGE;
        if end > start {
            // SAFETY: the mapping is read-only and file-backed, so dropping its pages loses nothing
            // (they are read again from the file on access), and no borrow into the range is alive:
            // the tensor's bytes were decoded into an owned vector before this call.
            let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
        }
    }
    #[cfg(not(unix))]
    let _ = (map, offset, len);
}

/// Little-endian safetensors data of `dtype` (F32, BF16, F16 or F64) as f32 values, with the
/// number of non-finite results counted in the same pass (a branch-free sum, so a healthy
/// checkpoint pays nothing measurable for the check). `None` for any other dtype.
fn decode_f32(bytes: &[u8], dtype: Dtype) -> Option<(Vec<f32>, usize)> {
    fn convert<const N: usize>(bytes: &[u8], to_f32: impl Fn([u8; N]) -> f32) -> (Vec<f32>, usize) {
        let mut non_finite = 0;
        let values = bytes
            .chunks_exact(N)
            .map(|c| {
                let v = to_f32(c.try_into().expect("chunks_exact yields N bytes"));
                non_finite += usize::from(!v.is_finite());
                v
            })
            .collect();
        (values, non_finite)
    }
    Some(match dtype {
        Dtype::F32 => convert(bytes, f32::from_le_bytes),
        Dtype::BF16 => convert(bytes, |b| half::bf16::from_le_bytes(b).to_f32()),
        Dtype::F16 => convert(bytes, |b| half::f16::from_le_bytes(b).to_f32()),
        // Rounds to f32; a finite f64 beyond f32's range becomes infinite and is counted too.
        Dtype::F64 => convert(bytes, |b| f64::from_le_bytes(b) as f32),
        _ => return None,
    })
}

/// The first non-finite value of a tensor known to have one, as it reads in the file. Runs only
/// on the error path.
fn first_non_finite(values: &[f32], bytes: &[u8], dtype: Dtype) -> (usize, String) {
    let index = values.iter().position(|v| !v.is_finite()).expect("caller counted a non-finite value");
    let value = values[index];
    if dtype == Dtype::F64 {
        let stored = f64::from_le_bytes(bytes[8 * index..8 * index + 8].try_into().expect("8 bytes"));
        if stored.is_finite() {
            return (index, format!("{stored:e}, beyond f32's range"));
        }
    }
    (index, value.to_string())
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
    // read_metadata validates the whole layout (offsets tile the data section, which the file
    // holds exactly), so the slices taken later cannot fall outside the map.
    let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| ModelError::Safetensors {
        path: path.to_path_buf(),
        message: explain(&map, e),
    })?;
    Ok(Shard {
        path: path.to_path_buf(),
        data_start: 8 + header_len,
        map,
        metadata,
    })
}

/// The safetensors crate's error made specific: the crate's layout errors do not say which tensor
/// (or only name it), nor where the bytes ran out, so the header is re-read to say both.
fn explain(file: &[u8], e: SafeTensorError) -> String {
    let header_len = file.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    match (&e, header_len) {
        (SafeTensorError::HeaderTooSmall, _) => {
            format!("the file is {} bytes, too short for the 8-byte header length", file.len())
        }
        (SafeTensorError::InvalidHeaderLength, Some(n)) => format!(
            "the header length says {n} bytes but only {} follow it (truncated file?)",
            file.len() - 8
        ),
        (SafeTensorError::HeaderTooLarge, Some(n)) => {
            format!("the header length says {n} bytes, over safetensors' 100 MB limit (not a safetensors file?)")
        }
        (
            SafeTensorError::InvalidOffset(_)
            | SafeTensorError::TensorInvalidInfo
            | SafeTensorError::MetadataIncompleteBuffer
            | SafeTensorError::ValidationOverflow
            | SafeTensorError::MisalignedSlice,
            Some(n),
        ) => explain_layout(file, n as usize).unwrap_or_else(|| e.to_string()),
        _ => e.to_string(),
    }
}

/// Walks the header's tensors in offset order as the safetensors crate validates them, naming the
/// first tensor that breaks the layout. `None` when the header cannot be re-read (the crate's own
/// message is used then).
fn explain_layout(file: &[u8], header_len: usize) -> Option<String> {
    let header = std::str::from_utf8(file.get(8..8 + header_len)?).ok()?;
    let mut entries: BTreeMap<String, serde_json::Value> = serde_json::from_str(header).ok()?;
    entries.remove("__metadata__");
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        let info: TensorInfo = serde_json::from_value(value).ok()?;
        tensors.push((name, info));
    }
    // Name order breaks ties so the same file always names the same tensor.
    tensors.sort_by(|(an, a), (bn, b)| a.data_offsets.cmp(&b.data_offsets).then_with(|| an.cmp(bn)));
    let mut end = 0;
    for (name, info) in &tensors {
        let (begin, stop) = info.data_offsets;
        if stop < begin {
            return Some(format!("tensor {name:?} has data_offsets [{begin}, {stop}], which end before they begin"));
        }
        if begin != end {
            return Some(format!(
                "tensor {name:?} has data_offsets [{begin}, {stop}], expected them to start at byte {end} \
                 (each tensor's data follows the previous one's, without gaps or overlaps)"
            ));
        }
        let bits = info
            .shape
            .iter()
            .try_fold(info.dtype.bitsize(), |acc, &d| acc.checked_mul(d));
        let Some(bits) = bits else {
            return Some(format!("tensor {name:?} has shape {:?}, too large to address", info.shape));
        };
        if bits % 8 != 0 {
            return Some(format!(
                "tensor {name:?} has dtype {:?} and shape {:?}, which is not a whole number of bytes",
                info.dtype, info.shape
            ));
        }
        let bytes = bits / 8;
        if stop - begin != bytes {
            return Some(format!(
                "tensor {name:?} has dtype {:?} and shape {:?} ({bytes} bytes) but data_offsets [{begin}, {stop}] ({} bytes)",
                info.dtype,
                info.shape,
                stop - begin
            ));
        }
        end = stop;
    }
    let data_len = file.len() - 8 - header_len;
    if end > data_len {
        let (name, info) = tensors.iter().find(|(_, info)| info.data_offsets.1 > data_len)?;
        let (begin, stop) = info.data_offsets;
        return Some(format!(
            "the data section holds {data_len} bytes but the header places tensor data up to byte {end} \
             (truncated file?); tensor {name:?} (data_offsets [{begin}, {stop}]) is the first that does not fit"
        ));
    }
    if end < data_len {
        return Some(format!(
            "{} bytes after the last tensor's data (the header's data_offsets end at byte {end} of {data_len})",
            data_len - end
        ));
    }
    None
}
