//! The shape and hyper-parameters of a loaded Llama-family model, whatever file it came from.

use llmos_kv::KvShape;

/// How q/k rows are laid out for the rotary embedding. Meta's checkpoints (and GGUF, which
/// keeps them) rotate interleaved pairs `(2i, 2i+1)`; Hugging Face checkpoints permute the
/// rows so that the pairs are `(i, i + head_dim/2)`. Both describe the same function; the
/// forward must pick the matching kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum RopeLayout {
    /// Pairs `(2i, 2i+1)` (GGUF / Meta layout): `candle_nn::rotary_emb::rope_i`.
    Interleaved,
    /// Pairs `(i, i + d/2)` (Hugging Face layout): `candle_nn::rotary_emb::rope`.
    HalfSplit,
}

/// Which file format the weights came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum SourceFormat {
    /// A single GGUF file.
    Gguf,
    /// A Hugging Face directory (config.json + safetensors + tokenizer.json).
    HuggingFace,
}

/// Hyper-parameters of a Llama-family decoder.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    /// Architecture name as the file states it (`llama`, `LlamaForCausalLM`, …).
    pub architecture: String,
    /// Model (embedding) width.
    pub dim: usize,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (fewer than `n_heads` with grouped-query attention).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Hidden width of the SwiGLU feed-forward block.
    pub ffn_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Longest sequence the model accepts (rotary tables are built this long).
    pub max_seq_len: usize,
    /// Rotary embedding base frequency.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Rotary pair layout of the stored q/k weights.
    pub rope_layout: RopeLayout,
    /// Whether the output projection reuses the token embedding.
    pub tied_embeddings: bool,
    /// Where the weights came from.
    pub source: SourceFormat,
    /// Storage type of the projection weights as the file holds them (`f32`, `q4_0`, …).
    pub weight_type: String,
}

impl ModelConfig {
    /// The KV cache shape a sequence of this model needs.
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            n_layers: self.n_layers,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
        }
    }

    /// Checks the invariants the forward relies on; `Err` carries the reason.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let positive = [
            ("dim", self.dim),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("ffn_dim", self.ffn_dim),
            ("vocab_size", self.vocab_size),
            ("max_seq_len", self.max_seq_len),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} is 0"));
            }
        }
        if !self.dim.is_multiple_of(self.n_heads) {
            return Err(format!(
                "dim {} is not a multiple of n_heads {}",
                self.dim, self.n_heads
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(format!(
                "n_heads {} is not a multiple of n_kv_heads {}",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim != self.dim / self.n_heads || !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim {} must be dim/n_heads = {} and even",
                self.head_dim,
                self.dim / self.n_heads
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(format!("rope theta {} is not positive", self.rope_theta));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return Err(format!("rms epsilon {} is invalid", self.rms_eps));
        }
        // Rotary tables are materialised up front; a corrupt context length must not turn
        // into a multi-gigabyte allocation.
        if self.max_seq_len > 1 << 18 {
            return Err(format!(
                "context length {} is implausible",
                self.max_seq_len
            ));
        }
        Ok(())
    }
}
