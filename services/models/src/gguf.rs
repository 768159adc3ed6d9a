//! GGUF loading (llama architecture): header and metadata through candle's parser over a
//! read-only map, tensors sliced from the map with our own bounds, type and shape checks.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;

use crate::chat::ChatTemplate;
use crate::config::{ModelConfig, RopeLayout, SourceFormat};
use crate::error::{ModelError, Result};
use crate::model::{compile_template, Parts};
use crate::progress::{LoadProgress, Tracker};
use crate::weights::{aligned_for, to_f32, vector, Fused, Layer, Linear, RawLinear, Weights};

/// Parses the header and metadata of a GGUF file.
pub(crate) fn read_content(path: &Path) -> Result<Content> {
    let map = crate::mmap::map_file(path)?;
    parse(path, &map)
}

fn parse(path: &Path, map: &Mmap) -> Result<Content> {
    if map.len() < 8 {
        return Err(ModelError::Truncated {
            path: path.into(),
            detail: format!("{} bytes, not even a GGUF header", map.len()),
        });
    }
    // candle's parser is careful about lengths but divides by a file-supplied alignment;
    // a panic on a hostile file must still come back as an error.
    let parsed = catch_unwind(AssertUnwindSafe(|| {
        Content::read(&mut Cursor::new(&map[..]))
    }));
    match parsed {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(classify(path, e)),
        Err(_) => Err(ModelError::corrupt(path, "GGUF header parser panicked")),
    }
}

/// Maps a candle parse error to the error class it stands for.
fn classify(path: &Path, e: candle_core::Error) -> ModelError {
    let msg = e.to_string();
    let eof = matches!(&e, candle_core::Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof)
        || msg.contains("failed to fill whole buffer")
        || msg.contains("remaining");
    if eof {
        ModelError::Truncated {
            path: path.into(),
            detail: msg,
        }
    } else if let Some(id) = msg.strip_prefix("unknown dtype for tensor ") {
        ModelError::UnsupportedTensorType {
            path: path.into(),
            tensor: "?".into(),
            dtype: format!("ggml type id {}", id.trim()),
        }
    } else {
        ModelError::corrupt(path, msg)
    }
}

/// Typed access to GGUF metadata with errors that name the key.
struct Meta<'a> {
    path: &'a Path,
    md: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(v) => {
                let n = match *v {
                    Value::U8(x) => Some(u64::from(x)),
                    Value::U16(x) => Some(u64::from(x)),
                    Value::U32(x) => Some(u64::from(x)),
                    Value::U64(x) => Some(x),
                    Value::I8(x) => u64::try_from(x).ok(),
                    Value::I16(x) => u64::try_from(x).ok(),
                    Value::I32(x) => u64::try_from(x).ok(),
                    Value::I64(x) => u64::try_from(x).ok(),
                    _ => None,
                };
                n.and_then(|n| usize::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| {
                        ModelError::corrupt(self.path, format!("{key} = {v:?} is not a count"))
                    })
            }
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| ModelError::corrupt(self.path, format!("missing metadata {key}")))
    }

    fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        match self.md.get(key) {
            None => Ok(default),
            Some(Value::F32(x)) => Ok(*x),
            Some(Value::F64(x)) => Ok(*x as f32),
            Some(v) => Err(ModelError::corrupt(
                self.path,
                format!("{key} = {v:?} is not a float"),
            )),
        }
    }

    fn string(&self, key: &str) -> Option<&str> {
        match self.md.get(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }
}

/// Tensor lookup over the map, validating each tensor before handing out its bytes.
struct Tensors<'a> {
    path: &'a Path,
    content: &'a Content,
    map: &'a [u8],
    device: &'a Device,
    tracker: &'a Tracker<'a>,
}

fn ggml_name(t: GgmlDType) -> String {
    format!("{t:?}").to_lowercase()
}

impl<'a> Tensors<'a> {
    fn info(&self, name: &str) -> Result<&'a TensorInfo> {
        self.content
            .tensor_infos
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path.into(),
                tensor: name.into(),
            })
    }

    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The tensor's bytes, after checking type, shape, bounds and alignment.
    fn bytes(&self, name: &str, expected: &[usize]) -> Result<(GgmlDType, &'a [u8])> {
        let info = self.info(name)?;
        let dtype = info.ggml_dtype;
        if matches!(dtype, GgmlDType::Q8_1 | GgmlDType::Q8K) {
            // Activation-side types of ggml: no weight kernels exist for them.
            return Err(ModelError::UnsupportedTensorType {
                path: self.path.into(),
                tensor: name.into(),
                dtype: ggml_name(dtype),
            });
        }
        let dims = info.shape.dims();
        if dims != expected {
            return Err(ModelError::ShapeMismatch {
                path: self.path.into(),
                tensor: name.into(),
                expected: expected.to_vec(),
                found: dims.to_vec(),
            });
        }
        let corrupt =
            |detail: String| ModelError::corrupt(self.path, format!("tensor {name}: {detail}"));
        let cols = *dims.last().unwrap_or(&1);
        if cols % dtype.block_size() != 0 {
            return Err(corrupt(format!(
                "rows of {cols} values do not fill whole {} blocks of {}",
                ggml_name(dtype),
                dtype.block_size()
            )));
        }
        let size = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| (n / dtype.block_size()).checked_mul(dtype.type_size()))
            .ok_or_else(|| corrupt("size overflows".into()))?;
        let start = self
            .content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|s| usize::try_from(s).ok())
            .ok_or_else(|| corrupt("offset overflows".into()))?;
        let end = start
            .checked_add(size)
            .ok_or_else(|| corrupt("offset overflows".into()))?;
        if end > self.map.len() {
            return Err(ModelError::Truncated {
                path: self.path.into(),
                detail: format!(
                    "tensor {name} needs bytes {start}..{end}, file has {}",
                    self.map.len()
                ),
            });
        }
        let bytes = &self.map[start..end];
        if !aligned_for(dtype, bytes) {
            return Err(corrupt(format!("data at offset {start} is misaligned")));
        }
        Ok((dtype, bytes))
    }

    fn is_float(dtype: GgmlDType) -> Option<DType> {
        match dtype {
            GgmlDType::F32 => Some(DType::F32),
            GgmlDType::F16 => Some(DType::F16),
            GgmlDType::BF16 => Some(DType::BF16),
            _ => None,
        }
    }

    /// A projection weight `[rows, cols]`.
    fn linear(&self, name: &str, rows: usize, cols: usize) -> Result<RawLinear<'a>> {
        let (dtype, bytes) = self.bytes(name, &[rows, cols])?;
        let linear = match Self::is_float(dtype) {
            // Kept at its width: f16 projections stay f16 (see `DenseWeights`).
            Some(dt) => RawLinear::Dense(Tensor::from_raw_buffer(
                bytes,
                dt,
                &[rows, cols],
                self.device,
            )?),
            None => RawLinear::Quant {
                dtype,
                rows,
                cols,
                bytes: Cow::Borrowed(bytes),
            },
        };
        self.tracker.done(name);
        Ok(linear)
    }

    /// Any tensor as a dense f32 tensor (norms, embeddings).
    fn dense(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (dtype, bytes) = self.bytes(name, shape)?;
        let tensor = match Self::is_float(dtype) {
            Some(dt) => to_f32(Tensor::from_raw_buffer(bytes, dt, shape, self.device)?)?,
            None => {
                let rows = shape.iter().rev().skip(1).product();
                let cols = *shape.last().unwrap_or(&1);
                let q =
                    crate::weights::qtensor(dtype, rows, cols, Cow::Borrowed(bytes), self.device)?;
                q.dequantize(self.device)?.reshape(shape)?
            }
        };
        self.tracker.done(name);
        Ok(tensor)
    }
}

/// Reads the model configuration from llama metadata and tensor shapes.
fn config(path: &Path, content: &Content) -> Result<ModelConfig> {
    let meta = Meta {
        path,
        md: &content.metadata,
    };
    let arch = meta
        .string("general.architecture")
        .ok_or_else(|| ModelError::corrupt(path, "missing metadata general.architecture"))?
        .to_string();
    let unsupported = |detail: String| ModelError::UnsupportedArchitecture {
        path: path.into(),
        detail,
    };
    if arch != "llama" {
        return Err(unsupported(format!(
            "general.architecture is {arch:?}; only \"llama\" is supported"
        )));
    }
    let key = |k: &str| format!("{arch}.{k}");
    if meta.usize_opt(&key("expert_count"))?.unwrap_or(0) > 1 {
        return Err(unsupported(
            "mixture-of-experts llama is not supported".into(),
        ));
    }
    if let Some(kind) = meta.string(&key("rope.scaling.type")) {
        if kind != "none" {
            return Err(unsupported(format!(
                "rope scaling {kind:?} is not supported"
            )));
        }
    }
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(unsupported(
            "rope frequency factors (Llama 3.1 rope scaling) are not supported".into(),
        ));
    }
    if content.tensor_infos.contains_key("blk.0.attn_q.bias") {
        return Err(unsupported("attention biases are not supported".into()));
    }
    let dim = meta.usize(&key("embedding_length"))?;
    let n_layers = meta.usize(&key("block_count"))?;
    let n_heads = meta.usize(&key("attention.head_count"))?;
    let n_kv_heads = meta
        .usize_opt(&key("attention.head_count_kv"))?
        .unwrap_or(n_heads);
    let ffn_dim = meta.usize(&key("feed_forward_length"))?;
    let max_seq_len = meta.usize_opt(&key("context_length"))?.unwrap_or(2048);
    let rope_theta = meta.f32_or(&key("rope.freq_base"), 10_000.0)?;
    let rms_eps = meta.f32_or(&key("attention.layer_norm_rms_epsilon"), 1e-5)?;
    let head_dim = dim.checked_div(n_heads).unwrap_or(0);
    let embd = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| ModelError::MissingTensor {
            path: path.into(),
            tensor: "token_embd.weight".into(),
        })?;
    let declared_vocab = meta.usize_opt(&key("vocab_size"))?;
    let vocab_size = match embd.shape.dims() {
        [v, d] if *d == dim && declared_vocab.is_none_or(|n| n == *v) => *v,
        found => {
            return Err(ModelError::ShapeMismatch {
                path: path.into(),
                tensor: "token_embd.weight".into(),
                expected: vec![
                    declared_vocab.unwrap_or(found.first().copied().unwrap_or(0)),
                    dim,
                ],
                found: found.to_vec(),
            })
        }
    };
    let weight_type = content
        .tensor_infos
        .get("blk.0.attn_q.weight")
        .map_or_else(|| ggml_name(embd.ggml_dtype), |i| ggml_name(i.ggml_dtype));
    let config = ModelConfig {
        architecture: arch,
        dim,
        n_layers,
        n_heads,
        n_kv_heads,
        head_dim,
        ffn_dim,
        vocab_size,
        max_seq_len,
        rope_theta,
        rms_eps,
        rope_layout: RopeLayout::Interleaved,
        tied_embeddings: !content.tensor_infos.contains_key("output.weight"),
        source: SourceFormat::Gguf,
        weight_type,
    };
    config
        .validate()
        .map_err(|e| ModelError::corrupt(path, format!("invalid llama hyper-parameters: {e}")))?;
    if let Some(rot) = meta.usize_opt("llama.rope.dimension_count")? {
        if rot != head_dim {
            return Err(unsupported(format!(
                "partial rotary embedding ({rot} of {head_dim} dims) is not supported"
            )));
        }
    }
    Ok(config)
}

/// The chat template in `tokenizer.chat_template`, with BOS/EOS strings taken from
/// `tokenizer.ggml.tokens` at the tokenizer's BOS/EOS ids.
fn chat_template(
    path: &Path,
    md: &HashMap<String, Value>,
    tokenizer: &crate::Tokenizer,
) -> Option<ChatTemplate> {
    let source = match md.get("tokenizer.chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            tracing::warn!(
                target: "llmos::models",
                source = %path.display(),
                "tokenizer.chat_template is not a string ({:?}); ignored",
                other.value_type()
            );
            None
        }
        None => None,
    };
    let token = |id: u32| match md.get("tokenizer.ggml.tokens") {
        Some(Value::Array(a)) => match a.get(id as usize) {
            Some(Value::String(s)) => s.clone(),
            _ => String::new(),
        },
        _ => String::new(),
    };
    compile_template(
        path,
        source,
        &token(tokenizer.bos_id()),
        &token(tokenizer.eos_id()),
    )
}

/// Stored bytes of tensor `name` as the header declares them (0 when absent or absurd).
fn stored_size(content: &Content, name: &str) -> u64 {
    content.tensor_infos.get(name).map_or(0, |info| {
        let t = info.ggml_dtype;
        info.shape
            .dims()
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
            .and_then(|n| (n / t.block_size() as u64).checked_mul(t.type_size() as u64))
            .unwrap_or(0)
    })
}

/// The weight tensors `load` reads for `config`.
fn tensor_names(config: &ModelConfig, has_output: bool) -> Vec<String> {
    let mut names = vec!["token_embd.weight".to_string()];
    for i in 0..config.n_layers {
        for s in [
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ] {
            names.push(format!("blk.{i}.{s}.weight"));
        }
    }
    names.push("output_norm.weight".into());
    if has_output {
        names.push("output.weight".into());
    }
    names
}

/// Loads a llama GGUF file: configuration, weights (on `device`), its tokenizer and its
/// chat template; `progress` is called after each tensor.
pub(crate) fn load(path: &Path, device: &Device, progress: &dyn Fn(LoadProgress)) -> Result<Parts> {
    let map = crate::mmap::map_file(path)?;
    let content = parse(path, &map)?;
    let config = config(path, &content)?;
    let tokenizer = crate::Tokenizer::from_gguf_metadata(path, &content.metadata)?;
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(ModelError::corrupt(
            path,
            format!(
                "tokenizer has {} tokens but the embedding only {} rows",
                tokenizer.vocab_size(),
                config.vocab_size
            ),
        ));
    }
    let chat_template = chat_template(path, &content.metadata, &tokenizer);
    let expected = tensor_names(&config, content.tensor_infos.contains_key("output.weight"))
        .into_iter()
        .map(|n| {
            let size = stored_size(&content, &n);
            (n, size)
        })
        .collect();
    let tracker = Tracker::new(progress, expected);
    let t = Tensors {
        path,
        content: &content,
        map: &map,
        device,
        tracker: &tracker,
    };
    let c = &config;
    let (dim, hd) = (c.dim, c.head_dim);
    let (qd, kvd) = (c.n_heads * hd, c.n_kv_heads * hd);
    let embed = t.dense("token_embd.weight", &[c.vocab_size, dim])?;
    let mut layers = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        let name = |s: &str| format!("blk.{i}.{s}.weight");
        let qkv = vec![
            t.linear(&name("attn_q"), qd, dim)?,
            t.linear(&name("attn_k"), kvd, dim)?,
            t.linear(&name("attn_v"), kvd, dim)?,
        ];
        let gate_up = vec![
            t.linear(&name("ffn_gate"), c.ffn_dim, dim)?,
            t.linear(&name("ffn_up"), c.ffn_dim, dim)?,
        ];
        layers.push(Layer {
            attn_norm: vector(t.dense(&name("attn_norm"), &[dim])?)?,
            qkv: Fused::build(qkv, device)?,
            wo: t
                .linear(&name("attn_output"), dim, qd)?
                .into_linear(device)?,
            ffn_norm: vector(t.dense(&name("ffn_norm"), &[dim])?)?,
            gate_up: Fused::build(gate_up, device)?,
            down: t
                .linear(&name("ffn_down"), dim, c.ffn_dim)?
                .into_linear(device)?,
        });
    }
    let norm = vector(t.dense("output_norm.weight", &[dim])?)?;
    let embed = Arc::new(embed.flatten_all()?.to_vec1::<f32>()?);
    let lm_head = if t.has("output.weight") {
        t.linear("output.weight", c.vocab_size, dim)?
            .into_linear(device)?
    } else if Tensors::is_float(t.info("token_embd.weight")?.ggml_dtype).is_some() {
        // Tied float weights: share the embedding's storage instead of a second copy.
        Linear::shared(embed.clone(), c.vocab_size)
    } else {
        // Tied quantized weights: the quantized matmul is faster than the f32 copy.
        t.linear("token_embd.weight", c.vocab_size, dim)?
            .into_linear(device)?
    };
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
