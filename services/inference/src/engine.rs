//! The engine of one device: an actor that owns a compute thread running batched forward
//! steps, watched by the kernel's heartbeat (blocking compute cannot be killed).
//!
//! Per step the thread takes every pending request (a batch), prepares each sequence's KV
//! (kept from earlier steps, restored from the device's block pool when it validates, or
//! recomputed from the tokens), runs one forward over the batch and sends each task its
//! logits. Recomputation replays the original shapes — the prompt as one chunk, then one
//! token at a time — so the recomputed KV is bit-identical and resume is exact.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crossbeam::channel::{self, Receiver, Sender};
use llmos_kernel::ractor::{Actor, ActorProcessingErr, ActorRef};
use llmos_kernel::{fault_point, Heartbeat};
use llmos_kv::KvStore;
use llmos_models::SeqStep;

use crate::error::InferenceError;
use crate::services::{DeviceRuntime, Services};
use crate::task::TaskMsg;

/// Fault point inside an engine's forward step (`panic` crashes the engine).
pub const ENGINE_STEP_POINT: &str = "engine.step";
/// Fault point that makes an engine's step block forever (detected by heartbeat).
pub const ENGINE_HANG_POINT: &str = "engine.hang";

/// Work for an engine.
#[derive(Debug)]
pub enum EngineMsg {
    /// (Re)attaches a sequence and asks for the logits after its last token. `tokens` is
    /// the prompt followed by the generated tokens; `prompt_len` says where the prompt
    /// ends (to replay the original shapes when recomputing).
    Attach {
        /// Request id (the sequence id in the pool).
        seq: u64,
        /// Prompt + generated tokens so far.
        tokens: Vec<u32>,
        /// Tokens of the prompt.
        prompt_len: usize,
        /// Generation of the task instance: an older one's messages are ignored.
        generation: u32,
        /// The task's step number, echoed back.
        step: u64,
        /// Where to send the logits.
        reply: ActorRef<TaskMsg>,
    },
    /// Appends one token to an attached sequence and asks for the next logits.
    Next {
        /// Request id.
        seq: u64,
        /// The token just sampled.
        token: u32,
        /// Generation of the task instance.
        generation: u32,
        /// The task's step number, echoed back.
        step: u64,
        /// Where to send the logits.
        reply: ActorRef<TaskMsg>,
    },
    /// The sequence is finished: its KV blocks go back to the pool.
    Detach {
        /// Request id.
        seq: u64,
    },
    /// The compute thread died; the actor fails so the supervisor restarts the engine.
    ThreadFailed(String),
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
        let runtime = self.services.devices[self.device].clone();
        let model = self.services.model()?;
        let (tx, rx) = channel::unbounded();
        let heartbeat = self.heartbeat.clone();
        let name = format!("engine-{}", runtime.device.id());
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    EngineThread::new(runtime, model, heartbeat).run(rx)
                }));
                let reason = match outcome {
                    Ok(()) => return,
                    Err(panic) => panic_text(&panic),
                };
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

/// A sequence the engine holds KV for.
struct Sequence {
    kv: crate::kvpool::SeqKv,
    /// Generation of the task instance that owns the sequence now.
    generation: u32,
    /// Tokens whose KV is in `kv` (its first `kv.len()` entries), then the pending ones.
    tokens: Vec<u32>,
}

/// A sequence to run in this step, and where its logits (tagged with `step`) go.
struct Job {
    seq: u64,
    step: u64,
    reply: ActorRef<TaskMsg>,
}

struct EngineThread {
    runtime: DeviceRuntime,
    model: Arc<crate::services::LoadedModel>,
    heartbeat: Heartbeat,
    sequences: HashMap<u64, Sequence>,
}

impl EngineThread {
    fn new(
        runtime: DeviceRuntime,
        model: Arc<crate::services::LoadedModel>,
        heartbeat: Heartbeat,
    ) -> Self {
        Self {
            runtime,
            model,
            heartbeat,
            sequences: HashMap::new(),
        }
    }

    /// Runs the engine loop on a rayon pool of its own: candle's CPU kernels then run on
    /// the calling worker's pool without a hand-off per step, and a hung engine parks only
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
        loop {
            self.heartbeat.idle();
            let Ok(first) = rx.recv() else { return };
            if self.heartbeat.beat().is_err() {
                return;
            }
            let mut batch = vec![first];
            batch.extend(rx.try_iter());
            if !self.step(batch) {
                return;
            }
        }
    }

    /// One engine step over a batch of requests; `false` once this instance is abandoned.
    fn step(&mut self, batch: Vec<EngineMsg>) -> bool {
        maybe_hang();
        let started = Instant::now();
        let mut jobs = Vec::new();
        for message in batch {
            match message {
                EngineMsg::Detach { seq } => {
                    if let Some(sequence) = self.sequences.remove(&seq) {
                        sequence.kv.release();
                    }
                }
                EngineMsg::Attach {
                    seq,
                    tokens,
                    prompt_len,
                    generation,
                    step,
                    reply,
                } => {
                    let superseded = self
                        .sequences
                        .get(&seq)
                        .is_some_and(|s| s.generation > generation);
                    if superseded {
                        continue;
                    }
                    // A job already in this batch for the sequence came from the instance this
                    // attach replaces (a task has one step outstanding at a time).
                    jobs.retain(|job: &Job| job.seq != seq);
                    let job = Job { seq, step, reply };
                    match self.attach(seq, tokens, prompt_len, generation) {
                        Ok(()) => jobs.push(job),
                        Err(err) => fail_job(job, err),
                    }
                }
                EngineMsg::Next {
                    seq,
                    token,
                    generation,
                    step,
                    reply,
                } => {
                    let job = Job { seq, step, reply };
                    match self.sequences.get_mut(&seq) {
                        // A superseded task instance: its replacement owns the sequence.
                        Some(sequence) if sequence.generation != generation => {}
                        Some(sequence) => {
                            sequence.tokens.push(token);
                            jobs.push(job);
                        }
                        None => {
                            let _ = job.reply.send_message(TaskMsg::Reattach { step: job.step });
                        }
                    }
                }
                EngineMsg::ThreadFailed(_) => {}
            }
        }
        if jobs.is_empty() {
            return self.heartbeat.check().is_ok();
        }
        if let Err(err) = self.runtime.device.check() {
            for job in jobs {
                fail_job(job, InferenceError::Device(err.clone()));
            }
            return self.heartbeat.check().is_ok();
        }
        fault_point!(ENGINE_STEP_POINT);
        let seqs: Vec<u64> = jobs.iter().map(|job| job.seq).collect();
        let results = self.forward(&seqs);
        // A thread that was declared hung and woke up must not publish anything.
        if self.heartbeat.check().is_err() {
            return false;
        }
        match results {
            Ok(logits) => {
                for (job, logits) in jobs.into_iter().zip(logits) {
                    let _ = job.reply.send_message(TaskMsg::Logits {
                        step: job.step,
                        logits,
                    });
                }
            }
            Err(err) => {
                let text = err.to_string();
                for job in jobs {
                    fail_job(job, InferenceError::Internal(text.clone()));
                }
            }
        }
        tracing::trace!(elapsed = ?started.elapsed(), "engine step");
        true
    }

    /// Makes `seq` hold KV for all of `tokens` but the last, which is left pending.
    fn attach(
        &mut self,
        seq: u64,
        tokens: Vec<u32>,
        prompt_len: usize,
        generation: u32,
    ) -> Result<(), InferenceError> {
        if tokens.is_empty() || prompt_len == 0 || prompt_len > tokens.len() {
            return Err(InferenceError::Internal(format!(
                "attach of {} tokens with prompt {prompt_len}",
                tokens.len()
            )));
        }
        // KV is prepared up to `wanted`; the rest is fed by the step's forward. A request
        // that has generated nothing feeds its whole prompt as one chunk, exactly as a
        // replay does later: the same shapes round the same way, so recomputed KV is
        // bit-identical to the original.
        let wanted = if tokens.len() <= prompt_len {
            0
        } else {
            tokens.len() - 1
        };
        let mut from_pool = false;
        let mut sequence = match self.sequences.remove(&seq) {
            // Still held from before the task restarted: keep the agreeing prefix.
            Some(held) => {
                let agree = held
                    .tokens
                    .iter()
                    .zip(&tokens)
                    .take_while(|(a, b)| a == b)
                    .count();
                let mut kv = held.kv;
                let keep = kv.len().min(agree).min(wanted);
                kv.truncate(keep);
                self.runtime
                    .kv_stats
                    .kept
                    .fetch_add(keep as u64, Ordering::Relaxed);
                Sequence {
                    kv,
                    generation,
                    tokens: tokens[..keep].to_vec(),
                }
            }
            // Not held by this engine instance: restore what validates from the pool.
            None => {
                let (kv, valid) = self.runtime.pool.restore(seq, &tokens[..wanted])?;
                from_pool = true;
                Sequence {
                    tokens: tokens[..valid].to_vec(),
                    generation,
                    kv,
                }
            }
        };
        // A prefix that ends inside the prompt is recomputed from the start: the prompt
        // was one chunk originally, and a shorter chunk would round differently.
        if sequence.kv.len() < prompt_len && wanted > 0 {
            sequence.kv.truncate(0);
            sequence.tokens.clear();
        }
        if from_pool {
            self.runtime
                .kv_stats
                .restored
                .fetch_add(sequence.tokens.len() as u64, Ordering::Relaxed);
        }
        // Replay up to (not including) the last token with the original chunking.
        let recompute = wanted - sequence.tokens.len();
        tracing::info!(
            target: "llmos::engine",
            seq,
            device = %self.runtime.device.id(),
            positions = wanted,
            restored = if from_pool { sequence.tokens.len() } else { 0 },
            recomputed = recompute,
            "sequence attached"
        );
        self.runtime
            .kv_stats
            .recomputed
            .fetch_add(recompute as u64, Ordering::Relaxed);
        while sequence.tokens.len() < wanted {
            let start = sequence.tokens.len();
            let end = if start < prompt_len {
                prompt_len
            } else {
                start + 1
            };
            let chunk = &tokens[start..end];
            if self.heartbeat.beat().is_err() {
                return Err(InferenceError::Internal("engine abandoned".into()));
            }
            sequence.kv.record_tokens(start, chunk)?;
            let model = &self.model.model;
            let kv = &mut sequence.kv;
            // On a rayon worker: candle's CPU kernels then run without a thread hop per op.
            llmos_models::on_cpu_pool(|| {
                model.forward(&mut [SeqStep {
                    tokens: chunk,
                    start_pos: start,
                    kv,
                }])
            })?;
            sequence.tokens.extend_from_slice(chunk);
        }
        sequence.tokens.extend_from_slice(&tokens[wanted..]);
        self.sequences.insert(seq, sequence);
        Ok(())
    }

    /// One batched forward: each job's pending tokens (the prompt for a fresh sequence, one
    /// token otherwise); returns the logits after each job's last token.
    fn forward(&mut self, seqs: &[u64]) -> Result<Vec<Vec<f32>>, InferenceError> {
        let mut taken = Vec::with_capacity(seqs.len());
        for &seq in seqs {
            match self.sequences.remove(&seq) {
                Some(sequence) => taken.push((seq, sequence)),
                None => {
                    self.sequences.extend(taken);
                    return Err(InferenceError::Internal(format!(
                        "sequence {seq} is not attached or appears twice in one step"
                    )));
                }
            }
        }
        let model = &self.model.model;
        let batch = &mut taken;
        let result = llmos_models::on_cpu_pool(|| {
            let mut steps: Vec<SeqStep<'_>> = batch
                .iter_mut()
                .map(|(_, Sequence { kv, tokens, .. })| {
                    let start = kv.len();
                    // Errors here only delay sealing; the forward reports real problems.
                    let _ = kv.record_tokens(start, &tokens[start..]);
                    SeqStep {
                        tokens: &tokens[start..],
                        start_pos: start,
                        kv,
                    }
                })
                .collect();
            model.forward(&mut steps)
        });
        self.sequences.extend(taken);
        result
            .map_err(InferenceError::from)?
            .into_iter()
            .map(|t| {
                t.flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(|e| InferenceError::Internal(format!("logits: {e}")))
            })
            .collect()
    }
}

fn fail_job(job: Job, error: InferenceError) {
    let _ = job.reply.send_message(TaskMsg::StepFailed {
        step: job.step,
        error: error.to_string(),
        device_lost: matches!(error, InferenceError::Device(_)),
        out_of_blocks: matches!(
            error,
            InferenceError::Kv(llmos_kv::KvError::OutOfBlocks { .. })
        ),
    });
}

/// Blocks this thread forever when `engine.hang` fires: a stuck kernel, as the heartbeat
/// watchdog sees it.
fn maybe_hang() {
    fault_point!(ENGINE_HANG_POINT, |_| {
        loop {
            std::thread::park();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RuntimeConfig;
    use crate::kvpool::DevicePool;
    use crate::services::{DeviceRuntime, KvSourceStats};
    use llmos_device::{DeviceId, LogicalDevice};
    use std::time::Duration;

    fn argmax(logits: &[f32]) -> u32 {
        let mut best = 0;
        for (i, v) in logits.iter().enumerate() {
            if *v > logits[best] {
                best = i;
            }
        }
        best as u32
    }

    /// Recomputed KV must be bit-identical to the KV of the original run: the replay
    /// repeats the original shapes (prompt as one chunk, then one token at a time).
    #[test]
    fn replayed_kv_gives_bit_identical_logits() {
        llmos_device::init_cpu_threads(2);
        let dir = tempfile::tempdir().unwrap();
        let model_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/models/stories260K/stories260K-f32.gguf");
        let mut config = RuntimeConfig::new(model_path, dir.path());
        config.kv_budget_bytes = 4 << 20;
        let model = Arc::new(crate::models_actor::load_model(&config).unwrap());
        let device = LogicalDevice::open(DeviceId::cpu(0)).unwrap();
        let pool = DevicePool::open(&config, model.model.kv_shape(), device.id(), "test").unwrap();
        let runtime = DeviceRuntime {
            device,
            pool,
            kv_stats: Arc::new(KvSourceStats::default()),
        };
        let mut engine = EngineThread::new(
            runtime,
            model.clone(),
            Heartbeat::detached(Duration::from_secs(60)),
        );
        let prompt = model.tokenizer.encode("Once upon a time", true).unwrap();
        let p = prompt.len();

        // The original run: the prompt, then greedy tokens one at a time.
        let mut tokens = prompt.clone();
        engine.attach(1, tokens.clone(), p, 1).unwrap();
        let mut original = vec![engine.forward(&[1]).unwrap().remove(0)];
        for _ in 0..12 {
            let next = argmax(original.last().unwrap());
            tokens.push(next);
            engine.sequences.get_mut(&1).unwrap().tokens.push(next);
            original.push(engine.forward(&[1]).unwrap().remove(0));
        }

        // A fresh sequence (nothing to restore) attached mid-way recomputes its KV.
        for generated in [1, 5, 12] {
            let seq = 100 + generated as u64;
            engine
                .attach(seq, tokens[..p + generated].to_vec(), p, 1)
                .unwrap();
            let replayed = engine.forward(&[seq]).unwrap().remove(0);
            let same_bits = replayed
                .iter()
                .zip(&original[generated])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same_bits,
                "logits after {generated} generated tokens differ"
            );
        }
    }
}
