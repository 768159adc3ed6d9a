//! The engine of one device: an actor owning a compute thread (watched by the kernel's
//! heartbeat; blocking compute cannot be killed) that runs the step loop over *every*
//! sequence attached to it:
//!
//! ```text
//! schedule (batcher: admit, preempt, chunk)  →  one batched forward  →  sample
//!   →  journal the step's tokens in one group append  →  deliver  →  repeat
//! ```
//!
//! No token crosses an actor or a mailbox on the way: task actors attach a request (its
//! journaled tokens, sampler state and delivery sink) and are told when it ends, fails or
//! must be attached again; they own its recovery, not its tokens.
//!
//! Faults: a panic in a request's own part of the step (sampling, its text; the
//! `task.step` point) crashes only that request's task, and the engine keeps its KV for
//! the task's next instance. A panic or hang of the step itself restarts the engine; the
//! crash ledger ([`crate::quarantine`]) makes sure a step that keeps crashing is narrowed
//! down to the one request that causes it, which fails alone. Exactness: the forward is
//! batch-invariant, so whatever the chunking and batching of a recomputation, the KV and
//! the logits are the original ones, bit for bit.

use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender};
use llmos_journal::{JournalError, Record};
use llmos_kernel::ractor::{Actor, ActorProcessingErr, ActorRef};
use llmos_kernel::{fault_point, Heartbeat};
use llmos_kv::KvStore;
use llmos_models::{SeqStep, StepOptions};

use crate::batcher::{self, Candidate, CostModel, StepBudget};
use crate::error::InferenceError;
use crate::kvpool::SeqKv;
use crate::quarantine::Isolation;
use crate::sampler::{sample, SamplerRng, SamplingParams};
use crate::services::{DeviceRuntime, LoadedModel, RequestState, RequestStatus, Services};
use crate::sink::{FinishReason, RequestSink};
use crate::task::{task_step_point_for, TaskMsg, TASK_STEP_POINT};
use crate::text::TextStream;

/// Fault point inside an engine's forward step (`panic` crashes the engine).
pub const ENGINE_STEP_POINT: &str = "engine.step";
/// Fault point that makes an engine's step block forever (detected by heartbeat).
pub const ENGINE_HANG_POINT: &str = "engine.hang";

/// Fault point before each layer of a step (`sleep(MS)`: a legitimately slow step, which
/// per-layer heartbeats keep from being taken for a hang).
pub const ENGINE_LAYER_POINT: &str = "engine.layer";

/// The fault point that crashes every step holding request `request`
/// (`engine.step:req-N`): a poison request, as the engine sees it.
pub fn engine_step_point_for(request: u64) -> String {
    format!("{ENGINE_STEP_POINT}:req-{request}")
}

/// The fault point that hangs every step holding request `request` (`engine.hang:req-N`).
pub fn engine_hang_point_for(request: u64) -> String {
    format!("{ENGINE_HANG_POINT}:req-{request}")
}

/// Work for an engine.
pub enum EngineMsg {
    /// Attaches (or re-attaches) a request: the engine runs it from its journaled state.
    Attach(Box<Attach>),
    /// The request ended or moved away: its KV blocks go back to the pool.
    Detach {
        /// Request id.
        seq: u64,
    },
    /// The compute thread died; the actor fails so the supervisor restarts the engine.
    ThreadFailed(String),
}

impl std::fmt::Debug for EngineMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineMsg::Attach(a) => f
                .debug_struct("Attach")
                .field("seq", &a.seq)
                .field("generation", &a.generation)
                .field("tokens", &a.tokens.len())
                .finish_non_exhaustive(),
            EngineMsg::Detach { seq } => f.debug_struct("Detach").field("seq", seq).finish(),
            EngineMsg::ThreadFailed(reason) => f.debug_tuple("ThreadFailed").field(reason).finish(),
        }
    }
}

/// A request as its task hands it to an engine: everything the journal says about it.
pub struct Attach {
    /// Request id (the sequence id in the pool).
    pub seq: u64,
    /// Generation of the task instance: an older one's attach is ignored.
    pub generation: u32,
    /// Prompt followed by the generated tokens so far.
    pub tokens: Vec<u32>,
    /// Tokens of the prompt.
    pub prompt_len: usize,
    /// Sampling parameters.
    pub params: SamplingParams,
    /// The sampler's RNG, positioned after the last generated token.
    pub rng: SamplerRng,
    /// The text shown so far (replayed from the generated tokens).
    pub text: TextStream,
    /// Where tokens go.
    pub sink: Arc<RequestSink>,
    /// The task to tell when the request ends, fails or must be attached again.
    pub task: ActorRef<TaskMsg>,
}

/// The engine actor. Its start arguments name the device it drives.
pub struct EngineActor {
    /// Shared services (model, pool, fault handling).
    pub services: Arc<Services>,
    /// Index of the device in `services.devices`.
    pub device: usize,
    /// Heartbeat of this instance.
    pub heartbeat: Heartbeat,
}

/// State of one engine instance: the sender to its thread.
pub struct EngineState {
    work: Sender<EngineMsg>,
}

impl Actor for EngineActor {
    type Msg = EngineMsg;
    type State = EngineState;
    type Arguments = ();

    async fn pre_start(
        &self,
        myself: ActorRef<EngineMsg>,
        _args: (),
    ) -> Result<EngineState, ActorProcessingErr> {
        llmos_kernel::faults::declare(ENGINE_STEP_POINT, "an engine's forward step fails");
        llmos_kernel::faults::declare(ENGINE_HANG_POINT, "an engine's forward step hangs");
        llmos_kernel::faults::declare(
            "engine.step:req-N",
            "every step holding request N fails (a poison request)",
        );
        llmos_kernel::faults::declare(
            "engine.hang:req-N",
            "every step holding request N hangs (a poison request)",
        );
        llmos_kernel::faults::declare(
            ENGINE_LAYER_POINT,
            "each layer of an engine step is slow (`sleep(MS)`)",
        );
        let runtime = self.services.devices[self.device].clone();
        let services = self.services.clone();
        let model = self.services.model()?;
        let (tx, rx) = channel::unbounded();
        let heartbeat = self.heartbeat.clone();
        let name = format!("engine-{}", runtime.device.id());
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let quarantine = runtime.quarantine.clone();
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    EngineThread::new(runtime, services, model, heartbeat).run(rx)
                }));
                let reason = match outcome {
                    Ok(()) => return,
                    Err(panic) => panic_text(&panic),
                };
                quarantine
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .note_failure(reason.clone());
                let _ = myself.send_message(EngineMsg::ThreadFailed(reason));
            })
            .map_err(|err| format!("cannot start the engine thread: {err}"))?;
        Ok(EngineState { work: tx })
    }

    async fn handle(
        &self,
        _myself: ActorRef<EngineMsg>,
        message: EngineMsg,
        state: &mut EngineState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            EngineMsg::ThreadFailed(reason) => Err(format!("engine step failed: {reason}").into()),
            work => state
                .work
                .send(work)
                .map_err(|_| "the engine thread is gone".into()),
        }
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// A request the engine holds.
struct Sequence {
    id: u64,
    generation: u32,
    /// Prompt + generated tokens; positions `0..kv.len()` have KV.
    tokens: Vec<u32>,
    prompt_len: usize,
    params: SamplingParams,
    rng: SamplerRng,
    text: TextStream,
    sink: Arc<RequestSink>,
    task: ActorRef<TaskMsg>,
    /// `None` while waiting: not yet admitted, or preempted.
    kv: Option<SeqKv>,
    preempted: bool,
    /// Exponentially weighted tokens per second.
    rate: f64,
}

impl Sequence {
    fn computed(&self) -> usize {
        self.kv.as_ref().map_or(0, |kv| kv.len())
    }

    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    fn state(&self) -> RequestState {
        match &self.kv {
            None if self.preempted => RequestState::Preempted,
            None => RequestState::Queued,
            Some(kv) if self.tokens.len() - kv.len() > 1 => RequestState::Prefill,
            Some(_) => RequestState::Decode,
        }
    }
}

/// KV an engine keeps for a request whose task is restarting.
struct Parked {
    generation: u32,
    tokens: Vec<u32>,
    kv: SeqKv,
}

/// A token sampled this step, not yet journaled.
struct Sampled {
    id: u64,
    token: u32,
    finish: Option<FinishReason>,
}

/// How a step went.
enum Stepped {
    /// It ran work.
    Ran,
    /// Nothing could run: wait for a message.
    Idle,
    /// This instance was abandoned (declared hung): stop without publishing anything.
    Abandoned,
}

struct EngineThread {
    runtime: DeviceRuntime,
    services: Arc<Services>,
    model: Arc<LoadedModel>,
    heartbeat: Heartbeat,
    seqs: BTreeMap<u64, Sequence>,
    parked: HashMap<u64, Parked>,
    cost: CostModel,
    budget: StepBudget,
    lost: bool,
}

impl EngineThread {
    fn new(
        runtime: DeviceRuntime,
        services: Arc<Services>,
        model: Arc<LoadedModel>,
        heartbeat: Heartbeat,
    ) -> Self {
        let config = &services.config;
        let budget = StepBudget {
            max_tokens: config.max_batch_tokens.max(1),
            max_seqs: config.max_batch_seqs.max(1),
            prefill_stall: config.prefill_stall,
        };
        Self {
            runtime,
            services,
            model,
            heartbeat,
            seqs: BTreeMap::new(),
            parked: HashMap::new(),
            cost: CostModel::default(),
            budget,
            lost: false,
        }
    }

    fn device_name(&self) -> String {
        self.runtime.device.id().to_string()
    }

    /// Runs the engine loop on a rayon pool of its own: our kernels and candle's run on
    /// the calling worker's pool without a hand-off per op, and a hung engine parks only
    /// its own pool's threads, never the global pool's.
    fn run(self, rx: Receiver<EngineMsg>) {
        let threads = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n > 0)
            .unwrap_or_else(rayon::current_num_threads);
        let name = format!("engine-{}", self.runtime.device.id());
        match rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(move |i| format!("{name}-{i}"))
            .build()
        {
            Ok(pool) => pool.install(|| self.serve(rx)),
            // Without its own pool the engine still works, on the global one.
            Err(err) => {
                tracing::warn!(error = %err, "engine: no dedicated thread pool");
                self.serve(rx)
            }
        }
    }

    fn serve(mut self, rx: Receiver<EngineMsg>) {
        let device = self.device_name();
        let poisoned = self
            .runtime
            .quarantine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .recover(&device);
        for request in poisoned {
            tracing::error!(target: "llmos::engine", request, %device, "poison request isolated: it fails alone");
            self.services.metrics.poisoned.inc();
        }
        let mut idle = false;
        loop {
            if idle {
                self.heartbeat.idle();
                // A bounded wait: nothing changes without a message, but a periodic look
                // costs nothing and guards against a missed wake-up.
                match rx.recv_timeout(Duration::from_millis(500)) {
                    Ok(message) => self.on_message(message),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            if self.heartbeat.beat().is_err() {
                return;
            }
            while let Ok(message) = rx.try_recv() {
                self.on_message(message);
            }
            match self.step() {
                Stepped::Ran => idle = false,
                Stepped::Idle => idle = true,
                Stepped::Abandoned => return,
            }
        }
    }

    fn on_message(&mut self, message: EngineMsg) {
        match message {
            EngineMsg::Attach(attach) => self.attach(*attach),
            EngineMsg::Detach { seq } => self.detach(seq),
            EngineMsg::ThreadFailed(_) => {}
        }
    }

    /// Takes a request over from its task: keeps the KV this engine still holds for it
    /// (as far as it agrees with the journal), else it waits for admission, which
    /// restores what the pool can verify and recomputes the rest.
    fn attach(&mut self, a: Attach) {
        let reason = self
            .runtime
            .quarantine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_poisoned(a.seq);
        if let Some(reason) = reason {
            self.fail_request(a.seq, &a.sink, &a.task, a.generation, reason);
            return;
        }
        if self.lost {
            let _ = a.task.send_message(TaskMsg::Reattach);
            return;
        }
        if a.tokens.is_empty() || a.prompt_len == 0 || a.prompt_len > a.tokens.len() {
            let error = format!(
                "attach of {} tokens with a prompt of {}",
                a.tokens.len(),
                a.prompt_len
            );
            self.fail_request(a.seq, &a.sink, &a.task, a.generation, error);
            return;
        }
        if self
            .seqs
            .get(&a.seq)
            .is_some_and(|s| s.generation > a.generation)
        {
            return;
        }
        let held = match self.seqs.remove(&a.seq) {
            Some(s) => s.kv.map(|kv| (s.tokens, kv)),
            None => None,
        }
        .or_else(|| {
            self.parked
                .remove(&a.seq)
                .filter(|p| p.generation <= a.generation)
                .map(|p| (p.tokens, p.kv))
        });
        let wanted = a.tokens.len() - 1;
        let kv = held.map(|(tokens, mut kv)| {
            let agree = tokens
                .iter()
                .zip(&a.tokens)
                .take_while(|(x, y)| x == y)
                .count();
            let keep = kv.len().min(agree).min(wanted);
            kv.truncate(keep);
            self.runtime
                .kv_stats
                .kept
                .fetch_add(keep as u64, Ordering::Relaxed);
            kv
        });
        let sequence = Sequence {
            id: a.seq,
            generation: a.generation,
            tokens: a.tokens,
            prompt_len: a.prompt_len,
            params: a.params,
            rng: a.rng,
            text: a.text,
            sink: a.sink,
            task: a.task,
            kv,
            preempted: false,
            rate: 0.0,
        };
        self.publish_status(&sequence);
        self.seqs.insert(a.seq, sequence);
    }

    fn detach(&mut self, seq: u64) {
        if let Some(s) = self.seqs.remove(&seq) {
            if let Some(kv) = s.kv {
                kv.release();
            }
        }
        if let Some(p) = self.parked.remove(&seq) {
            p.kv.release();
        }
        self.forget(seq);
    }

    fn forget(&self, seq: u64) {
        self.services.clear_status_on(seq, &self.device_name());
        self.runtime
            .quarantine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget(seq);
    }

    /// Fails a request for good: journals its end (when the journal takes it), tells its
    /// client and its task.
    fn fail_request(
        &mut self,
        seq: u64,
        sink: &RequestSink,
        task: &ActorRef<TaskMsg>,
        generation: u32,
        error: String,
    ) {
        tracing::error!(target: "llmos::engine", request = seq, %error, "request failed");
        let end = Record::End {
            request: seq,
            reason: FinishReason::Error.code(),
        };
        let appended = self.services.journal().and_then(|journal| {
            let mut journal = journal.lock().unwrap_or_else(|e| e.into_inner());
            if self.services.task_generation(seq) != generation {
                return Err(InferenceError::Superseded(seq));
            }
            let result = journal.append(&end);
            self.services.note_journal_append(&result);
            result.map_err(InferenceError::from)
        });
        if let Err(err) = appended {
            tracing::warn!(request = seq, error = %err, "could not journal the failure");
        }
        sink.fail(error.clone());
        let _ = task.send_message(TaskMsg::Failed { error });
        self.detach(seq);
    }

    /// The device is lost: every request goes back to its task to be placed elsewhere.
    fn device_lost(&mut self, error: &str) {
        tracing::error!(target: "llmos::engine", device = %self.device_name(), %error, "device lost; handing requests back");
        self.lost = true;
        for (_, s) in std::mem::take(&mut self.seqs) {
            let _ = s.task.send_message(TaskMsg::Reattach);
            self.forget(s.id);
        }
        self.parked.clear();
    }

    /// Brings waiting sequences in, oldest first, while their KV fits.
    fn admit_waiting(&mut self) {
        let waiting: Vec<Candidate> = self
            .seqs
            .values()
            .filter(|s| s.kv.is_none())
            .map(|s| Candidate {
                id: s.id,
                computed: 0,
                len: s.tokens.len(),
                held_blocks: 0,
            })
            .collect();
        if waiting.is_empty() {
            return;
        }
        let stats = self.runtime.pool.stats();
        let running = self.seqs.len() - waiting.len();
        let mut admitted = batcher::admit(
            &waiting,
            running,
            stats.free,
            stats.total,
            stats.block_tokens,
            self.budget.max_seqs,
        );
        if admitted.is_empty() && !self.parked.is_empty() {
            // KV kept for restarting tasks is worth less than a waiting request: it stays
            // restorable from the pool.
            self.parked.clear();
            let stats = self.runtime.pool.stats();
            admitted = batcher::admit(
                &waiting,
                running,
                stats.free,
                stats.total,
                stats.block_tokens,
                self.budget.max_seqs,
            );
        }
        for id in admitted {
            let Some(s) = self.seqs.get_mut(&id) else {
                continue;
            };
            let wanted = s.tokens.len() - 1;
            match self.runtime.pool.restore(id, &s.tokens[..wanted]) {
                Ok((kv, valid)) => {
                    let stats = &self.runtime.kv_stats;
                    stats.restored.fetch_add(valid as u64, Ordering::Relaxed);
                    stats
                        .recomputed
                        .fetch_add((wanted - valid) as u64, Ordering::Relaxed);
                    tracing::info!(
                        target: "llmos::engine",
                        seq = id,
                        device = %self.runtime.device.id(),
                        positions = wanted,
                        restored = valid,
                        recomputed = wanted - valid,
                        preempted = s.preempted,
                        "sequence admitted"
                    );
                    s.kv = Some(kv);
                }
                Err(err) => {
                    tracing::warn!(seq = id, error = %err, "cannot take KV for a sequence; it waits");
                    break;
                }
            }
        }
    }

    /// One step: schedule, forward, sample, journal, deliver.
    fn step(&mut self) -> Stepped {
        let started = Instant::now();
        if self.lost {
            return Stepped::Idle;
        }
        if let Err(err) = self.runtime.device.check() {
            self.device_lost(&err.to_string());
            return Stepped::Idle;
        }
        self.admit_waiting();
        let isolation = {
            let seqs = &self.seqs;
            self.runtime
                .quarantine
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .plan(|id| seqs.get(&id).is_some_and(|s| s.kv.is_some()))
        };
        let mut plan = self.plan(&isolation);
        if !plan.preempt.is_empty() && !self.parked.is_empty() {
            self.parked.clear();
            plan = self.plan(&isolation);
        }
        for id in &plan.preempt {
            if let Some(s) = self.seqs.get_mut(id) {
                // Dropped, not released: its sealed blocks stay restorable until needed.
                s.kv = None;
                s.preempted = true;
                self.services.metrics.preemptions.inc();
                tracing::info!(target: "llmos::engine", seq = id, device = %self.runtime.device.id(), "sequence preempted (KV memory)");
            }
        }
        // Reserve each sequence's blocks now: a forward never runs out of memory midway.
        let mut run = Vec::with_capacity(plan.run.len());
        for (id, n) in plan.run {
            let Some(s) = self.seqs.get_mut(&id) else {
                continue;
            };
            let Some(kv) = s.kv.as_mut() else { continue };
            let end = kv.len() + n;
            match kv.reserve(end) {
                Ok(()) => run.push((id, n)),
                Err(err) => {
                    tracing::warn!(seq = id, error = %err, "no KV room after planning; preempting");
                    s.kv = None;
                    s.preempted = true;
                    self.services.metrics.preemptions.inc();
                }
            }
        }
        if run.is_empty() {
            self.publish_all();
            return Stepped::Idle;
        }
        if !matches!(isolation, Isolation::None) {
            self.services.metrics.isolation_steps.inc();
        }
        let ids: Vec<u64> = run.iter().map(|(id, _)| *id).collect();
        self.runtime
            .quarantine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .begin_step(&ids);
        maybe_hang(&ids);
        fault_point!(ENGINE_STEP_POINT);
        for &id in &ids {
            fault_point!(&engine_step_point_for(id));
        }
        let forward_started = Instant::now();
        let rows: usize = run.iter().map(|(_, n)| n).sum();
        let result = self.forward(&run);
        // A thread that was declared hung and woke up must not publish anything.
        if self.heartbeat.check().is_err() {
            return Stepped::Abandoned;
        }
        let logits = match result {
            Ok(logits) => {
                self.runtime
                    .quarantine
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .step_passed();
                let forward = forward_started.elapsed().as_secs_f64();
                self.cost.observe(rows, forward);
                self.services.metrics.forward_time.observe(forward);
                logits
            }
            Err(err) => {
                // A failing forward is handled like a crash, without a restart: retried,
                // then narrowed down to the request that causes it.
                let text = err.to_string();
                tracing::warn!(target: "llmos::engine", error = %text, batch = ?ids, "engine step failed");
                let device = self.device_name();
                let poisoned = self
                    .runtime
                    .quarantine
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .step_failed(&device, &text);
                for id in poisoned {
                    self.services.metrics.poisoned.inc();
                    let reason = self
                        .runtime
                        .quarantine
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take_poisoned(id)
                        .unwrap_or(text.clone());
                    if let Some(s) = self.seqs.get(&id) {
                        let (sink, task, generation) =
                            (s.sink.clone(), s.task.clone(), s.generation);
                        self.fail_request(id, &sink, &task, generation, reason);
                    }
                }
                return Stepped::Ran;
            }
        };
        let sampled = self.sample(&run, logits);
        self.commit(sampled);
        let metrics = &self.services.metrics;
        metrics.step_time.observe(started.elapsed().as_secs_f64());
        metrics.batch_sequences.observe(run.len() as f64);
        metrics.batch_tokens.observe(rows as f64);
        self.publish_all();
        Stepped::Ran
    }

    /// The batcher's decision for the sequences that hold KV.
    fn plan(&self, isolation: &Isolation) -> batcher::Plan {
        let stats = self.runtime.pool.stats();
        let bt = stats.block_tokens;
        let running: Vec<Candidate> = self
            .seqs
            .values()
            .filter_map(|s| {
                s.kv.as_ref().map(|kv| Candidate {
                    id: s.id,
                    computed: kv.len(),
                    len: s.tokens.len(),
                    held_blocks: kv.blocks().len(),
                })
            })
            .collect();
        let decodes = running.iter().filter(|c| c.len - c.computed == 1).count();
        // Requests waiting for their first token (prefilling, or not admitted yet) count
        // as much as decoding ones: steps stretch with their share (a burst of new
        // prompts is not throttled for a few early streams).
        let waiting = self.seqs.len() - decodes;
        let stall = batcher::fair_stall(self.budget.prefill_stall, decodes, waiting);
        let allowance = self.cost.prefill_allowance(
            decodes,
            stall,
            self.services.config.prefill_floor.as_secs_f64(),
            self.budget.max_tokens,
        );
        tracing::debug!(
            target: "llmos::engine",
            decodes,
            waiting,
            stall,
            allowance,
            decode_only_ms = self.cost.predict(decodes.max(1)).unwrap_or(0.0) * 1e3,
            "step budget"
        );
        batcher::plan(&running, stats.free, bt, self.budget, allowance, isolation)
    }

    /// One batched forward over `run` (sequence, tokens to feed); returns the logits of
    /// the sequences whose chunk ends their pending tokens (they sample this step).
    fn forward(&mut self, run: &[(u64, usize)]) -> Result<Vec<Option<Vec<f32>>>, InferenceError> {
        let mut taken: Vec<Sequence> = run
            .iter()
            .filter_map(|(id, _)| self.seqs.remove(id))
            .collect();
        let mut wanted = Vec::with_capacity(taken.len());
        let mut chunked = 0u64;
        for (s, (_, n)) in taken.iter_mut().zip(run) {
            let start = s.computed();
            let end = start + n;
            wanted.push(end == s.tokens.len());
            if end < s.tokens.len() {
                chunked += 1;
            }
            if let Some(kv) = s.kv.as_mut() {
                // Errors here only delay sealing; the forward reports real problems.
                let _ = kv.record_tokens(start, &s.tokens[start..end]);
            }
        }
        self.services.metrics.chunked_prefills.inc_by(chunked);
        for s in &taken {
            if let Some(wait) = self.services.take_queue_wait(s.id) {
                self.services.metrics.queue_wait.observe(wait.as_secs_f64());
            }
        }
        let model = &self.model.model;
        let heartbeat = &self.heartbeat;
        let batch = &mut taken;
        let wanted_ref = &wanted;
        let rows: usize = run.iter().map(|&(_, n)| n).sum();
        let on_pool = model.step_wants_pool(rows);
        let mut step = || {
            let mut steps: Vec<SeqStep<'_>> = batch
                .iter_mut()
                .zip(run)
                .filter_map(|(s, (_, n))| {
                    let start = s.kv.as_ref()?.len();
                    let tokens = &s.tokens[start..start + n];
                    Some(SeqStep {
                        tokens,
                        start_pos: start,
                        kv: s.kv.as_mut()?,
                    })
                })
                .collect();
            let mut beat = |_layer: usize| {
                fault_point!(ENGINE_LAYER_POINT, |_| false);
                heartbeat.beat().is_ok()
            };
            model.forward_with(
                &mut steps,
                StepOptions {
                    logits: Some(wanted_ref),
                    on_layer: Some(&mut beat),
                },
            )
        };
        // A small step runs here: handing it to the pool costs more than it computes.
        let result = if on_pool {
            llmos_models::on_cpu_pool(step)
        } else {
            step()
        };
        for s in taken {
            self.seqs.insert(s.id, s);
        }
        Ok(result?)
    }

    /// Samples the next token of every sequence whose logits came back. A panic in one
    /// request's sampling (or the `task.step` fault point) crashes that request's task
    /// only: the engine parks its KV for the task's next instance.
    fn sample(&mut self, run: &[(u64, usize)], logits: Vec<Option<Vec<f32>>>) -> Vec<Sampled> {
        let context = self.model.context;
        let eos = self.model.eos;
        let tokenizer = self.model.tokenizer.clone();
        let mut sampled = Vec::new();
        let mut crashed = Vec::new();
        for ((id, _), logits) in run.iter().zip(logits) {
            let Some(logits) = logits else { continue };
            let Some(s) = self.seqs.get_mut(id) else {
                continue;
            };
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                let token = sample(&logits, &s.params, &s.tokens, &mut s.rng)?;
                let injected = || Err(InferenceError::Internal("injected task.step fault".into()));
                fault_point!(TASK_STEP_POINT, |_| injected());
                fault_point!(&task_step_point_for(*id), |_| injected());
                Ok::<u32, InferenceError>(token)
            }));
            let token = match outcome {
                Ok(Ok(token)) => token,
                Ok(Err(err)) => {
                    crashed.push((*id, err.to_string()));
                    continue;
                }
                Err(panic) => {
                    crashed.push((*id, panic_text(&panic)));
                    continue;
                }
            };
            s.tokens.push(token);
            s.text.push(&tokenizer, token);
            let generated = s.tokens.len() - s.prompt_len;
            let mut finish = if token == eos {
                Some(FinishReason::Stop)
            } else if generated >= s.params.max_tokens || s.tokens.len() >= context {
                Some(FinishReason::Length)
            } else {
                None
            };
            if finish.is_some() {
                s.text.finish();
            }
            if finish.is_none() && s.text.stopped() {
                finish = Some(FinishReason::Stop);
            }
            sampled.push(Sampled {
                id: *id,
                token,
                finish,
            });
        }
        for (id, reason) in crashed {
            if let Some(s) = self.seqs.remove(&id) {
                tracing::warn!(target: "llmos::engine", request = id, %reason, "request crashed in its step");
                let task = s.task.clone();
                self.park(s);
                let _ = task.send_message(TaskMsg::Crashed { reason });
            }
        }
        sampled
    }

    /// Keeps a sequence's KV (if it holds any) for the next instance of its task.
    fn park(&mut self, s: Sequence) {
        if let Some(kv) = s.kv {
            self.parked.insert(
                s.id,
                Parked {
                    generation: s.generation,
                    tokens: s.tokens,
                    kv,
                },
            );
        }
    }

    /// Journals the step's tokens (and ends) in one group append, then delivers them.
    fn commit(&mut self, sampled: Vec<Sampled>) {
        if sampled.is_empty() {
            return;
        }
        let attempts = self.services.config.journal_attempts.max(1);
        let mut delay = Duration::from_millis(1);
        let mut outcome = Err(None);
        let mut included: Vec<&Sampled> = Vec::new();
        let mut superseded: Vec<u64> = Vec::new();
        for attempt in 0..attempts {
            included.clear();
            superseded.clear();
            let result = self.append_step(&sampled, &mut included, &mut superseded);
            match result {
                Ok(()) => {
                    outcome = Ok(());
                    break;
                }
                Err(err) => {
                    tracing::warn!(attempt, error = %err, "journal group append failed");
                    let rejected =
                        matches!(err, InferenceError::Journal(JournalError::Rejected { .. }));
                    outcome = Err(Some(err));
                    if rejected {
                        break;
                    }
                    // A transient error often clears at once: the first retry is
                    // immediate, later ones back off.
                    if attempt > 0 && attempt + 1 < attempts {
                        std::thread::sleep(delay);
                        delay *= 4;
                    }
                }
            }
        }
        for id in superseded {
            // A newer task instance owns the request: keep the KV for its attach.
            if let Some(mut s) = self.seqs.remove(&id) {
                s.tokens.pop();
                self.park(s);
            }
        }
        match outcome {
            Ok(()) => {
                let delivered: Vec<(u64, u32, Option<FinishReason>)> =
                    included.iter().map(|s| (s.id, s.token, s.finish)).collect();
                for (id, token, finish) in delivered {
                    self.deliver(id, token, finish);
                }
            }
            Err(Some(InferenceError::Journal(JournalError::Rejected { violation }))) => {
                // One request's record broke the sequence rules: find it, fail it alone.
                let ids: Vec<u64> = included.iter().map(|s| s.id).collect();
                let singles: Vec<Sampled> = sampled
                    .into_iter()
                    .filter(|s| ids.contains(&s.id))
                    .collect();
                for one in singles {
                    let mut inc = Vec::new();
                    let mut sup = Vec::new();
                    match self.append_step(std::slice::from_ref(&one), &mut inc, &mut sup) {
                        Ok(()) if !inc.is_empty() => self.deliver(one.id, one.token, one.finish),
                        Ok(()) => {}
                        Err(err) => {
                            if let Some(s) = self.seqs.get(&one.id) {
                                let (sink, task, generation) =
                                    (s.sink.clone(), s.task.clone(), s.generation);
                                let error =
                                    format!("the journal refused its token ({violation}): {err}");
                                self.fail_request(one.id, &sink, &task, generation, error);
                            }
                        }
                    }
                }
            }
            Err(err) => {
                // Retried already: a restart would fail the same way. The requests fail
                // cleanly; every token their clients saw is durable.
                let error = match err {
                    Some(err) => format!("the journal refused writes: {err}"),
                    None => "the journal refused writes".to_string(),
                };
                let ids: Vec<u64> = included.iter().map(|s| s.id).collect();
                for id in ids {
                    if let Some(s) = self.seqs.remove(&id) {
                        s.sink.fail(error.clone());
                        let _ = s.task.send_message(TaskMsg::Failed {
                            error: error.clone(),
                        });
                        self.forget(id);
                    }
                }
            }
        }
    }

    /// One group append of `sampled` (those whose task instance is still current, listed
    /// in `included`; the others in `superseded`), fenced by generation under the
    /// journal's lock.
    fn append_step<'s>(
        &self,
        sampled: &'s [Sampled],
        included: &mut Vec<&'s Sampled>,
        superseded: &mut Vec<u64>,
    ) -> Result<(), InferenceError> {
        let journal = self.services.journal()?;
        let mut journal = journal.lock().unwrap_or_else(|e| e.into_inner());
        let mut records = Vec::with_capacity(sampled.len() + 4);
        for one in sampled {
            let Some(s) = self.seqs.get(&one.id) else {
                continue;
            };
            // Checked under the journal lock: a newer instance reads the journal under the
            // same lock after taking its generation, so no write slips in between.
            if self.services.task_generation(one.id) != s.generation {
                superseded.push(one.id);
                continue;
            }
            records.push(Record::Token {
                request: one.id,
                index: (s.generated() - 1) as u32,
                token: one.token,
                sampler_state: s.rng.state(),
            });
            if let Some(reason) = one.finish {
                records.push(Record::End {
                    request: one.id,
                    reason: reason.code(),
                });
            }
            included.push(one);
        }
        if records.is_empty() {
            return Ok(());
        }
        let result = journal.append_batch(&records);
        self.services.note_journal_append(&result);
        Ok(result?)
    }

    /// Hands a journaled token to the request's clients; ends the request if it is done.
    fn deliver(&mut self, id: u64, token: u32, finish: Option<FinishReason>) {
        let Some(s) = self.seqs.get_mut(&id) else {
            return;
        };
        let now = Instant::now();
        let index = (s.generated() - 1) as u32;
        let delivered = s.sink.deliver(index, token, s.text.visible().text);
        let metrics = &self.services.metrics;
        match delivered.map(|d| d.gap) {
            Some(Some(gap)) => {
                let gap = gap.as_secs_f64();
                metrics.inter_token_latency.observe(gap);
                if gap > 0.0 {
                    s.rate = if s.rate == 0.0 {
                        1.0 / gap
                    } else {
                        0.8 * s.rate + 0.2 / gap
                    };
                }
            }
            Some(None) if index == 0 => {
                if let Some(submitted) = self.services.submitted_at(id) {
                    metrics
                        .time_to_first_token
                        .observe(now.duration_since(submitted).as_secs_f64());
                }
            }
            _ => {}
        }
        let Some(reason) = finish else { return };
        let s = self.seqs.remove(&id).expect("present above");
        s.sink.finish(reason, s.prompt_len, s.generated());
        let _ = s.task.send_message(TaskMsg::Finished);
        if let Some(kv) = s.kv {
            kv.release();
        }
        self.forget(id);
    }

    fn status_of(&self, s: &Sequence) -> RequestStatus {
        RequestStatus {
            device: self.device_name(),
            state: s.state(),
            prompt_tokens: s.prompt_len,
            generated: s.generated(),
            kv_positions: s.computed(),
            tokens_per_sec: s.rate,
        }
    }

    fn publish_status(&self, s: &Sequence) {
        self.services.set_status([(s.id, self.status_of(s))]);
    }

    /// Publishes every held request's state (for `llmos ctl requests` and `top`).
    fn publish_all(&self) {
        let updates: Vec<(u64, RequestStatus)> = self
            .seqs
            .values()
            .map(|s| (s.id, self.status_of(s)))
            .collect();
        self.services.set_status(updates);
    }
}

/// Blocks this thread forever when `engine.hang` (or `engine.hang:req-N` for a request
/// of the step) fires: a stuck kernel, as the heartbeat watchdog sees it.
fn maybe_hang(ids: &[u64]) {
    let hang = || loop {
        std::thread::park();
    };
    fault_point!(ENGINE_HANG_POINT, |_| hang());
    for &id in ids {
        fault_point!(&engine_hang_point_for(id), |_| hang());
    }
}
