//! Every class of bad model file gives its own error naming the file, and no input file
//! makes the loader panic.

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::*;
use llmos_models::synth::{self, Preset};
use llmos_models::{load, load_gguf, load_hf_dir, ModelError, Tokenizer};

fn path_of(e: &ModelError) -> Option<&Path> {
    match e {
        ModelError::MissingFile { path }
        | ModelError::Io { path, .. }
        | ModelError::Truncated { path, .. }
        | ModelError::Corrupt { path, .. }
        | ModelError::UnsupportedArchitecture { path, .. }
        | ModelError::UnsupportedTensorType { path, .. }
        | ModelError::MissingTensor { path, .. }
        | ModelError::ShapeMismatch { path, .. }
        | ModelError::Tokenizer { path, .. } => Some(path),
        _ => None,
    }
}

/// Loads `path`, expects an error naming `file`, and returns it.
fn fails(path: &Path, file: &Path) -> ModelError {
    let e = load(path, &Device::Cpu).expect_err("loading must fail");
    assert_eq!(path_of(&e), Some(file), "{e}");
    assert!(e.to_string().contains(&file.display().to_string()), "{e}");
    e
}

fn tiny_gguf(dir: &Path) -> PathBuf {
    let p = dir.join("tiny.gguf");
    synth::write_gguf(&p, &Preset::TINY, GgmlDType::F32, 5).unwrap();
    p
}

fn tiny_hf(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    synth::write_hf_dir(&p, &Preset::TINY, 5).unwrap();
    p
}

fn write_truncated(src: &Path, dst: &Path, len: usize) {
    let bytes = std::fs::read(src).unwrap();
    std::fs::write(dst, &bytes[..len.min(bytes.len())]).unwrap();
}

#[test]
fn missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = dir.path().join("nope.gguf");
    assert!(matches!(
        fails(&nowhere, &nowhere),
        ModelError::MissingFile { .. }
    ));
    let hf = tiny_hf(dir.path(), "hf");
    for file in ["tokenizer.json", "config.json", "model.safetensors"] {
        let d = dir.path().join(format!("without-{file}"));
        std::fs::create_dir(&d).unwrap();
        for f in std::fs::read_dir(&hf).unwrap() {
            let f = f.unwrap().path();
            if f.file_name().unwrap() != file {
                std::fs::copy(&f, d.join(f.file_name().unwrap())).unwrap();
            }
        }
        assert!(matches!(
            fails(&d, &d.join(file)),
            ModelError::MissingFile { .. }
        ));
    }
    assert!(matches!(
        load_hf_dir(&nowhere, &Device::Cpu),
        Err(ModelError::MissingFile { .. })
    ));
}

#[test]
fn truncated_files() {
    let dir = tempfile::tempdir().unwrap();
    let src = stories_gguf();
    let full = std::fs::metadata(&src).unwrap().len() as usize;
    // Inside the magic, inside the metadata, inside the tensor data.
    for len in [0, 6, 5000, full - 1000] {
        let p = dir.path().join(format!("cut-{len}.gguf"));
        write_truncated(&src, &p, len);
        let e = fails(&p, &p);
        assert!(matches!(e, ModelError::Truncated { .. }), "at {len}: {e}");
        if len == full - 1000 {
            assert!(
                e.to_string().contains("output.weight"),
                "names the tensor: {e}"
            );
        }
    }
    let good = tiny_hf(dir.path(), "good");
    let hf = tiny_hf(dir.path(), "hf");
    let st = hf.join("model.safetensors");
    let full = std::fs::metadata(&st).unwrap().len() as usize;
    for len in [4, 100, full - 7] {
        write_truncated(&good.join("model.safetensors"), &st, len);
        let e = fails(&hf, &st);
        assert!(matches!(e, ModelError::Truncated { .. }), "at {len}: {e}");
    }
}

#[test]
fn corrupt_headers_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let src = tiny_gguf(dir.path());
    let bytes = std::fs::read(&src).unwrap();
    // Bad magic.
    let p = dir.path().join("magic.gguf");
    let mut b = bytes.clone();
    b[..4].copy_from_slice(b"GGXX");
    std::fs::write(&p, &b).unwrap();
    assert!(matches!(fails(&p, &p), ModelError::Corrupt { .. }));
    // A metadata value type that does not exist (the first key's type field).
    let p = dir.path().join("vtype.gguf");
    let mut b = bytes.clone();
    let key_len = u64::from_le_bytes(b[24..32].try_into().unwrap()) as usize;
    b[32 + key_len..36 + key_len].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    assert!(matches!(fails(&p, &p), ModelError::Corrupt { .. }));
    // An alignment of 0 makes candle's parser divide by zero: still just an error.
    let p = dir.path().join("align.gguf");
    rewrite_gguf(&src, &p, |md, _| {
        md.push(("general.alignment".into(), Value::U32(0)))
    });
    assert!(matches!(fails(&p, &p), ModelError::Corrupt { .. }));
    // Nonsense hyper-parameters.
    let p = dir.path().join("heads.gguf");
    rewrite_gguf(&src, &p, |md, _| {
        md.retain(|(k, _)| k != "llama.attention.head_count");
        md.push(("llama.attention.head_count".into(), Value::U32(3)));
    });
    assert!(matches!(fails(&p, &p), ModelError::Corrupt { .. }));
    let p = dir.path().join("nolayers.gguf");
    rewrite_gguf(&src, &p, |md, _| {
        md.retain(|(k, _)| k != "llama.block_count")
    });
    let e = fails(&p, &p);
    assert!(e.to_string().contains("llama.block_count"), "{e}");
    // A tokenizer whose arrays disagree.
    let p = dir.path().join("tok.gguf");
    rewrite_gguf(&src, &p, |md, _| {
        md.retain(|(k, _)| k != "tokenizer.ggml.scores");
        md.push((
            "tokenizer.ggml.scores".into(),
            Value::Array(vec![Value::F32(0.0)]),
        ));
    });
    assert!(matches!(fails(&p, &p), ModelError::Tokenizer { .. }));

    let hf = tiny_hf(dir.path(), "hf");
    let cfg = hf.join("config.json");
    let good = std::fs::read(&cfg).unwrap();
    std::fs::write(&cfg, b"{ not json").unwrap();
    assert!(matches!(fails(&hf, &cfg), ModelError::Corrupt { .. }));
    std::fs::write(&cfg, &good).unwrap();
    let tok = hf.join("tokenizer.json");
    std::fs::write(&tok, b"{\"model\": 3}").unwrap();
    assert!(matches!(fails(&hf, &tok), ModelError::Tokenizer { .. }));
    std::fs::copy(tiny_hf(dir.path(), "fresh").join("tokenizer.json"), &tok).unwrap();
    let st = hf.join("model.safetensors");
    let mut b = std::fs::read(&st).unwrap();
    b[8] = b'[';
    std::fs::write(&st, &b).unwrap();
    assert!(matches!(fails(&hf, &st), ModelError::Corrupt { .. }));
}

#[test]
fn unsupported_architectures() {
    let dir = tempfile::tempdir().unwrap();
    let src = tiny_gguf(dir.path());
    let p = dir.path().join("gpt2.gguf");
    rewrite_gguf(&src, &p, |md, _| {
        md.retain(|(k, _)| k != "general.architecture");
        md.push(("general.architecture".into(), Value::String("gpt2".into())));
    });
    let e = fails(&p, &p);
    assert!(
        matches!(e, ModelError::UnsupportedArchitecture { .. }) && e.to_string().contains("gpt2")
    );
    let p = dir.path().join("partial-rope.gguf");
    rewrite_gguf(&src, &p, |md, _| {
        md.retain(|(k, _)| k != "llama.rope.dimension_count");
        md.push(("llama.rope.dimension_count".into(), Value::U32(8)));
    });
    assert!(matches!(
        fails(&p, &p),
        ModelError::UnsupportedArchitecture { .. }
    ));

    let hf = tiny_hf(dir.path(), "hf");
    let cfg = hf.join("config.json");
    let good: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    for (key, value) in [
        ("architectures", serde_json::json!(["GPT2LMHeadModel"])),
        ("architectures", serde_json::json!(["Qwen2ForCausalLM"])),
        (
            "rope_scaling",
            serde_json::json!({"type": "llama3", "factor": 8.0}),
        ),
        ("hidden_act", serde_json::json!("gelu")),
    ] {
        let mut c = good.clone();
        c[key] = value;
        std::fs::write(&cfg, serde_json::to_vec(&c).unwrap()).unwrap();
        let e = fails(&hf, &cfg);
        assert!(
            matches!(e, ModelError::UnsupportedArchitecture { .. }),
            "{key}: {e}"
        );
    }
    // Mistral is Llama with a window: accepted, context capped at the window.
    let mut c = good.clone();
    c["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    c["sliding_window"] = serde_json::json!(128);
    std::fs::write(&cfg, serde_json::to_vec(&c).unwrap()).unwrap();
    let m = load_hf_dir(&hf, &Device::Cpu).unwrap();
    assert_eq!(m.model.config().max_seq_len, 128);
}

/// Offset of the dtype field of tensor `name` in a GGUF v2 file written by candle.
fn dtype_field(bytes: &[u8], name: &str) -> usize {
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend_from_slice(name.as_bytes());
    let at = bytes
        .windows(key.len())
        .position(|w| w == key.as_slice())
        .unwrap();
    let after_name = at + key.len();
    let n_dims = u32::from_le_bytes(bytes[after_name..after_name + 4].try_into().unwrap()) as usize;
    after_name + 4 + 8 * n_dims
}

#[test]
fn unsupported_tensor_types() {
    let dir = tempfile::tempdir().unwrap();
    let src = tiny_gguf(dir.path());
    let bytes = std::fs::read(&src).unwrap();
    let field = dtype_field(&bytes, "blk.1.attn_v.weight");
    // Q8_1 exists in ggml but only as an activation type.
    for (id, tensor) in [(9u32, "blk.1.attn_v.weight"), (31, "?")] {
        let p = dir.path().join(format!("type{id}.gguf"));
        let mut b = bytes.clone();
        b[field..field + 4].copy_from_slice(&id.to_le_bytes());
        std::fs::write(&p, &b).unwrap();
        match fails(&p, &p) {
            ModelError::UnsupportedTensorType { tensor: t, .. } => assert_eq!(t, tensor),
            e => panic!("type {id}: {e}"),
        }
    }
    // f64 weights in a safetensors file.
    let hf = tiny_hf(dir.path(), "hf");
    let st = hf.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let name = "model.layers.0.mlp.up_proj.weight";
    let w = tensors[name].to_dtype(candle_core::DType::F64).unwrap();
    tensors.insert(name.into(), w);
    candle_core::safetensors::save(&tensors, &st).unwrap();
    match fails(&hf, &st) {
        ModelError::UnsupportedTensorType { tensor, dtype, .. } => {
            assert_eq!(tensor, name);
            assert_eq!(dtype, "F64");
        }
        e => panic!("{e}"),
    }
}

#[test]
fn missing_tensors_and_shape_mismatches() {
    let dir = tempfile::tempdir().unwrap();
    let src = tiny_gguf(dir.path());
    let p = dir.path().join("missing.gguf");
    rewrite_gguf(&src, &p, |_, ts| {
        ts.retain(|(n, _)| n != "blk.2.ffn_up.weight")
    });
    match fails(&p, &p) {
        ModelError::MissingTensor { tensor, .. } => assert_eq!(tensor, "blk.2.ffn_up.weight"),
        e => panic!("{e}"),
    }
    let p = dir.path().join("shape.gguf");
    rewrite_gguf(&src, &p, |_, ts| {
        let t = Tensor::zeros((64, 96), candle_core::DType::F32, &Device::Cpu).unwrap();
        for (n, q) in ts.iter_mut() {
            if n == "blk.0.attn_k.weight" {
                *q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
            }
        }
    });
    match fails(&p, &p) {
        ModelError::ShapeMismatch {
            tensor,
            expected,
            found,
            ..
        } => {
            assert_eq!(tensor, "blk.0.attn_k.weight");
            assert_eq!((expected, found), (vec![32, 64], vec![64, 96]));
        }
        e => panic!("{e}"),
    }

    let hf = tiny_hf(dir.path(), "hf");
    let st = hf.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    tensors.remove("model.norm.weight");
    candle_core::safetensors::save(&tensors, &st).unwrap();
    match fails(&hf, &hf) {
        ModelError::MissingTensor { tensor, .. } => assert_eq!(tensor, "model.norm.weight"),
        e => panic!("{e}"),
    }
    let hf = tiny_hf(dir.path(), "hf");
    let cfg = hf.join("config.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    c["intermediate_size"] = serde_json::json!(160);
    std::fs::write(&cfg, serde_json::to_vec(&c).unwrap()).unwrap();
    match fails(&hf, &hf.join("model.safetensors")) {
        ModelError::ShapeMismatch { tensor, .. } => {
            assert_eq!(tensor, "model.layers.0.mlp.gate_proj.weight")
        }
        e => panic!("{e}"),
    }
}

/// Cuts and bit flips all over the header and metadata never panic, and a clean error
/// (not a model) comes back for every cut.
#[test]
fn no_panic_on_damaged_files() {
    let dir = tempfile::tempdir().unwrap();
    let src = tiny_gguf(dir.path());
    let bytes = std::fs::read(&src).unwrap();
    let content =
        candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(&bytes))
            .unwrap();
    let header = content.tensor_data_offset as usize;
    let p = dir.path().join("damaged.gguf");
    for len in (0..header).step_by(header / 150) {
        std::fs::write(&p, &bytes[..len]).unwrap();
        assert!(load_gguf(&p, &Device::Cpu).is_err(), "cut at {len}");
        assert!(Tokenizer::from_gguf_file(&p).is_err(), "cut at {len}");
    }
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..300 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut b = bytes.clone();
        let at = (state as usize) % header;
        b[at] ^= 1 << (state >> 59 & 7);
        std::fs::write(&p, &b).unwrap();
        // Either loads (a harmless flip, e.g. in a score) or errors; never panics.
        let _ = load_gguf(&p, &Device::Cpu);
    }
}
