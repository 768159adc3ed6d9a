//! Llama-family models for LLMasOS: loading GGUF files and Hugging Face directories
//! through read-only memory maps, their tokenizers, synthetic random-weight models, and a
//! batched forward pass that keeps K/V only in caller-owned [`llmos_kv::KvStore`]s.
//!
//! ```no_run
//! use llmos_kv::ContiguousKv;
//! use llmos_models::{load_gguf, SeqStep};
//! # fn main() -> Result<(), llmos_models::ModelError> {
//! // First set the CPU thread count: llmos_device::init_cpu_threads(2).
//! let loaded = load_gguf("stories260K-f32.gguf", &candle_core::Device::Cpu)?;
//! let ids = loaded.tokenizer.encode("Once upon a time", true)?;
//! let mut kv = ContiguousKv::new(loaded.model.kv_shape());
//! let logits = loaded.model.forward(&mut [SeqStep { tokens: &ids, start_pos: 0, kv: &mut kv }])?;
//! # Ok(()) }
//! ```

mod chat;
mod config;
mod elementwise;
mod error;
mod fingerprint;
mod gguf;
mod hf;
pub mod kernels;
mod mmap;
mod model;
mod progress;
pub mod synth;
mod tokenizer;
mod weights;

pub use chat::{default_chat_prompt, render_chat, ChatMessage, ChatTemplate};
pub use config::{ModelConfig, RopeLayout, SourceFormat};
pub use error::{ModelError, Result};
pub use fingerprint::fingerprint;
pub use model::{
    load, load_gguf, load_hf_dir, load_with_progress, LoadedModel, Model, SeqStep, StepOptions,
};
pub use progress::LoadProgress;
pub use tokenizer::{incomplete_tail_len, Tokenizer};

/// GGML storage types, for [`synth::write_gguf`].
pub use candle_core::quantized::GgmlDType;

/// Runs `f` on a worker thread of rayon's global pool and waits for it. candle's CPU
/// kernels parallelise with rayon; called from outside the pool, every kernel is handed
/// to the pool and waited for (a thread hop per op), which dominates small models: on
/// the 2-core development machine stories260K decodes about 1.25× faster inside the pool
/// when the machine is idle and 2.5–4× faster when other work competes for the cores.
/// Build the [`SeqStep`]s inside `f` (the KV stores must be `Send` to move there).
pub fn on_cpu_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

#[cfg(test)]
mod tests {
    fn send_sync<T: Send + Sync>() {}

    #[test]
    fn shared_types_are_send_and_sync() {
        send_sync::<crate::Model>();
        send_sync::<crate::Tokenizer>();
        send_sync::<crate::LoadedModel>();
        send_sync::<crate::ModelError>();
        send_sync::<crate::ChatTemplate>();
    }
}
