//! Configuration of the inference runtime.

use std::path::PathBuf;
use std::time::Duration;

use llmos_device::DeviceId;
use llmos_journal::FlushPolicy;

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
    /// Positions per KV block.
    pub block_tokens: usize,
    /// When journal records reach the OS.
    pub flush: FlushPolicy,
    /// Requests generating at once; more are refused as overloaded.
    pub max_active: usize,
    /// An engine step may go this long without a heartbeat before it is declared hung.
    pub engine_heartbeat: Duration,
    /// Attempts of a failing journal append before the request fails.
    pub journal_attempts: u32,
}

impl RuntimeConfig {
    /// Defaults for a model and a state directory: one CPU device, 256 MiB of KV.
    pub fn new(model: impl Into<PathBuf>, state_dir: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            devices: vec![DeviceId::cpu(0)],
            state_dir: state_dir.into(),
            kv_budget_bytes: 256 << 20,
            block_tokens: 16,
            flush: FlushPolicy::EveryRecord,
            max_active: 64,
            engine_heartbeat: Duration::from_secs(10),
            journal_attempts: 4,
        }
    }
}
