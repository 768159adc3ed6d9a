//! Synthetic Llama models with random weights of real shapes, written as GGUF or as a
//! Hugging Face directory, for tests and throughput benchmarks without downloads.
//!
//! Both writers draw the same weights from the same seed (in Meta's layout) and embed the
//! same self-contained tokenizer, so a GGUF file and an HF directory written with one
//! seed are the same function: the HF writer applies the q/k row permutation Hugging
//! Face's conversion script applies, which the half-split rotary kernel undoes.

use std::collections::{HashMap, HashSet};
use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::error::{ModelError, Result};

/// Shape of a synthetic model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Preset {
    /// Name used by [`Preset::by_name`] and written into the files.
    pub name: &'static str,
    /// Model width.
    pub dim: usize,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Feed-forward hidden width.
    pub ffn_dim: usize,
    /// Vocabulary size (at least 354: specials, 256 bytes and 95 characters).
    pub vocab_size: usize,
    /// Context length.
    pub context_length: usize,
    /// Rotary base.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Whether the output projection is the token embedding.
    pub tied_embeddings: bool,
}

impl Preset {
    /// 262,720 parameters (the size of stories260K): dim 64, 4 layers, 4 heads / 2 KV
    /// heads, ffn 192, vocab 512, untied output. Every GGML 32-block type applies.
    pub const TINY: Preset = Preset {
        name: "tiny",
        dim: 64,
        n_layers: 4,
        n_heads: 4,
        n_kv_heads: 2,
        ffn_dim: 192,
        vocab_size: 512,
        context_length: 256,
        rope_theta: 10_000.0,
        rms_eps: 1e-5,
        tied_embeddings: false,
    };

    /// 1,049,856 parameters with every row a multiple of 256, so the k-quants (q4_K…)
    /// apply: dim 256, 2 layers, 4 heads / 2 KV heads, ffn 256, vocab 512, untied.
    pub const TINY_K: Preset = Preset {
        name: "tiny-k",
        dim: 256,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        ffn_dim: 256,
        vocab_size: 512,
        context_length: 256,
        rope_theta: 10_000.0,
        rms_eps: 1e-5,
        tied_embeddings: false,
    };

    /// 100,092,672 parameters for throughput benchmarks: dim 768, 12 layers, 12 heads /
    /// 4 KV heads (head_dim 64), ffn 2048, vocab 32000, tied embeddings, context 2048.
    /// Count: embedding 32000·768 = 24,576,000; per layer q 768·768 + k, v 2·256·768 +
    /// o 768·768 = 1,572,864, ffn 3·768·2048 = 4,718,592, norms 1,536 → 6,292,992, × 12 =
    /// 75,515,904; final norm 768.
    pub const SMALL_100M: Preset = Preset {
        name: "small-100m",
        dim: 768,
        n_layers: 12,
        n_heads: 12,
        n_kv_heads: 4,
        ffn_dim: 2048,
        vocab_size: 32_000,
        context_length: 2048,
        rope_theta: 10_000.0,
        rms_eps: 1e-5,
        tied_embeddings: true,
    };

    /// The bench model of `../shared/ANCHORS.md`, loaded by every system a benchmark
    /// compares (llama.cpp included): 134,105,856 parameters, dim 768, 12 layers, 12 heads
    /// and 12 KV heads (head_dim 64), ffn 2048, vocab 32000, untied output, context 2048;
    /// 143 MB as q8_0.
    pub const BENCH_134M: Preset = Preset {
        name: "bench-134m",
        dim: 768,
        n_layers: 12,
        n_heads: 12,
        n_kv_heads: 12,
        ffn_dim: 2048,
        vocab_size: 32_000,
        context_length: 2048,
        rope_theta: 10_000.0,
        rms_eps: 1e-5,
        tied_embeddings: false,
    };

    /// All presets.
    pub const ALL: [Preset; 4] = [
        Preset::TINY,
        Preset::TINY_K,
        Preset::SMALL_100M,
        Preset::BENCH_134M,
    ];

    /// The preset called `name`.
    pub fn by_name(name: &str) -> Option<Preset> {
        Self::ALL.into_iter().find(|p| p.name == name)
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }

    /// Exact number of parameters.
    pub fn param_count(&self) -> usize {
        let hd = self.head_dim();
        let (qd, kvd) = (self.n_heads * hd, self.n_kv_heads * hd);
        let per_layer =
            self.dim * (qd + 2 * kvd) + qd * self.dim + 3 * self.dim * self.ffn_dim + 2 * self.dim;
        let embed = self.vocab_size * self.dim;
        let output = if self.tied_embeddings { 0 } else { embed };
        embed + output + self.n_layers * per_layer + self.dim
    }

    fn check(&self) -> Result<()> {
        let bad = |d: String| {
            Err(ModelError::InvalidInput(format!(
                "synthetic preset {}: {d}",
                self.name
            )))
        };
        if self.n_heads == 0 || self.n_kv_heads == 0 || !self.dim.is_multiple_of(self.n_heads) {
            return bad("dim must be a multiple of n_heads".into());
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) || !self.head_dim().is_multiple_of(2) {
            return bad("n_heads must be a multiple of n_kv_heads, head_dim even".into());
        }
        if self.vocab_size < MIN_VOCAB {
            return bad(format!("vocab_size must be at least {MIN_VOCAB}"));
        }
        Ok(())
    }
}

const SPECIALS: [&str; 3] = ["<unk>", "<s>", "</s>"];
/// 3 specials + 256 byte tokens + "▁" + 94 printable ASCII characters.
const MIN_VOCAB: usize = 3 + 256 + 1 + 94;

/// The synthetic tokenizer: SentencePiece-style pieces with scores and types, plus the
/// equivalent ranked BPE merges for `tokenizer.json`.
struct Vocab {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    merges: Vec<(String, String)>,
}

fn vocab(size: usize) -> Vocab {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    let mut types = vec![2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let chars: Vec<String> = std::iter::once('\u{2581}')
        .chain((b'!'..=b'~').map(char::from))
        .map(String::from)
        .collect();
    let mut known: HashSet<String> = chars.iter().cloned().collect();
    let mut pieces = chars.clone();
    let mut merges = Vec::new();
    // The vocabulary depends only on its size, never on the weight seed, so files of any
    // seed share one tokenizer.
    let mut rng = ChaCha8Rng::seed_from_u64(0x5EED_70C5);
    let letters: Vec<char> = "etaoinshrdlucmfwypvbgkjqxz".chars().collect();
    let mut attempts = 0usize;
    while tokens.len() + pieces.len() < size && attempts < size * 1000 {
        attempts += 1;
        let left = if pieces.len() > chars.len() && rng.gen_bool(0.7) {
            pieces[rng.gen_range(chars.len()..pieces.len())].clone()
        } else if rng.gen_bool(0.5) {
            "\u{2581}".to_string()
        } else {
            chars[rng.gen_range(1..chars.len())].clone()
        };
        // Skewed towards frequent letters, so that common English-like pieces appear.
        let i = (rng.gen::<f64>().powi(2) * letters.len() as f64) as usize;
        let right = letters[i.min(letters.len() - 1)].to_string();
        let piece = format!("{left}{right}");
        if piece.chars().count() > 10 || known.contains(&piece) {
            continue;
        }
        known.insert(piece.clone());
        // Every split into two known pieces is a merge, so the ranked-merge BPE of
        // tokenizer.json reaches exactly the pieces the score-driven SentencePiece does.
        let cuts: Vec<usize> = piece.char_indices().map(|(i, _)| i).skip(1).collect();
        for cut in cuts {
            let (a, b) = piece.split_at(cut);
            if known.contains(a) && known.contains(b) {
                merges.push((a.to_string(), b.to_string()));
            }
        }
        pieces.push(piece);
    }
    let n_pieces = pieces.len();
    // Merged pieces first in score order: earlier pieces outrank later ones.
    let mut scores = vec![0f32; tokens.len()];
    for (i, p) in pieces.into_iter().enumerate() {
        let rank = if i < chars.len() {
            (n_pieces + i) as f32
        } else {
            (i - chars.len()) as f32
        };
        scores.push(-rank);
        tokens.push(p);
        types.push(1);
    }
    Vocab {
        tokens,
        scores,
        types,
        merges,
    }
}

/// Weights in Meta's layout, row-major f32, in a fixed draw order.
struct Draw {
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

fn draw(p: &Preset, seed: u64) -> Draw {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let hd = p.head_dim();
    let (qd, kvd) = (p.n_heads * hd, p.n_kv_heads * hd);
    let mut tensors = Vec::new();
    // Uniform with the variance of N(0, 1/fan_in): activations stay O(1) through the
    // residual stream, logits O(1) at the output.
    let mut mat = |rng: &mut ChaCha8Rng, name: String, rows: usize, cols: usize| {
        let a = (3.0 / cols as f32).sqrt();
        let v: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-a..a)).collect();
        tensors.push((name, vec![rows, cols], v));
    };
    mat(&mut rng, "token_embd.weight".into(), p.vocab_size, p.dim);
    let mut norms = Vec::new();
    for l in 0..p.n_layers {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        mat(&mut rng, n("attn_q"), qd, p.dim);
        mat(&mut rng, n("attn_k"), kvd, p.dim);
        mat(&mut rng, n("attn_v"), kvd, p.dim);
        mat(&mut rng, n("attn_output"), p.dim, qd);
        mat(&mut rng, n("ffn_gate"), p.ffn_dim, p.dim);
        mat(&mut rng, n("ffn_down"), p.dim, p.ffn_dim);
        mat(&mut rng, n("ffn_up"), p.ffn_dim, p.dim);
        norms.push(n("attn_norm"));
        norms.push(n("ffn_norm"));
    }
    if !p.tied_embeddings {
        mat(&mut rng, "output.weight".into(), p.vocab_size, p.dim);
    }
    norms.push("output_norm.weight".into());
    for name in norms {
        // Not all ones, so that a misplaced norm weight shows in the logits.
        let v: Vec<f32> = (0..p.dim).map(|_| 1.0 + rng.gen_range(-0.1..0.1)).collect();
        tensors.push((name, vec![p.dim], v));
    }
    Draw { tensors }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> ModelError + '_ {
    move |e| ModelError::io(path, e)
}

/// Writes a random-weight llama GGUF file (version 2) with its tokenizer in metadata.
/// Projection and embedding matrices are stored as `dtype` (f32, f16, q8_0, q4_0, q4_1,
/// q4_K…; k-quants need rows that are multiples of 256, e.g. [`Preset::TINY_K`]); norm
/// weights stay f32 as llama.cpp keeps them.
pub fn write_gguf(
    path: impl AsRef<Path>,
    preset: &Preset,
    dtype: GgmlDType,
    seed: u64,
) -> Result<()> {
    write_gguf_inner(path.as_ref(), preset, dtype, seed, None)
}

/// [`write_gguf`] with a chat template in the metadata (`tokenizer.chat_template`), so
/// that loading it gives a [`crate::ChatTemplate`] (BOS `<s>`, EOS `</s>`). The template
/// is stored as given, compiled or not.
pub fn write_gguf_with_template(
    path: impl AsRef<Path>,
    preset: &Preset,
    dtype: GgmlDType,
    seed: u64,
    chat_template: &str,
) -> Result<()> {
    write_gguf_inner(path.as_ref(), preset, dtype, seed, Some(chat_template))
}

fn write_gguf_inner(
    path: &Path,
    preset: &Preset,
    dtype: GgmlDType,
    seed: u64,
    chat_template: Option<&str>,
) -> Result<()> {
    preset.check()?;
    let block = dtype.block_size();
    for cols in [preset.dim, preset.ffn_dim] {
        if cols % block != 0 {
            return Err(ModelError::InvalidInput(format!(
                "{dtype:?} packs rows in blocks of {block}; preset {} has rows of {cols}",
                preset.name
            )));
        }
    }
    let vocab = vocab(preset.vocab_size);
    let draw = draw(preset, seed);
    let dev = Device::Cpu;
    let mut qtensors = Vec::with_capacity(draw.tensors.len());
    for (name, shape, data) in draw.tensors {
        let t = Tensor::from_vec(data, shape.as_slice(), &dev)?;
        let q = if shape.len() == 1 {
            QTensor::quantize(&t, GgmlDType::F32)?
        } else {
            QTensor::quantize(&t, dtype)?
        };
        qtensors.push((name, q));
    }
    let p = preset;
    let u32v = |x: usize| Value::U32(x as u32);
    let mut metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        (
            "general.name",
            Value::String(format!("llmos-synth-{}", p.name)),
        ),
        ("llama.context_length", u32v(p.context_length)),
        ("llama.embedding_length", u32v(p.dim)),
        ("llama.block_count", u32v(p.n_layers)),
        ("llama.feed_forward_length", u32v(p.ffn_dim)),
        ("llama.attention.head_count", u32v(p.n_heads)),
        ("llama.attention.head_count_kv", u32v(p.n_kv_heads)),
        ("llama.rope.dimension_count", u32v(p.head_dim())),
        ("llama.rope.freq_base", Value::F32(p.rope_theta)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(p.rms_eps),
        ),
        ("tokenizer.ggml.model", Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(vocab.tokens.iter().cloned().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.scores",
            Value::Array(vocab.scores.iter().copied().map(Value::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(vocab.types.iter().copied().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
    ];
    if let Some(template) = chat_template {
        metadata.push(("tokenizer.chat_template", Value::String(template.into())));
    }
    let md_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(n, q)| (n.as_str(), q)).collect();
    let file = std::fs::File::create(path).map_err(io_err(path))?;
    let mut w = BufWriter::new(file);
    gguf_file::write(&mut w, &md_refs, &t_refs)?;
    std::io::Write::flush(&mut w).map_err(io_err(path))?;
    Ok(())
}

/// How [`write_hf_dir_with`] stores the checkpoint.
#[derive(Clone, Copy, Debug)]
pub struct HfOptions {
    /// Tensor type in the safetensors files: f32, f16 or bf16.
    pub dtype: DType,
    /// Number of safetensors shards (1: `model.safetensors`; more: an index file too).
    pub shards: usize,
}

impl Default for HfOptions {
    fn default() -> Self {
        HfOptions {
            dtype: DType::F32,
            shards: 1,
        }
    }
}

/// Writes a random-weight `LlamaForCausalLM` directory (f32, one shard): config.json,
/// model.safetensors, tokenizer.json. Same function as [`write_gguf`] with the same seed.
pub fn write_hf_dir(dir: impl AsRef<Path>, preset: &Preset, seed: u64) -> Result<()> {
    write_hf_dir_with(dir, preset, seed, HfOptions::default())
}

/// [`write_hf_dir`] with a choice of tensor type and sharding.
pub fn write_hf_dir_with(
    dir: impl AsRef<Path>,
    preset: &Preset,
    seed: u64,
    opts: HfOptions,
) -> Result<()> {
    let dir = dir.as_ref();
    preset.check()?;
    if !matches!(opts.dtype, DType::F32 | DType::F16 | DType::BF16) || opts.shards == 0 {
        return Err(ModelError::InvalidInput(format!(
            "HF writer takes f32/f16/bf16 and at least one shard, not {:?}/{}",
            opts.dtype, opts.shards
        )));
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let p = preset;
    let hd = p.head_dim();
    let dev = Device::Cpu;
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for (name, shape, mut data) in draw(p, seed).tensors {
        let hf_name = hf_name(&name);
        if name.ends_with("attn_q.weight") {
            data = permute_rows(&data, p.n_heads, hd, p.dim);
        } else if name.ends_with("attn_k.weight") {
            data = permute_rows(&data, p.n_kv_heads, hd, p.dim);
        }
        let t = Tensor::from_vec(data, shape.as_slice(), &dev)?.to_dtype(opts.dtype)?;
        named.push((hf_name, t));
    }
    let n_shards = opts.shards.min(named.len());
    let per = named.len().div_ceil(n_shards);
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in named.chunks(per).enumerate() {
        let file = if n_shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n_shards)
        };
        let map: HashMap<String, Tensor> = chunk.iter().cloned().collect();
        for (name, _) in chunk {
            weight_map.insert(name.clone(), json!(file));
        }
        candle_core::safetensors::save(&map, dir.join(&file))?;
    }
    if n_shards > 1 {
        let index = json!({ "metadata": {}, "weight_map": weight_map });
        write_json(&dir.join("model.safetensors.index.json"), &index)?;
    }
    let dtype_name = match opts.dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    };
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": p.dim,
        "intermediate_size": p.ffn_dim,
        "num_hidden_layers": p.n_layers,
        "num_attention_heads": p.n_heads,
        "num_key_value_heads": p.n_kv_heads,
        "max_position_embeddings": p.context_length,
        "rms_norm_eps": p.rms_eps,
        "rope_theta": p.rope_theta,
        "vocab_size": p.vocab_size,
        "tie_word_embeddings": p.tied_embeddings,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype_name,
    });
    write_json(&dir.join("config.json"), &config)?;
    write_json(
        &dir.join("tokenizer.json"),
        &tokenizer_json(&vocab(p.vocab_size)),
    )?;
    Ok(())
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let s = serde_json::to_string_pretty(v)
        .map_err(|e| ModelError::InvalidInput(format!("{}: {e}", path.display())))?;
    std::fs::write(path, s).map_err(io_err(path))
}

/// GGUF tensor name → Hugging Face Llama name.
fn hf_name(gguf: &str) -> String {
    let map = [
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_down", "mlp.down_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("attn_norm", "input_layernorm"),
        ("ffn_norm", "post_attention_layernorm"),
    ];
    match gguf {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        _ => {
            let rest = gguf.strip_prefix("blk.").unwrap_or(gguf);
            let (layer, rest) = rest.split_once('.').unwrap_or(("0", rest));
            let base = rest.strip_suffix(".weight").unwrap_or(rest);
            let hf = map
                .iter()
                .find(|(g, _)| *g == base)
                .map_or(base, |(_, h)| h);
            format!("model.layers.{layer}.{hf}.weight")
        }
    }
}

/// Meta → Hugging Face row order of a q or k matrix: within each head, row `2i + j`
/// moves to `j * head_dim/2 + i` (what `convert_llama_weights_to_hf.py`'s `permute` does).
fn permute_rows(w: &[f32], heads: usize, hd: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    let half = hd / 2;
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * hd + 2 * i + j) * cols;
                let dst = (h * hd + j * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

fn tokenizer_json(v: &Vocab) -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> = v
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let merges: Vec<[&str; 2]> = v
        .merges
        .iter()
        .map(|(a, b)| [a.as_str(), b.as_str()])
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}
        ]},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>",
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_counts() {
        assert_eq!(Preset::TINY.param_count(), 262_720);
        assert_eq!(Preset::TINY_K.param_count(), 1_049_856);
        assert_eq!(Preset::SMALL_100M.param_count(), 100_092_672);
        assert_eq!(Preset::by_name("small-100m"), Some(Preset::SMALL_100M));
        assert_eq!(Preset::BENCH_134M.param_count(), 134_105_856);
        assert_eq!(Preset::by_name("bench-134m"), Some(Preset::BENCH_134M));
    }

    #[test]
    fn vocab_is_deterministic_and_closed_under_merges() {
        let v = vocab(512);
        assert_eq!(v.tokens.len(), 512);
        assert_eq!(v.tokens, vocab(512).tokens);
        let set: HashSet<&String> = v.tokens.iter().collect();
        assert_eq!(set.len(), 512, "pieces are unique");
        for (a, b) in &v.merges {
            assert!(set.contains(a) && set.contains(b) && set.contains(&format!("{a}{b}")));
        }
    }

    #[test]
    fn permutation_moves_pairs_to_halves() {
        // One head of 4 rows, 1 column: Meta rows [x0, y0, x1, y1] → HF [x0, x1, y0, y1].
        assert_eq!(
            permute_rows(&[0., 1., 2., 3.], 1, 4, 1),
            vec![0., 2., 1., 3.]
        );
        assert_eq!(
            hf_name("blk.3.ffn_up.weight"),
            "model.layers.3.mlp.up_proj.weight"
        );
    }
}
