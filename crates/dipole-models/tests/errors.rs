//! A broken checkpoint is an error that names what is wrong: the file, the tensor or key, and what
//! was expected. Each case asserts the whole message, with the temporary folder shown as `<dir>`.

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use dipole_models::{CausalLm, ModelError};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde_json::{Map, Value, json};

fn tiny_llama() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-llama")
}

/// One tensor of a checkpoint as the tests edit it.
struct Entry {
    name: String,
    shape: Vec<usize>,
    dtype: Dtype,
    data: Vec<u8>,
}

/// A copy of tiny-llama whose tensors (all F32 in the fixture) went through `edit`.
fn edited_copy(edit: impl FnOnce(&mut Vec<Entry>)) -> tempfile::TempDir {
    let src = tiny_llama();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<Entry> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| Entry { name, shape: v.shape().to_vec(), dtype: v.dtype(), data: v.data().to_vec() })
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|t| (t.name.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    dir
}

fn entry<'a>(tensors: &'a mut [Entry], name: &str) -> &'a mut Entry {
    tensors.iter_mut().find(|t| t.name == name).unwrap()
}

fn f32_values(t: &Entry) -> Vec<f32> {
    assert_eq!(t.dtype, Dtype::F32);
    t.data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// Overwrites element `index` of an F32 tensor.
fn set_f32(tensors: &mut [Entry], name: &str, index: usize, value: f32) {
    entry(tensors, name).data[4 * index..4 * index + 4].copy_from_slice(&value.to_le_bytes());
}

/// A copy of tiny-llama whose `config.json` went through `edit`.
fn config_copy(edit: impl FnOnce(&mut Map<String, Value>)) -> tempfile::TempDir {
    let dir = edited_copy(|_| {});
    let path = dir.path().join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(config.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    dir
}

/// Rewrites the JSON header of `dir/model.safetensors`, keeping the data section as it is.
fn edit_header(dir: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(header.as_object_mut().unwrap());
    let text = serde_json::to_string(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&path, out).unwrap();
}

fn offsets(info: &Value) -> (u64, u64) {
    let o = info["data_offsets"].as_array().unwrap();
    (o[0].as_u64().unwrap(), o[1].as_u64().unwrap())
}

fn load_err(dir: &Path) -> ModelError {
    match CausalLm::<Flex>::load(dir, &Default::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

/// The error's message with the temporary folder written as `<dir>`.
fn message(dir: &tempfile::TempDir, err: impl std::fmt::Display) -> String {
    err.to_string().replace(&dir.path().display().to_string(), "<dir>")
}

fn load_message(dir: &tempfile::TempDir) -> String {
    message(dir, load_err(dir.path()))
}

// --- tensors: names, shapes, dtypes -----------------------------------------------------------

#[test]
fn wrong_shape_names_the_tensor_and_both_shapes() {
    let dir = edited_copy(|t| entry(t, "model.layers.1.self_attn.q_proj.weight").shape = vec![32, 128]);
    assert_eq!(
        load_message(&dir),
        "tensor \"model.layers.1.self_attn.q_proj.weight\" in <dir>/model.safetensors has shape [32, 128], expected [64, 64]"
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = edited_copy(|t| t.retain(|x| x.name != "model.layers.0.mlp.down_proj.weight"));
    let err = load_err(dir.path());
    assert!(matches!(err, ModelError::MissingTensor { .. }), "{err:?}");
    assert_eq!(
        message(&dir, err),
        "missing tensor \"model.layers.0.mlp.down_proj.weight\" (expected shape [64, 176]) in <dir>"
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let dir = edited_copy(|t| {
        t.push(Entry { name: "model.layers.0.self_attn.rogue.weight".into(), shape: vec![2], dtype: Dtype::F32, data: vec![0; 8] })
    });
    assert_eq!(
        load_message(&dir),
        "unexpected tensors in <dir> (not part of a llama model): [\"model.layers.0.self_attn.rogue.weight\"]"
    );
}

#[test]
fn integer_tensor_names_its_dtype_and_the_accepted_ones() {
    let dir = edited_copy(|t| {
        let norm = entry(t, "model.norm.weight");
        norm.dtype = Dtype::I64;
        norm.data = vec![0; 64 * 8];
    });
    let err = load_err(dir.path());
    assert!(matches!(err, ModelError::Dtype { .. }), "{err:?}");
    assert_eq!(
        message(&dir, err),
        "tensor \"model.norm.weight\" in <dir>/model.safetensors has dtype I64; dipole reads F32, F16, BF16 and F64"
    );
}

#[test]
fn byte_tensor_names_its_dtype() {
    let dir = edited_copy(|t| {
        let embed = entry(t, "model.embed_tokens.weight");
        embed.dtype = Dtype::U8;
        embed.data = vec![1; 512 * 64];
    });
    assert_eq!(
        load_message(&dir),
        "tensor \"model.embed_tokens.weight\" in <dir>/model.safetensors has dtype U8; dipole reads F32, F16, BF16 and F64"
    );
}

// --- non-finite weights -----------------------------------------------------------------------

#[test]
fn nan_weights_name_the_tensor_the_count_and_the_first() {
    let name = "model.layers.0.mlp.up_proj.weight";
    let dir = edited_copy(|t| {
        set_f32(t, name, 17, f32::NAN);
        set_f32(t, name, 40, f32::INFINITY);
        set_f32(t, name, 1000, f32::NEG_INFINITY);
    });
    let err = load_err(dir.path());
    assert!(matches!(err, ModelError::NonFinite { count: 3, index: 17, .. }), "{err:?}");
    assert_eq!(
        message(&dir, err),
        "<dir>/model.safetensors: tensor \"model.layers.0.mlp.up_proj.weight\" has 3 non-finite values (first at element 17: NaN)"
    );
}

#[test]
fn infinite_bf16_weight_is_caught_while_converting() {
    let name = "model.layers.1.self_attn.o_proj.weight";
    let dir = edited_copy(|t| {
        let o = entry(t, name);
        let mut values = f32_values(o);
        values[5] = f32::NEG_INFINITY;
        o.dtype = Dtype::BF16;
        o.data = values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
    });
    assert_eq!(
        load_message(&dir),
        "<dir>/model.safetensors: tensor \"model.layers.1.self_attn.o_proj.weight\" has 1 non-finite value (first at element 5: -inf)"
    );
}

#[test]
fn f64_weight_beyond_f32_range_is_non_finite() {
    let name = "model.layers.0.input_layernorm.weight";
    let dir = edited_copy(|t| {
        let norm = entry(t, name);
        let mut values: Vec<f64> = f32_values(norm).into_iter().map(f64::from).collect();
        values[3] = 1e300;
        norm.dtype = Dtype::F64;
        norm.data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    });
    assert_eq!(
        load_message(&dir),
        "<dir>/model.safetensors: tensor \"model.layers.0.input_layernorm.weight\" has 1 non-finite value (first at element 3: 1e300, beyond f32's range)"
    );
}

#[test]
fn nan_in_an_adapter_names_the_adapter_tensor() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/goldens/tiny-llama/standard/lora_random");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("adapter_config.json"), dir.path().join("adapter_config.json")).unwrap();
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight";
    let mut tensors: Vec<(String, TensorView)> = st.tensors();
    let view = &tensors.iter().find(|(n, _)| n == key).unwrap().1;
    let mut data = view.data().to_vec();
    data[4 * 9..4 * 9 + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let shape = view.shape().to_vec();
    tensors.retain(|(n, _)| n != key);
    tensors.push((key.to_string(), TensorView::new(Dtype::F32, shape, &data).unwrap()));
    safetensors::serialize_to_file(tensors, None, &dir.path().join("adapter_model.safetensors")).unwrap();

    let (mut model, _) = CausalLm::<Flex>::load(tiny_llama(), &Default::default()).unwrap();
    let err = model.load_adapter(dir.path()).unwrap_err();
    assert_eq!(
        message(&dir, &err),
        "<dir>/adapter_model.safetensors: tensor \"base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight\" has 1 non-finite value (first at element 9: NaN)"
    );
    let err = model.load_reference_adapter(dir.path()).unwrap_err();
    assert!(message(&dir, &err).ends_with("(first at element 9: NaN)"), "{err}");
}

// --- the safetensors layout -------------------------------------------------------------------

#[test]
fn truncated_file_names_the_tensor_cut_off() {
    let dir = edited_copy(|_| {});
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(dir.path());
    assert!(matches!(err, ModelError::Safetensors { .. }), "{err:?}");
    assert_eq!(
        message(&dir, err),
        "<dir>/model.safetensors: not a valid safetensors file: the data section holds 314972 bytes but the header places tensor data up to byte 632064 (truncated file?); tensor \"model.layers.0.mlp.gate_proj.weight\" (data_offsets [307456, 352512]) is the first that does not fit"
    );
}

#[test]
fn truncated_header_is_named() {
    let dir = edited_copy(|_| {});
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..100]).unwrap();
    assert_eq!(
        load_message(&dir),
        "<dir>/model.safetensors: not a valid safetensors file: the header length says 2112 bytes but only 92 follow it (truncated file?)"
    );
}

#[test]
fn offsets_past_the_end_of_the_file_name_the_tensor() {
    let dir = edited_copy(|_| {});
    // The tensor stored last claims twice the rows, so its data would run past the file's end.
    edit_header(dir.path(), |h| {
        let (name, _) = h.iter().filter(|(k, _)| *k != "__metadata__").max_by_key(|(_, v)| offsets(v).1).unwrap();
        let name = name.clone();
        let info = &mut h[&name];
        let (begin, end) = offsets(info);
        info["shape"][0] = json!(info["shape"][0].as_u64().unwrap() * 2);
        info["data_offsets"] = json!([begin, begin + 2 * (end - begin)]);
    });
    assert_eq!(
        load_message(&dir),
        "<dir>/model.safetensors: not a valid safetensors file: the data section holds 632064 bytes but the header places tensor data up to byte 632320 (truncated file?); tensor \"model.norm.weight\" (data_offsets [631808, 632320]) is the first that does not fit"
    );
}

#[test]
fn offsets_with_a_gap_name_the_tensor() {
    let dir = edited_copy(|_| {});
    edit_header(dir.path(), |h| {
        let info = &mut h["model.norm.weight"];
        let (begin, end) = offsets(info);
        info["data_offsets"] = json!([begin + 4, end + 4]);
    });
    assert_eq!(
        load_message(&dir),
        "<dir>/model.safetensors: not a valid safetensors file: tensor \"model.norm.weight\" has data_offsets [631812, 632068], expected them to start at byte 631808 (each tensor's data follows the previous one's, without gaps or overlaps)"
    );
}

#[test]
fn offsets_that_disagree_with_the_shape_name_the_tensor() {
    let dir = edited_copy(|_| {});
    edit_header(dir.path(), |h| h["model.layers.0.post_attention_layernorm.weight"]["shape"] = json!([32]));
    assert_eq!(
        load_message(&dir),
        "<dir>/model.safetensors: not a valid safetensors file: tensor \"model.layers.0.post_attention_layernorm.weight\" has dtype F32 and shape [32] (128 bytes) but data_offsets [397568, 397824] (256 bytes)"
    );
}

#[test]
fn bytes_after_the_last_tensor_are_an_error() {
    let dir = edited_copy(|_| {});
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(&[0; 12]);
    std::fs::write(&path, bytes).unwrap();
    assert_eq!(
        load_message(&dir),
        "<dir>/model.safetensors: not a valid safetensors file: 12 bytes after the last tensor's data (the header's data_offsets end at byte 632064 of 632076)"
    );
}

#[test]
fn no_weights_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(tiny_llama().join("config.json"), dir.path().join("config.json")).unwrap();
    let err = load_err(dir.path());
    assert!(matches!(err, ModelError::NoWeights { .. }), "{err:?}");
    assert_eq!(
        message(&dir, err),
        "<dir>: no weights found (expected model.safetensors or model.safetensors.index.json)"
    );
}

// --- config.json ------------------------------------------------------------------------------

fn config_message(edit: impl FnOnce(&mut Map<String, Value>)) -> String {
    let dir = config_copy(edit);
    let err = load_err(dir.path());
    assert!(matches!(err, ModelError::Config { .. } | ModelError::UnknownModelType { .. }), "{err:?}");
    message(&dir, err)
}

#[test]
fn unknown_model_type_is_named() {
    assert_eq!(
        config_message(|c| {
            c.insert("model_type".into(), json!("falcon"));
        }),
        "<dir>/config.json: unsupported model_type \"falcon\"; dipole supports \"llama\", \"mistral\" and \"qwen2\""
    );
}

#[test]
fn string_where_an_integer_belongs_names_the_key() {
    assert_eq!(
        config_message(|c| {
            c.insert("hidden_size".into(), json!("64"));
        }),
        "<dir>/config.json: key \"hidden_size\": expected an unsigned integer, found string \"64\""
    );
}

#[test]
fn fractional_head_count_names_the_key() {
    assert_eq!(
        config_message(|c| {
            c.insert("num_attention_heads".into(), json!(4.5));
        }),
        "<dir>/config.json: key \"num_attention_heads\": expected an unsigned integer, found number 4.5"
    );
}

#[test]
fn missing_vocab_size_names_the_key() {
    assert_eq!(
        config_message(|c| {
            c.remove("vocab_size");
        }),
        "<dir>/config.json: missing key \"vocab_size\" (expected an unsigned integer)"
    );
}

#[test]
fn bad_token_id_in_a_list_names_the_key_and_element() {
    assert_eq!(
        config_message(|c| {
            c.insert("eos_token_id".into(), json!([2, "3"]));
        }),
        "<dir>/config.json: key \"eos_token_id\": element 1: expected a token id, found string \"3\""
    );
}

#[test]
fn zero_sizes_name_the_key() {
    for key in ["vocab_size", "hidden_size"] {
        assert_eq!(
            config_message(|c| {
                c.insert(key.into(), json!(0));
            }),
            format!("<dir>/config.json: key \"{key}\": expected a positive integer, found 0")
        );
    }
}

#[test]
fn head_count_not_dividing_hidden_size_names_the_key() {
    assert_eq!(
        config_message(|c| {
            c.remove("head_dim");
            c.insert("num_attention_heads".into(), json!(3));
            c.insert("num_key_value_heads".into(), json!(1));
        }),
        "<dir>/config.json: key \"num_attention_heads\": expected a divisor of hidden_size (64) as no head_dim is given, found 3"
    );
}

#[test]
fn kv_heads_not_dividing_heads_names_the_key() {
    assert_eq!(
        config_message(|c| {
            c.insert("num_key_value_heads".into(), json!(3));
        }),
        "<dir>/config.json: key \"num_key_value_heads\": expected a divisor of num_attention_heads (4), found 3"
    );
}

#[test]
fn non_positive_rms_norm_eps_names_the_key() {
    assert_eq!(
        config_message(|c| {
            c.insert("rms_norm_eps".into(), json!(0.0));
        }),
        "<dir>/config.json: key \"rms_norm_eps\": expected a positive number, found 0.0"
    );
}

#[test]
fn non_positive_rope_theta_names_the_key_it_was_read_from() {
    assert_eq!(
        config_message(|c| c["rope_parameters"]["rope_theta"] = json!(-1.0)),
        "<dir>/config.json: key \"rope_parameters.rope_theta\": expected a positive number, found -1.0"
    );
    assert_eq!(
        config_message(|c| {
            c.remove("rope_parameters");
            c.insert("rope_theta".into(), json!(0));
        }),
        "<dir>/config.json: key \"rope_theta\": expected a positive number, found 0.0"
    );
}

#[test]
fn rope_scaling_factor_of_the_wrong_type_names_the_key() {
    assert_eq!(
        config_message(|c| {
            c.remove("rope_parameters");
            c.insert("rope_scaling".into(), json!({"type": "linear", "factor": "4"}));
        }),
        "<dir>/config.json: key \"rope_scaling.factor\": expected a positive number, found string \"4\""
    );
}

#[test]
fn a_built_in_shape_that_does_not_fit_is_an_error() {
    let shape = dipole_models::LlamaShape { num_attention_heads: 5, num_key_value_heads: 5, ..dipole_models::LlamaShape::BENCHMARK };
    let err = dipole_models::ModelConfig::llama(shape).unwrap_err().to_string();
    assert_eq!(err, "<built-in llama config>: key \"num_attention_heads\": expected a divisor of hidden_size (384) as no head_dim is given, found 5");
}
