//! Hugging Face checkpoint directories (Llama family): `config.json`, one or more
//! `*.safetensors` shards mapped read-only, `tokenizer.json`, and the chat template of
//! `tokenizer_config.json` (or `chat_template.jinja`) when there is one.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::chat::ChatTemplate;
use crate::config::{ModelConfig, RopeLayout, SourceFormat};
use crate::error::{ModelError, Result};
use crate::model::{compile_template, Parts};
use crate::progress::{LoadProgress, Tracker};
use crate::weights::{to_f32, vector, Fused, Layer, Linear, RawLinear, Weights};

/// The `config.json` fields a Llama-family model needs.
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    rms_norm_eps: Option<f64>,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: Option<bool>,
    #[serde(default)]
    sliding_window: Option<usize>,
    #[serde(default)]
    bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    eos_token_id: Option<serde_json::Value>,
}

/// First id of a `config.json` id field (a number, or a list as in Llama 3).
fn first_id(v: &Option<serde_json::Value>) -> Option<u32> {
    match v.as_ref()? {
        serde_json::Value::Number(n) => n.as_u64().and_then(|x| u32::try_from(x).ok()),
        serde_json::Value::Array(a) => first_id(&a.first().cloned()),
        _ => None,
    }
}

fn config(path: &Path, hf: &HfConfig) -> Result<ModelConfig> {
    let unsupported = |detail: String| ModelError::UnsupportedArchitecture {
        path: path.into(),
        detail,
    };
    let arch = hf
        .architectures
        .first()
        .cloned()
        .or_else(|| hf.model_type.clone())
        .unwrap_or_default();
    let mut max_seq_len = hf.max_position_embeddings.unwrap_or(2048);
    match arch.as_str() {
        "LlamaForCausalLM" | "llama" => {}
        "MistralForCausalLM" | "mistral" => {
            // Mistral is Llama plus a sliding attention window; within the window the two
            // are the same function, so cap the context there instead of masking.
            if let Some(w) = hf.sliding_window {
                max_seq_len = max_seq_len.min(w);
            }
        }
        "Qwen2ForCausalLM" | "qwen2" => {
            return Err(unsupported(format!(
                "{arch}: q/k/v projection biases are not implemented"
            )))
        }
        "" => return Err(unsupported("config.json names no architecture".into())),
        other => {
            return Err(unsupported(format!(
                "{other}; supported: LlamaForCausalLM, MistralForCausalLM"
            )))
        }
    }
    if hf.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(unsupported(format!(
            "{arch}: rope_scaling is not supported"
        )));
    }
    if hf.attention_bias == Some(true) || hf.mlp_bias == Some(true) {
        return Err(unsupported(format!(
            "{arch}: projection biases are not supported"
        )));
    }
    if let Some(act) = &hf.hidden_act {
        if act != "silu" {
            return Err(unsupported(format!(
                "{arch}: activation {act:?} (want silu)"
            )));
        }
    }
    let n_heads = hf.num_attention_heads;
    let head_dim = hf
        .head_dim
        .unwrap_or(hf.hidden_size.checked_div(n_heads).unwrap_or(0));
    let config = ModelConfig {
        architecture: arch,
        dim: hf.hidden_size,
        n_layers: hf.num_hidden_layers,
        n_heads,
        n_kv_heads: hf.num_key_value_heads.unwrap_or(n_heads),
        head_dim,
        ffn_dim: hf.intermediate_size,
        vocab_size: hf.vocab_size,
        max_seq_len,
        rope_theta: hf.rope_theta.unwrap_or(10_000.0) as f32,
        rms_eps: hf.rms_norm_eps.unwrap_or(1e-6) as f32,
        rope_layout: RopeLayout::HalfSplit,
        tied_embeddings: hf.tie_word_embeddings.unwrap_or(false),
        source: SourceFormat::HuggingFace,
        weight_type: String::new(),
    };
    config
        .validate()
        .map_err(|e| ModelError::corrupt(path, format!("invalid hyper-parameters: {e}")))?;
    Ok(config)
}

/// One entry of a safetensors header.
#[derive(Debug, Deserialize)]
struct StEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

/// Checks a shard's header against its length before candle maps it: candle reports
/// these cases as generic errors, we want "truncated" vs "corrupt" and the tensor name.
fn check_shard(path: &Path) -> Result<HashMap<String, StEntry>> {
    let map = crate::mmap::map_file(path)?;
    let truncated = |detail: String| ModelError::Truncated {
        path: path.into(),
        detail,
    };
    if map.len() < 8 {
        return Err(truncated(format!(
            "{} bytes, no safetensors header",
            map.len()
        )));
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&map[..8]);
    let n = u64::from_le_bytes(n);
    let header_end = usize::try_from(n)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&e| e <= map.len())
        .ok_or_else(|| truncated(format!("header of {n} bytes, file has {}", map.len())))?;
    let mut header: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&map[8..header_end])
            .map_err(|e| ModelError::corrupt(path, format!("safetensors header: {e}")))?;
    header.remove("__metadata__");
    let data_len = map.len() - header_end;
    let mut entries = HashMap::with_capacity(header.len());
    for (name, v) in header {
        let e: StEntry = serde_json::from_value(v)
            .map_err(|e| ModelError::corrupt(path, format!("safetensors entry {name}: {e}")))?;
        let [b, end] = e.data_offsets;
        if b > end {
            return Err(ModelError::corrupt(
                path,
                format!("tensor {name}: offsets {b} > {end}"),
            ));
        }
        if end > data_len {
            return Err(truncated(format!(
                "tensor {name} needs data bytes {b}..{end}, file has {data_len}"
            )));
        }
        entries.insert(name, e);
    }
    Ok(entries)
}

/// The shards of a checkpoint: the index's files, else `model.safetensors`, else every
/// `*.safetensors` in the directory.
fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let map = crate::mmap::map_file(&index)?;
        let v: serde_json::Value = serde_json::from_slice(&map)
            .map_err(|e| ModelError::corrupt(&index, format!("not JSON: {e}")))?;
        let files: BTreeSet<String> = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::corrupt(&index, "no weight_map object"))?
            .values()
            .map(|f| f.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| ModelError::corrupt(&index, "weight_map values must be file names"))?;
        return files
            .into_iter()
            .map(|f| {
                // Shard names are plain file names; refuse paths that would leave the dir.
                if f.contains('/') || f.contains('\\') || f == ".." {
                    Err(ModelError::corrupt(&index, format!("shard name {f:?}")))
                } else {
                    Ok(dir.join(f))
                }
            })
            .collect();
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    found.sort();
    if found.is_empty() {
        return Err(ModelError::MissingFile { path: single });
    }
    Ok(found)
}

struct Shards {
    files: Vec<(PathBuf, MmapedSafetensors, HashMap<String, StEntry>)>,
    route: HashMap<String, usize>,
    dir: PathBuf,
    device: Device,
}

impl Shards {
    fn open(dir: &Path, device: &Device) -> Result<Shards> {
        let mut files = Vec::new();
        let mut route = HashMap::new();
        for path in shard_paths(dir)? {
            let entries = check_shard(&path)?;
            let st = crate::mmap::map_safetensors(&path)
                .map_err(|e| ModelError::corrupt(&path, format!("safetensors: {e}")))?;
            for name in entries.keys() {
                route.insert(name.clone(), files.len());
            }
            files.push((path, st, entries));
        }
        Ok(Shards {
            files,
            route,
            dir: dir.into(),
            device: device.clone(),
        })
    }

    fn has(&self, name: &str) -> bool {
        self.route.contains_key(name)
    }

    /// A float tensor as stored (f32, f16 or bf16), after checking its type and shape.
    fn get(&self, name: &str, expected: &[usize]) -> Result<Tensor> {
        let &i = self
            .route
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.dir.clone(),
                tensor: name.into(),
            })?;
        let (path, st, entries) = &self.files[i];
        let entry = &entries[name];
        let dtype = match entry.dtype.as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            other => {
                return Err(ModelError::UnsupportedTensorType {
                    path: path.clone(),
                    tensor: name.into(),
                    dtype: other.into(),
                })
            }
        };
        if entry.shape != expected {
            return Err(ModelError::ShapeMismatch {
                path: path.clone(),
                tensor: name.into(),
                expected: expected.to_vec(),
                found: entry.shape.clone(),
            });
        }
        let view = st
            .get(name)
            .map_err(|e| ModelError::corrupt(path, format!("tensor {name}: {e}")))?;
        if view.data().len() != expected.iter().product::<usize>() * dtype.size_in_bytes() {
            return Err(ModelError::corrupt(
                path,
                format!(
                    "tensor {name}: {} data bytes for shape {expected:?}",
                    view.data().len()
                ),
            ));
        }
        Ok(Tensor::from_raw_buffer(
            view.data(),
            dtype,
            expected,
            &self.device,
        )?)
    }

    /// Stored bytes of `name` (0 when absent).
    fn stored_size(&self, name: &str) -> u64 {
        self.route.get(name).map_or(0, |&i| {
            let [b, e] = self.files[i].2[name].data_offsets;
            e.saturating_sub(b) as u64
        })
    }

    fn weight_type(&self, name: &str) -> String {
        self.route
            .get(name)
            .map(|&i| self.files[i].2[name].dtype.to_lowercase())
            .unwrap_or_default()
    }
}

/// A special token's text in `tokenizer_config.json`: a string, or an object whose
/// `content` is one (an `AddedToken`).
fn token_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The chat template of a checkpoint: `tokenizer_config.json`'s `chat_template` (a
/// string, or a list of `{name, template}` objects: the one named `default`, else the
/// first), else a `chat_template.jinja` file. BOS/EOS strings come from
/// `tokenizer_config.json`'s `bos_token`/`eos_token`, else from the tokenizer's vocabulary.
fn chat_template(dir: &Path, tokenizer: &crate::Tokenizer) -> Result<Option<ChatTemplate>> {
    let config_path = dir.join("tokenizer_config.json");
    let tc: serde_json::Value = if config_path.exists() {
        let map = crate::mmap::map_file(&config_path)?;
        serde_json::from_slice(&map)
            .map_err(|e| ModelError::corrupt(&config_path, format!("not JSON: {e}")))?
    } else {
        serde_json::Value::Null
    };
    let invalid = || {
        ModelError::corrupt(
            &config_path,
            "chat_template must be a string or a list of {name, template} objects",
        )
    };
    let mut source = match tc.get("chat_template") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some((config_path.clone(), s.clone())),
        Some(serde_json::Value::Array(list)) => {
            let named = |want: Option<&str>| {
                list.iter().find(|t| {
                    want.is_none_or(|w| t.get("name").and_then(|n| n.as_str()) == Some(w))
                })
            };
            let chosen = named(Some("default")).or_else(|| named(None));
            match chosen {
                None => None,
                Some(t) => Some((
                    config_path.clone(),
                    t.get("template")
                        .and_then(|s| s.as_str())
                        .ok_or_else(invalid)?
                        .to_string(),
                )),
            }
        }
        Some(_) => return Err(invalid()),
    };
    let jinja = dir.join("chat_template.jinja");
    if source.is_none() && jinja.exists() {
        let map = crate::mmap::map_file(&jinja)?;
        let text = std::str::from_utf8(&map)
            .map_err(|e| ModelError::corrupt(&jinja, format!("not UTF-8: {e}")))?
            .to_string();
        source = Some((jinja, text));
    }
    let Some((origin, source)) = source else {
        return Ok(None);
    };
    let special = |key: &str, id: u32| {
        token_text(tc.get(key))
            .or_else(|| tokenizer.token_text(id))
            .unwrap_or_default()
    };
    let bos = special("bos_token", tokenizer.bos_id());
    let eos = special("eos_token", tokenizer.eos_id());
    Ok(compile_template(&origin, Some(source), &bos, &eos))
}

/// The weight tensors `load` reads for `config`.
fn tensor_names(config: &ModelConfig, has_lm_head: bool) -> Vec<String> {
    let mut names = vec!["model.embed_tokens.weight".to_string()];
    for i in 0..config.n_layers {
        for s in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "input_layernorm",
            "self_attn.o_proj",
            "post_attention_layernorm",
            "mlp.down_proj",
        ] {
            names.push(format!("model.layers.{i}.{s}.weight"));
        }
    }
    names.push("model.norm.weight".into());
    if has_lm_head {
        names.push("lm_head.weight".into());
    }
    names
}

/// Loads a Hugging Face Llama-family directory onto `device`; `progress` is called after
/// each tensor.
pub(crate) fn load(dir: &Path, device: &Device, progress: &dyn Fn(LoadProgress)) -> Result<Parts> {
    if !dir.is_dir() {
        return Err(ModelError::MissingFile { path: dir.into() });
    }
    let config_path = dir.join("config.json");
    let map = crate::mmap::map_file(&config_path)?;
    let hf: HfConfig = serde_json::from_slice(&map)
        .map_err(|e| ModelError::corrupt(&config_path, format!("config.json: {e}")))?;
    let mut config = config(&config_path, &hf)?;
    let tokenizer = crate::Tokenizer::from_hf_file(
        dir.join("tokenizer.json"),
        first_id(&hf.bos_token_id),
        first_id(&hf.eos_token_id),
    )?;
    let chat_template = chat_template(dir, &tokenizer)?;
    let sh = Shards::open(dir, device)?;
    let expected = tensor_names(&config, sh.has("lm_head.weight"))
        .into_iter()
        .map(|n| {
            let size = sh.stored_size(&n);
            (n, size)
        })
        .collect();
    let tracker = Tracker::new(progress, expected);
    let get = |name: &str, shape: &[usize]| -> Result<Tensor> {
        let t = sh.get(name, shape)?;
        tracker.done(name);
        Ok(t)
    };
    let c = &config;
    let (dim, hd) = (c.dim, c.head_dim);
    let (qd, kvd) = (c.n_heads * hd, c.n_kv_heads * hd);
    let embed = get("model.embed_tokens.weight", &[c.vocab_size, dim])?;
    let mut layers = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        let name = |s: &str| format!("model.layers.{i}.{s}.weight");
        let lin = |s: &str, rows: usize, cols: usize| -> Result<RawLinear<'static>> {
            Ok(RawLinear::Dense(get(&name(s), &[rows, cols])?))
        };
        let qkv = vec![
            lin("self_attn.q_proj", qd, dim)?,
            lin("self_attn.k_proj", kvd, dim)?,
            lin("self_attn.v_proj", kvd, dim)?,
        ];
        let gate_up = vec![
            lin("mlp.gate_proj", c.ffn_dim, dim)?,
            lin("mlp.up_proj", c.ffn_dim, dim)?,
        ];
        layers.push(Layer {
            attn_norm: vector(get(&name("input_layernorm"), &[dim])?)?,
            qkv: Fused::build(qkv, device)?,
            wo: lin("self_attn.o_proj", dim, qd)?.into_linear(device)?,
            ffn_norm: vector(get(&name("post_attention_layernorm"), &[dim])?)?,
            gate_up: Fused::build(gate_up, device)?,
            down: lin("mlp.down_proj", dim, c.ffn_dim)?.into_linear(device)?,
        });
    }
    let norm = vector(get("model.norm.weight", &[dim])?)?;
    let embed = Arc::new(to_f32(embed)?.flatten_all()?.to_vec1::<f32>()?);
    let lm_head = if sh.has("lm_head.weight") {
        Linear::dense(&get("lm_head.weight", &[c.vocab_size, dim])?)?
    } else if c.tied_embeddings {
        Linear::shared(embed.clone(), c.vocab_size)
    } else {
        return Err(ModelError::MissingTensor {
            path: dir.into(),
            tensor: "lm_head.weight".into(),
        });
    };
    config.weight_type = sh.weight_type("model.layers.0.self_attn.q_proj.weight");
    if !sh.has("lm_head.weight") {
        config.tied_embeddings = true;
    }
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(ModelError::corrupt(
            dir.join("tokenizer.json"),
            format!(
                "tokenizer has {} tokens but the model's vocabulary only {}",
                tokenizer.vocab_size(),
                config.vocab_size
            ),
        ));
    }
    tracker.finish();
    Ok(Parts {
        config,
        weights: Weights {
            embed,
            layers,
            norm,
            lm_head,
        },
        tokenizer,
        chat_template,
    })
}
