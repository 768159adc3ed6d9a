//! State shared by the inference actors that must outlive their restarts: the loaded
//! model (weights are never reloaded below `models`), each device with its KV block
//! pool, the journal handle, and the delivery sinks of requests.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use llmos_device::LogicalDevice;
use llmos_journal::Journal;
use llmos_kernel::Kernel;
use llmos_models::{Model, Tokenizer};

use crate::config::RuntimeConfig;
use crate::error::InferenceError;
use crate::kvpool::DevicePool;
use crate::sink::RequestSink;

/// A model ready to serve: weights, tokenizer and the facts admission needs.
pub struct LoadedModel {
    /// The forward (weights shared read-only).
    pub model: Arc<Model>,
    /// Text ↔ tokens.
    pub tokenizer: Arc<Tokenizer>,
    /// Context length in tokens.
    pub context: usize,
    /// End-of-sequence token.
    pub eos: u32,
    /// A name for logs and the API (the file name).
    pub name: String,
}

/// One device with its block pool.
#[derive(Clone)]
pub struct DeviceRuntime {
    /// The device.
    pub device: LogicalDevice,
    /// Its KV block pool (outlives engine restarts).
    pub pool: DevicePool,
    /// How attached sequences got their KV on this device.
    pub kv_stats: Arc<KvSourceStats>,
}

/// Where the KV of (re)attached sequences came from, in positions: kept by the engine,
/// restored from the pool after validation, or recomputed from the journaled tokens.
#[derive(Debug, Default)]
pub struct KvSourceStats {
    /// Positions an engine still held (task restart).
    pub kept: AtomicU64,
    /// Positions restored from the pool (engine restart, new process).
    pub restored: AtomicU64,
    /// Positions recomputed (nothing valid to restore, another device).
    pub recomputed: AtomicU64,
}

impl KvSourceStats {
    /// `(kept, restored, recomputed)`.
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.kept.load(Ordering::Relaxed),
            self.restored.load(Ordering::Relaxed),
            self.recomputed.load(Ordering::Relaxed),
        )
    }
}

/// Everything the inference actors share.
pub struct Services {
    /// Configuration the runtime was booted with.
    pub config: RuntimeConfig,
    /// Devices in placement-preference order.
    pub devices: Vec<DeviceRuntime>,
    model: RwLock<Option<Arc<LoadedModel>>>,
    journal: RwLock<Option<Arc<Mutex<Journal>>>>,
    sinks: Mutex<HashMap<u64, Arc<RequestSink>>>,
    kernel: OnceLock<Kernel>,
    next_request: AtomicU64,
    task_starts: Mutex<HashMap<u64, u32>>,
}

impl Services {
    pub(crate) fn new(config: RuntimeConfig, devices: Vec<DeviceRuntime>) -> Self {
        Self {
            config,
            devices,
            model: RwLock::new(None),
            journal: RwLock::new(None),
            sinks: Mutex::new(HashMap::new()),
            kernel: OnceLock::new(),
            next_request: AtomicU64::new(1),
            task_starts: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one more start of `request`'s task; returns the count.
    pub(crate) fn note_task_start(&self, request: u64) -> u32 {
        let mut starts = self.task_starts.lock().unwrap_or_else(|e| e.into_inner());
        let count = starts.entry(request).or_insert(0);
        *count += 1;
        *count
    }

    /// The generation of `request`'s newest task instance (its start count).
    pub(crate) fn task_generation(&self, request: u64) -> u32 {
        self.task_starts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&request)
            .copied()
            .unwrap_or(0)
    }

    pub(crate) fn forget_task_starts(&self, request: u64) {
        self.task_starts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&request);
    }

    /// The loaded model (set by the `models` actor).
    pub fn model(&self) -> Result<Arc<LoadedModel>, InferenceError> {
        self.model
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| InferenceError::Internal("no model loaded".into()))
    }

    pub(crate) fn has_model(&self) -> bool {
        self.model
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    pub(crate) fn set_model(&self, model: Arc<LoadedModel>) {
        *self.model.write().unwrap_or_else(|e| e.into_inner()) = Some(model);
    }

    /// The journal of the current `journal` actor instance.
    pub fn journal(&self) -> Result<Arc<Mutex<Journal>>, InferenceError> {
        self.journal
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| InferenceError::Internal("the journal is not open".into()))
    }

    pub(crate) fn take_journal(&self) -> Option<Arc<Mutex<Journal>>> {
        self.journal
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    pub(crate) fn set_journal(&self, journal: Option<Arc<Mutex<Journal>>>) {
        *self.journal.write().unwrap_or_else(|e| e.into_inner()) = journal;
    }

    pub(crate) fn sink(&self, request: u64) -> Option<Arc<RequestSink>> {
        self.sinks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&request)
            .cloned()
    }

    pub(crate) fn sink_count(&self) -> usize {
        self.sinks.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub(crate) fn add_sink(&self, request: u64, sink: Arc<RequestSink>) {
        self.sinks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(request, sink);
    }

    pub(crate) fn remove_sink(&self, request: u64) {
        self.sinks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&request);
    }

    pub(crate) fn set_kernel(&self, kernel: Kernel) {
        let _ = self.kernel.set(kernel);
    }

    /// The kernel of the booted tree (`None` while the boot is still running).
    pub fn kernel_handle(&self) -> Option<&Kernel> {
        self.kernel.get()
    }

    pub(crate) fn kernel(&self) -> Result<&Kernel, InferenceError> {
        self.kernel
            .get()
            .ok_or_else(|| InferenceError::Internal("kernel not booted".into()))
    }

    pub(crate) fn next_request_id(&self) -> u64 {
        self.next_request.fetch_add(1, Ordering::SeqCst)
    }

    pub(crate) fn bump_request_ids_past(&self, used: u64) {
        self.next_request.fetch_max(used + 1, Ordering::SeqCst);
    }

    /// The state directory.
    pub fn state_dir(&self) -> &PathBuf {
        &self.config.state_dir
    }
}
