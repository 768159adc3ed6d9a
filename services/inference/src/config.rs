//! Configuration of the inference runtime.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use llmos_device::DeviceId;
use llmos_journal::FlushPolicy;
use llmos_kv::KvDtype;
use llmos_models::LoadProgress;

/// Called while the model loads: once before the first tensor, then after each tensor
/// (see [`llmos_models::load_with_progress`]), on the booting thread. Cloning shares it.
#[derive(Clone)]
pub struct LoadProgressHook(pub Arc<dyn Fn(LoadProgress) + Send + Sync>);

impl LoadProgressHook {
    /// A hook calling `f`.
    pub fn new(f: impl Fn(LoadProgress) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }
}

impl std::fmt::Debug for LoadProgressHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoadProgressHook(..)")
    }
}

/// How the runtime is set up.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// The model: a GGUF file or a Hugging Face directory.
    pub model: PathBuf,
    /// Devices in placement-preference order.
    pub devices: Vec<DeviceId>,
    /// Where the journal and the KV pool files live.
    pub state_dir: PathBuf,
    /// KV memory per device, bytes.
    pub kv_budget_bytes: usize,
    /// How the KV pools store keys and values (f32 by default; f16 halves memory and the
    /// bandwidth attention reads).
    pub kv_dtype: KvDtype,
    /// Positions per KV block.
    pub block_tokens: usize,
    /// When journal records reach the OS.
    pub flush: FlushPolicy,
    /// Requests admitted at once (running or waiting in an engine for KV memory); more
    /// wait in the admission queue.
    pub max_active: usize,
    /// Admissions that may wait for a slot; more are refused as overloaded.
    pub max_queued: usize,
    /// How long an admission may wait in the queue before it is refused as overloaded.
    pub queue_timeout: Duration,
    /// Token rows per engine step (decodes plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Sequences per engine step.
    pub max_batch_seqs: usize,
    /// While requests decode, a step that also prefills may take this many times a
    /// decode-only step (the engine sizes prefill chunks from its measured step cost).
    pub prefill_stall: f64,
    /// …or, if that allows more prefill, this long (a gap nobody notices): a few decoding
    /// streams do not throttle a burst of new prompts to a trickle.
    pub prefill_floor: Duration,
    /// An engine step may go this long without a heartbeat before it is declared hung.
    pub engine_heartbeat: Duration,
    /// Attempts of a failing journal append before the request fails.
    pub journal_attempts: u32,
    /// Told how the model load progresses (a terminal progress line); none by default.
    pub load_progress: Option<LoadProgressHook>,
}

impl RuntimeConfig {
    /// Defaults for a model and a state directory: one CPU device, 256 MiB of KV.
    pub fn new(model: impl Into<PathBuf>, state_dir: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            devices: vec![DeviceId::cpu(0)],
            state_dir: state_dir.into(),
            kv_budget_bytes: 256 << 20,
            kv_dtype: KvDtype::F32,
            block_tokens: 16,
            flush: FlushPolicy::EveryRecord,
            max_active: 256,
            max_queued: 1024,
            queue_timeout: Duration::from_secs(300),
            max_batch_tokens: 512,
            max_batch_seqs: 256,
            prefill_stall: 2.0,
            prefill_floor: Duration::from_millis(60),
            engine_heartbeat: Duration::from_secs(10),
            journal_attempts: 4,
            load_progress: None,
        }
    }
}
