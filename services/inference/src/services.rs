//! State shared by the inference actors that must outlive their restarts: the loaded
//! model (weights are never reloaded below `models`), each device with its KV block
//! pool, the journal handle, and the delivery sinks of requests.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Instant, SystemTime};

use llmos_device::LogicalDevice;
use llmos_journal::{Journal, JournalError};
use llmos_kernel::Kernel;
use llmos_models::{Model, Tokenizer};

use crate::config::RuntimeConfig;
use crate::error::InferenceError;
use crate::kvpool::DevicePool;
use crate::metrics::EngineMetrics;
use crate::quarantine::Quarantine;
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
    /// The weights' identity by content ([`llmos_models::fingerprint`]): the KV pools'
    /// model tag.
    pub fingerprint: u64,
    /// The model's own chat template, if it has one that compiles (see
    /// [`LoadedModel::chat_prompt`]).
    pub chat_template: Option<llmos_models::ChatTemplate>,
}

impl LoadedModel {
    /// The prompt of a chat: `messages` rendered with the model's chat template, or, for
    /// a model without one, the documented default — one line `ROLE: CONTENT` per
    /// message, then `assistant:` for the reply
    /// ([`llmos_models::default_chat_prompt`]). A template that raises or fails is
    /// [`InferenceError::Model`] holding `ModelError::ChatTemplate` with its message.
    ///
    /// [`crate::Runtime::submit`] puts the BOS token in front of every prompt, and the
    /// tokenizer reads text as plain text (a literal `<s>` is spelled out, never the
    /// control token). Templates usually begin with `{{ bos_token }}`, so one leading BOS
    /// string is removed from the rendered prompt: the sequence then starts with exactly
    /// one BOS token, as the model was trained, instead of BOS followed by the letters of
    /// `<s>`. Special-token strings elsewhere in the prompt (an `</s>` closing an earlier
    /// assistant turn, ChatML's `<|im_start|>`) are tokenized as plain text.
    pub fn chat_prompt(
        &self,
        messages: &[llmos_models::ChatMessage],
    ) -> Result<String, InferenceError> {
        let template = self.chat_template.as_ref();
        let prompt = llmos_models::render_chat(template, messages)?;
        Ok(match template.map(|t| t.bos_token()) {
            Some(bos) if !bos.is_empty() => match prompt.strip_prefix(bos) {
                Some(rest) => rest.to_string(),
                None => prompt,
            },
            _ => prompt,
        })
    }
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
    /// The crash ledger of this device's engine (outlives engine restarts).
    pub(crate) quarantine: Arc<Mutex<Quarantine>>,
}

impl DeviceRuntime {
    /// A device with its pool and fresh counters.
    pub(crate) fn new(device: LogicalDevice, pool: DevicePool) -> Self {
        Self {
            device,
            pool,
            kv_stats: Arc::default(),
            quarantine: Arc::default(),
        }
    }

    /// Requests under suspicion of crashing this device's engine now.
    pub fn suspects(&self) -> Vec<u64> {
        self.quarantine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .suspects()
    }
}

/// Where a request stands in its engine ([`Services::request_status`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestState {
    /// Waiting for KV memory or a step (not yet run since it was attached).
    Queued,
    /// Feeding its prompt (or recomputing KV) in chunks.
    Prefill,
    /// Generating one token per step.
    Decode,
    /// Its KV was taken for others; it resumes when memory frees.
    Preempted,
}

impl RequestState {
    /// Lower-case name, as `llmos ctl requests` prints it.
    pub fn name(self) -> &'static str {
        match self {
            RequestState::Queued => "queued",
            RequestState::Prefill => "prefill",
            RequestState::Decode => "decode",
            RequestState::Preempted => "preempted",
        }
    }
}

/// A request's live state as its engine last reported it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RequestStatus {
    /// The device whose engine holds it.
    pub device: String,
    /// Queued, prefill, decode or preempted.
    pub state: RequestState,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens generated so far.
    pub generated: usize,
    /// Positions whose KV the engine holds.
    pub kv_positions: usize,
    /// Recent generation rate (exponentially weighted), tokens per second.
    pub tokens_per_sec: f64,
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
    tasks: Mutex<HashMap<u64, TaskRecord>>,
    status: Mutex<HashMap<u64, RequestStatus>>,
    submitted: Mutex<HashMap<u64, Instant>>,
    queue_waited: Mutex<std::collections::HashSet<u64>>,
    /// The engines' Prometheus metrics.
    pub metrics: EngineMetrics,
    journal_health: JournalHealth,
    /// Idempotency tag → request id (`Runtime::submit_tagged`); `None` until first used,
    /// then built from the journal once and kept up to date by submissions.
    tags: Mutex<Option<HashMap<String, u64>>>,
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
            tasks: Mutex::new(HashMap::new()),
            status: Mutex::new(HashMap::new()),
            submitted: Mutex::new(HashMap::new()),
            queue_waited: Mutex::new(std::collections::HashSet::new()),
            metrics: EngineMetrics::default(),
            journal_health: JournalHealth::default(),
            tags: Mutex::new(None),
        }
    }

    /// The tag index, built from `scan` (the journal's tagged requests) on first use.
    pub(crate) fn with_tags<R>(
        &self,
        scan: impl FnOnce() -> HashMap<String, u64>,
        f: impl FnOnce(&mut HashMap<String, u64>) -> R,
    ) -> R {
        let mut tags = self.tags.lock().unwrap_or_else(|e| e.into_inner());
        f(tags.get_or_insert_with(scan))
    }

    /// Starts a new instance of `request`'s task: returns its generation (a newer one
    /// fences off every older one; see the engine's journal appends).
    pub(crate) fn next_task_generation(&self, request: u64) -> u32 {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        let record = tasks.entry(request).or_default();
        record.generation += 1;
        record.generation
    }

    /// Records that an instance of `request`'s task started with `tokens` journaled;
    /// returns how many starts in a row found no new token since the one before (0 when
    /// the request progressed, or at its first start).
    pub(crate) fn note_task_progress(&self, request: u64, tokens: usize) -> u32 {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        let record = tasks.entry(request).or_default();
        match record.tokens_at_last_start {
            Some(before) if tokens <= before => record.stalled_starts += 1,
            _ => record.stalled_starts = 0,
        }
        record.tokens_at_last_start = Some(tokens);
        record.stalled_starts
    }

    /// The generation of `request`'s newest task instance.
    pub(crate) fn task_generation(&self, request: u64) -> u32 {
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&request)
            .map_or(0, |r| r.generation)
    }

    /// The request has ended: forget its task record, status and submission time.
    pub(crate) fn forget_request(&self, request: u64) {
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&request);
        self.clear_status(request);
        self.submitted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&request);
        self.queue_waited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&request);
    }

    /// Records when `request` was submitted (for time to first token and queue wait).
    pub(crate) fn note_submitted(&self, request: u64) {
        self.submitted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(request, Instant::now());
    }

    /// The time `request` waited from submission to its first step, once (later calls,
    /// and requests not submitted in this process, get `None`).
    pub(crate) fn take_queue_wait(&self, request: u64) -> Option<std::time::Duration> {
        let mut waited = self.queue_waited.lock().unwrap_or_else(|e| e.into_inner());
        if waited.contains(&request) {
            return None;
        }
        let submitted = self.submitted_at(request)?;
        waited.insert(request);
        Some(submitted.elapsed())
    }

    /// When `request` was submitted in this process.
    pub(crate) fn submitted_at(&self, request: u64) -> Option<Instant> {
        self.submitted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&request)
            .copied()
    }

    /// Publishes the engine's view of several requests at once.
    pub(crate) fn set_status(&self, updates: impl IntoIterator<Item = (u64, RequestStatus)>) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        for (request, s) in updates {
            status.insert(request, s);
        }
    }

    /// Forgets `request`'s status if `device` published it (a request that moved keeps
    /// the status its new device publishes).
    pub(crate) fn clear_status_on(&self, request: u64, device: &str) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if status.get(&request).is_some_and(|s| s.device == device) {
            status.remove(&request);
        }
    }

    pub(crate) fn clear_status(&self, request: u64) {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&request);
    }

    /// Every request an engine holds, with its state, as last reported.
    pub fn request_status(&self) -> HashMap<u64, RequestStatus> {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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

    /// Whether journal appends are failing: the outcome of the most recent append, the
    /// consecutive failures up to now and the last error (for `/health` and `/metrics`).
    pub fn journal_health(&self) -> JournalHealthReport {
        self.journal_health.report()
    }

    /// Records the outcome of one journal append (every append of the services reports
    /// here, under the journal's lock, so outcomes are recorded in append order).
    pub(crate) fn note_journal_append(&self, result: &Result<(), JournalError>) {
        self.journal_health.record(result);
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

/// What the services remember of one request's task across its instances.
#[derive(Debug, Default)]
struct TaskRecord {
    generation: u32,
    stalled_starts: u32,
    tokens_at_last_start: Option<usize>,
}

/// Outcomes of journal appends, so health can tell a journal that refuses writes from one
/// that is merely open. A success costs one atomic load (and a store only right after a
/// failure); only a failure takes the lock.
#[derive(Debug, Default)]
struct JournalHealth {
    consecutive: AtomicU64,
    total: AtomicU64,
    last: Mutex<Option<(String, SystemTime)>>,
}

impl JournalHealth {
    fn record(&self, result: &Result<(), JournalError>) {
        match result {
            Ok(()) => {
                if self.consecutive.load(Ordering::Relaxed) != 0 {
                    self.consecutive.store(0, Ordering::Relaxed);
                }
            }
            // A record the sequence rules refuse, or one too large for the format, says
            // nothing about the journal itself: nothing was written and it still works.
            Err(JournalError::Rejected { .. } | JournalError::TooLarge { .. }) => {}
            Err(err) => {
                let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
                *last = Some((err.to_string(), SystemTime::now()));
                self.consecutive.fetch_add(1, Ordering::Relaxed);
                self.total.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn report(&self) -> JournalHealthReport {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let consecutive = self.consecutive.load(Ordering::Relaxed);
        let (last_error, last_failure_at) = last.unzip();
        JournalHealthReport {
            failing: consecutive > 0,
            consecutive_failures: consecutive,
            failures_total: self.total.load(Ordering::Relaxed),
            last_error,
            last_failure_at,
        }
    }
}

/// What journal appends have been doing ([`Services::journal_health`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct JournalHealthReport {
    /// The most recent append failed (no append has succeeded since): the journal is
    /// failing. A record the journal refused by its sequence rules does not count.
    pub failing: bool,
    /// Failed appends since the last successful one (each retry counts).
    pub consecutive_failures: u64,
    /// Failed appends since the runtime booted.
    pub failures_total: u64,
    /// The error of the most recent failed append, kept after the journal recovers.
    pub last_error: Option<String>,
    /// When the most recent failed append happened.
    pub last_failure_at: Option<SystemTime>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_health_fails_until_an_append_succeeds() {
        let health = JournalHealth::default();
        assert_eq!(health.report(), JournalHealthReport::default());
        health.record(&Ok(()));
        assert!(!health.report().failing);
        for _ in 0..2 {
            health.record(&Err(JournalError::Injected("disk full".into())));
        }
        let failing = health.report();
        assert!(failing.failing);
        assert_eq!(failing.consecutive_failures, 2);
        assert_eq!(failing.failures_total, 2);
        assert_eq!(
            failing.last_error.as_deref(),
            Some("injected fault: disk full")
        );
        assert!(failing.last_failure_at.is_some());
        // A refused record says nothing about the journal: still failing, not counted.
        health.record(&Err(JournalError::TooLarge {
            request: 1,
            bytes: 2,
            max: 1,
        }));
        assert_eq!(health.report().consecutive_failures, 2);
        health.record(&Ok(()));
        let recovered = health.report();
        assert!(!recovered.failing);
        assert_eq!(recovered.consecutive_failures, 0);
        assert_eq!(recovered.failures_total, 2);
        assert_eq!(recovered.last_error, failing.last_error);
    }
}
