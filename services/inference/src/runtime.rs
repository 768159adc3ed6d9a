//! The inference runtime: boots the supervision tree of DESIGN.md around a model, admits
//! requests and streams their tokens, and resumes unfinished requests from the journal.
//!
//! ```text
//! llmos                 one_for_one
//! ├─ journal            permanent   write-ahead token log
//! ├─ models             permanent   the loaded model (weights shared, never reloaded below)
//! ├─ devices            one_for_one
//! │  └─ cpu:0           one_for_all
//! │     ├─ pool         permanent   KV block pool (memory outlives restarts)
//! │     └─ engine       permanent   blocking: heartbeat-watched compute thread
//! ├─ scheduler          permanent   admission, placement, failover
//! └─ requests           dynamic     one transient task per request
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use llmos_device::LogicalDevice;
use llmos_journal::Record;
use llmos_kernel::ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use llmos_kernel::{ChildSpec, Kernel, RestartType, Strategy, SupervisorSpec};
use tokio::sync::mpsc;

use crate::config::RuntimeConfig;
use crate::engine::EngineActor;
use crate::error::InferenceError;
use crate::journal_actor::JournalActor;
use crate::kvpool::DevicePool;
use crate::models_actor::{load_model, ModelsActor};
use crate::sampler::SamplingParams;
use crate::scheduler::{SchedulerActor, SchedulerMsg, SCHEDULER_PATH};
use crate::services::{DeviceRuntime, Services};
use crate::sink::{FinishReason, RequestSink, StreamEvent};
use crate::state_lock::StateLock;
use crate::task::{task_spec, RequestParams, REQUESTS_PATH};
use crate::text::{visible_after, TextStream};

/// A running inference system.
#[derive(Clone)]
pub struct Runtime {
    kernel: Kernel,
    services: Arc<Services>,
    /// The state directory's lock: released by `shutdown`, or when the last handle goes.
    lock: Arc<std::sync::Mutex<Option<StateLock>>>,
}

/// The client end of one request.
pub struct RequestStream {
    /// The request id.
    pub id: u64,
    /// Tokens delivered before this stream was attached (resumed requests).
    pub already_delivered: u32,
    /// Tokens and the end, in order.
    pub events: mpsc::UnboundedReceiver<StreamEvent>,
}

impl Runtime {
    /// Loads the model, opens the devices and their KV pools, and boots the tree.
    pub async fn boot(config: RuntimeConfig) -> Result<Runtime, InferenceError> {
        Self::boot_with(config, |_| Vec::new()).await
    }

    /// Like [`Runtime::boot`], with more children under the root after the inference
    /// services (e.g. `apps`, `control`), started in order. `extra` builds them from the
    /// shared [`Services`]; the kernel handle is there (`Services::kernel_handle`) once
    /// the boot has returned, so children look it up when they need it, not at start.
    pub async fn boot_with(
        config: RuntimeConfig,
        extra: impl FnOnce(&Arc<Services>) -> Vec<ChildSpec>,
    ) -> Result<Runtime, InferenceError> {
        std::fs::create_dir_all(&config.state_dir).map_err(|e| {
            InferenceError::Internal(format!(
                "cannot create state directory {}: {e}",
                config.state_dir.display()
            ))
        })?;
        let lock = StateLock::acquire(&config.state_dir)?;
        let model = Arc::new(load_model(&config)?);
        let shape = model.model.kv_shape();
        let mut devices = Vec::new();
        for id in &config.devices {
            let device = LogicalDevice::open(*id)?;
            let pool = DevicePool::open(&config, shape, *id, model.fingerprint)?;
            devices.push(DeviceRuntime::new(device, pool));
        }
        let services = Arc::new(Services::new(config, devices));
        services.set_model(model);
        let mut spec = tree(&services);
        for child in extra(&services) {
            spec = spec.child(child);
        }
        let kernel = Kernel::boot("llmos", spec).await?;
        services.set_kernel(kernel.clone());
        let runtime = Runtime {
            kernel,
            services,
            lock: Arc::new(std::sync::Mutex::new(Some(lock))),
        };
        runtime
            .scheduler()
            .await?
            .cast(SchedulerMsg::Watch)
            .await
            .map_err(|u| u.error)?;
        Ok(runtime)
    }

    /// The kernel (tree, addresses, faults).
    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    /// The shared services (model, devices).
    pub fn services(&self) -> &Arc<Services> {
        &self.services
    }

    /// Admits a request: validates it, journals `Begin`, starts its task.
    pub async fn submit(
        &self,
        prompt: &str,
        params: SamplingParams,
    ) -> Result<RequestStream, InferenceError> {
        self.submit_tagged(prompt, params, None).await
    }

    /// [`Runtime::submit`] with an idempotency `tag` journaled in the request's `Begin`:
    /// [`Runtime::find_tagged`] finds the request by it later, also in a new process, so
    /// a submitter that crashed without learning the id re-attaches instead of
    /// submitting twice.
    ///
    /// Cancel-safe once admitted: journaling `Begin` and starting the task run to the end
    /// on their own even if the caller's future is dropped (as when the calling actor is
    /// killed), so a journaled request always has a task or an `End`.
    pub async fn submit_tagged(
        &self,
        prompt: &str,
        params: SamplingParams,
        tag: Option<String>,
    ) -> Result<RequestStream, InferenceError> {
        params.validate()?;
        if prompt.is_empty() {
            return Err(InferenceError::EmptyPrompt);
        }
        let model = self.services.model()?;
        let prompt_tokens = model.tokenizer.encode(prompt, true)?;
        if prompt_tokens.len() >= model.context {
            return Err(InferenceError::PromptTooLong {
                prompt: prompt_tokens.len(),
                context: model.context,
            });
        }
        let needed = (prompt_tokens.len() + params.max_tokens).min(model.context);
        self.admit(needed, false).await?;
        let runtime = self.clone();
        let payload = RequestParams {
            sampling: params,
            model: model.name.clone(),
            tag,
        };
        tokio::spawn(async move { runtime.begin(prompt_tokens, payload).await })
            .await
            .map_err(|e| InferenceError::Internal(format!("submission task: {e}")))?
    }

    /// Journals `Begin` and starts the task of an admitted request.
    async fn begin(
        &self,
        prompt_tokens: Vec<u32>,
        payload: RequestParams,
    ) -> Result<RequestStream, InferenceError> {
        let id = self.services.next_request_id();
        // Refused before anything is journaled: a request begun now could not start.
        if self.kernel.is_shutting_down() {
            self.release(id).await;
            return Err(InferenceError::Kernel(llmos_kernel::KernelError::ShutDown));
        }
        let begin = Record::Begin {
            request: id,
            prompt_tokens,
            params: serde_json::to_vec(&payload)
                .map_err(|e| InferenceError::Internal(format!("params: {e}")))?,
        };
        if let Err(err) = self.append(&begin) {
            self.release(id).await;
            return Err(err);
        }
        let tagged = payload.tag.is_some();
        if let Some(tag) = payload.tag {
            self.services
                .with_tags(|| self.scan_tags(), |tags| tags.insert(tag, id));
        }
        let (sink, events) = RequestSink::new(0, 0);
        self.services.add_sink(id, Arc::new(sink));
        self.services.note_submitted(id);
        if let Err(err) = self
            .kernel
            .start_child(REQUESTS_PATH, task_spec(self.services.clone(), id))
            .await
        {
            self.services.remove_sink(id);
            self.release(id).await;
            // A shutdown that began after the check above leaves the request unfinished:
            // the next process resumes it, and its submitter finds it by its tag. Any
            // other failure ends it, so no later process runs a request nobody waits for.
            let shutting_down = matches!(err, llmos_kernel::KernelError::ShutDown);
            if !(shutting_down && tagged) {
                let _ = self.append(&Record::End {
                    request: id,
                    reason: FinishReason::Error.code(),
                });
            }
            return Err(err.into());
        }
        Ok(RequestStream {
            id,
            already_delivered: 0,
            events,
        })
    }

    /// The request submitted with idempotency `tag` ([`Runtime::submit_tagged`]), if the
    /// journal still holds it (finished requests stay until compaction). An index kept
    /// beside the journal answers, so the lookup costs the same however long the journal.
    pub fn find_tagged(&self, tag: &str) -> Result<Option<u64>, InferenceError> {
        let id = self
            .services
            .with_tags(|| self.scan_tags(), |tags| tags.get(tag).copied());
        let Some(id) = id else { return Ok(None) };
        let held = {
            let journal = self.services.journal()?;
            let journal = journal.lock().unwrap_or_else(|e| e.into_inner());
            journal.request(id).is_some()
        };
        if held {
            return Ok(Some(id));
        }
        // Compacted away since: forget it.
        self.services.with_tags(
            || self.scan_tags(),
            |tags| {
                tags.remove(tag);
            },
        );
        Ok(None)
    }

    /// Every tagged request in the journal (the index's initial contents).
    fn scan_tags(&self) -> HashMap<String, u64> {
        let Ok(journal) = self.services.journal() else {
            return HashMap::new();
        };
        let journal = journal.lock().unwrap_or_else(|e| e.into_inner());
        let mut tags = HashMap::new();
        for (id, log) in journal.requests() {
            if let Ok(RequestParams { tag: Some(tag), .. }) = serde_json::from_slice(&log.params) {
                tags.insert(tag, *id);
            }
        }
        tags
    }

    /// Resumes every unfinished request of the journal (after a process restart); each
    /// stream continues after the last token its client was known to have received.
    pub async fn resume_unfinished(&self) -> Result<Vec<RequestStream>, InferenceError> {
        let model = self.services.model()?;
        let unfinished: Vec<(u64, llmos_journal::RequestLog)> = {
            let journal = self.services.journal()?;
            let journal = journal.lock().unwrap_or_else(|e| e.into_inner());
            journal
                .unfinished()
                .map(|(id, log)| (id, log.clone()))
                .collect()
        };
        let mut streams = Vec::new();
        for (id, log) in unfinished {
            let params: RequestParams = serde_json::from_slice(&log.params)
                .map_err(|e| InferenceError::Corrupt(format!("request {id}: params: {e}")))?;
            let delivered = log.delivered.min(log.tokens.len() as u32);
            let shown = visible_after(
                &model.tokenizer,
                &log.prompt_tokens,
                &params.sampling.stop,
                &log.tokens,
                delivered as usize,
                false,
            );
            let (sink, events) = RequestSink::new(delivered, shown.len());
            self.services.add_sink(id, Arc::new(sink));
            let _ = self.admit(0, true).await;
            self.kernel
                .start_child(REQUESTS_PATH, task_spec(self.services.clone(), id))
                .await?;
            streams.push(RequestStream {
                id,
                already_delivered: delivered,
                events,
            });
        }
        Ok(streams)
    }

    /// Attaches a client to request `id` after token index `after` (`None`: from the first
    /// token): tokens delivered earlier are replayed (from this process's sink, or from the
    /// journal for what an earlier process delivered), then live tokens follow — each index
    /// exactly once and in order — then the end. Works for running requests (also resumed
    /// ones, after [`Runtime::resume_unfinished`]) and for finished requests still in the
    /// journal (until compaction drops them). Several clients may attach to one request.
    pub fn attach(&self, id: u64, after: Option<u32>) -> Result<RequestStream, InferenceError> {
        let from = after.map_or(0, |a| a.saturating_add(1));
        let (tx, events) = mpsc::unbounded_channel();
        let mut forward = Forward { next: from, tx };
        match self.services.sink(id) {
            Some(sink) => {
                // Subscribe first: whatever is delivered from now on reaches the channel,
                // and everything before is in the history or (below `base`) the journal.
                let subscription = sink.subscribe();
                if from < subscription.base {
                    let log = self
                        .request_log(id)?
                        .ok_or(InferenceError::UnknownRequest(id))?;
                    for event in self.replay(id, &log, from, subscription.base as usize)? {
                        forward.push(event);
                    }
                }
                let mut open = true;
                for event in subscription.history {
                    open = open && forward.push(event);
                }
                if open {
                    let mut live = subscription.live;
                    tokio::spawn(async move {
                        while let Some(event) = live.recv().await {
                            if !forward.push(event) {
                                break;
                            }
                        }
                    });
                }
            }
            None => {
                let log = self
                    .request_log(id)?
                    .ok_or(InferenceError::UnknownRequest(id))?;
                if log.finished.is_none() {
                    // Journaled but with no task here: only in the instants between `Begin`
                    // and the sink's creation, or when a resume could not restart it.
                    return Err(InferenceError::Internal(format!(
                        "request {id} is not running in this process"
                    )));
                }
                for event in self.replay(id, &log, from, log.tokens.len())? {
                    forward.push(event);
                }
            }
        }
        Ok(RequestStream {
            id,
            already_delivered: from,
            events,
        })
    }

    /// What the journal says about request `id` (`None` once compaction dropped it): its
    /// size and whether it has ended. Apps use it to account a re-attached request.
    pub fn request_summary(&self, id: u64) -> Result<Option<RequestSummary>, InferenceError> {
        let Some(log) = self.request_log(id)? else {
            return Ok(None);
        };
        let params: RequestParams = serde_json::from_slice(&log.params)
            .map_err(|e| InferenceError::Corrupt(format!("request {id}: params: {e}")))?;
        Ok(Some(RequestSummary {
            prompt_tokens: log.prompt_tokens.len(),
            max_tokens: params.sampling.max_tokens,
            generated: log.tokens.len(),
            finished: log.finished.is_some(),
        }))
    }

    /// Requests with a live delivery sink in this process (admitted or resumed, unfinished).
    pub fn active_requests(&self) -> usize {
        self.services.sink_count()
    }

    /// The journal's record of `id`, if it still holds one.
    fn request_log(&self, id: u64) -> Result<Option<llmos_journal::RequestLog>, InferenceError> {
        let journal = self.services.journal()?;
        let journal = journal.lock().unwrap_or_else(|e| e.into_inner());
        Ok(journal.request(id).cloned())
    }

    /// The events a client received for tokens `from..to` of a journaled request, text
    /// included exactly as the task delivered it (the visible text is a pure function of
    /// the tokens), and the end when `to` is the last token of a finished request.
    fn replay(
        &self,
        id: u64,
        log: &llmos_journal::RequestLog,
        from: u32,
        to: usize,
    ) -> Result<Vec<StreamEvent>, InferenceError> {
        let model = self.services.model()?;
        let params: RequestParams = serde_json::from_slice(&log.params)
            .map_err(|e| InferenceError::Corrupt(format!("request {id}: params: {e}")))?;
        let prompt_len = log.prompt_tokens.len();
        let total = log.tokens.len();
        let to = to.min(total);
        // The text each token showed: the stream run over the tokens, as the engine ran
        // it (the last token of a finished request released the hold-back).
        let mut text = TextStream::new(&model.tokenizer, &log.prompt_tokens, &params.sampling.stop);
        let mut events = Vec::new();
        let mut before = 0;
        for (index, &token) in log.tokens.iter().enumerate().take(to) {
            text.push(&model.tokenizer, token);
            if log.finished.is_some() && index + 1 == total {
                text.finish();
            }
            let shown = text.visible().text;
            if index >= from as usize {
                let fresh = shown.get(before..).unwrap_or("").to_string();
                events.push(StreamEvent::Token {
                    index: index as u32,
                    token,
                    text: fresh,
                });
            }
            before = before.max(shown.len());
        }
        if to == total {
            match log.finished.map(FinishReason::from_code) {
                Some(FinishReason::Error) => events.push(StreamEvent::Failed {
                    error: format!("request {id} failed"),
                }),
                Some(reason) => events.push(StreamEvent::Finished {
                    reason,
                    prompt_tokens: prompt_len,
                    completion_tokens: total,
                }),
                None => {}
            }
        }
        Ok(events)
    }

    /// Records that the client of `request` has received `cursor` tokens, so a resume in a
    /// new process does not repeat them.
    pub fn record_delivered(&self, request: u64, cursor: u32) -> Result<(), InferenceError> {
        self.append(&Record::Delivered { request, cursor })
    }

    /// Orderly shutdown of the tree (the journal is flushed by its actor).
    pub async fn shutdown(&self, reason: &str) {
        self.kernel.shutdown(reason).await;
        // The tree is down: another runtime may take the directory.
        self.lock.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    fn append(&self, record: &Record) -> Result<(), InferenceError> {
        let journal = self.services.journal()?;
        let mut journal = journal.lock().unwrap_or_else(|e| e.into_inner());
        let result = journal.append(record);
        self.services.note_journal_append(&result);
        result.map_err(InferenceError::from)
    }

    async fn scheduler(&self) -> Result<llmos_kernel::Addr<SchedulerMsg>, InferenceError> {
        Ok(self.kernel.addr::<SchedulerMsg>(SCHEDULER_PATH)?)
    }

    async fn admit(&self, tokens: usize, resumed: bool) -> Result<(), InferenceError> {
        let waited = self
            .scheduler()
            .await?
            .call(
                |reply| SchedulerMsg::Admit {
                    tokens,
                    resumed,
                    reply,
                },
                Some(self.services.config.queue_timeout),
            )
            .await;
        match waited {
            Err(llmos_kernel::KernelError::CallTimeout { .. }) => {
                Err(InferenceError::Overloaded(format!(
                    "no admission slot freed within {:?}",
                    self.services.config.queue_timeout
                )))
            }
            other => other?,
        }
    }

    async fn release(&self, request: u64) {
        if let Ok(scheduler) = self.scheduler().await {
            let _ = scheduler.cast(SchedulerMsg::Release { request }).await;
        }
    }
}

/// A journaled request's size and state ([`Runtime::request_summary`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestSummary {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// The request's `max_tokens`.
    pub max_tokens: usize,
    /// Tokens generated so far.
    pub generated: usize,
    /// Whether it has ended (finished or failed).
    pub finished: bool,
}

/// Hands one subscriber's events on in index order, from `next` on, each index once.
struct Forward {
    next: u32,
    tx: mpsc::UnboundedSender<StreamEvent>,
}

impl Forward {
    /// Forwards `event` unless it repeats an index already sent; returns whether more may
    /// follow (false after the end or when the client has gone).
    fn push(&mut self, event: StreamEvent) -> bool {
        match &event {
            StreamEvent::Token { index, .. } => {
                if *index < self.next {
                    return true;
                }
                self.next = index + 1;
                self.tx.send(event).is_ok()
            }
            StreamEvent::Finished { .. } | StreamEvent::Failed { .. } => {
                let _ = self.tx.send(event);
                false
            }
        }
    }
}

/// The tree of DESIGN.md for these services.
fn tree(services: &Arc<Services>) -> SupervisorSpec {
    let mut devices = SupervisorSpec::new(Strategy::OneForOne);
    for (index, runtime) in services.devices.iter().enumerate() {
        let (s_pool, s_engine) = (services.clone(), services.clone());
        // An engine that crashes on a poison request restarts a few times while the crash
        // ledger narrows the step down to it (see `quarantine`): allow for that here, so
        // only a device that keeps failing on everything escalates.
        let device = SupervisorSpec::new(Strategy::OneForAll)
            .intensity(30, Duration::from_secs(10))
            .child(ChildSpec::worker("pool", move |_ctx| {
                (
                    PoolActor {
                        services: s_pool.clone(),
                        device: index,
                    },
                    (),
                )
            }))
            .child(
                ChildSpec::worker("engine", move |ctx| {
                    (
                        EngineActor {
                            services: s_engine.clone(),
                            device: index,
                            heartbeat: ctx
                                .heartbeat()
                                .cloned()
                                .expect("engines are declared blocking"),
                        },
                        (),
                    )
                })
                .blocking(services.config.engine_heartbeat),
            );
        devices = devices.child(ChildSpec::supervisor(
            runtime.device.id().to_string(),
            device,
        ));
    }
    let (s_journal, s_models, s_sched) = (services.clone(), services.clone(), services.clone());
    SupervisorSpec::new(Strategy::OneForOne)
        .child(ChildSpec::worker("journal", move |_ctx| {
            (
                JournalActor {
                    services: s_journal.clone(),
                },
                (),
            )
        }))
        .child(ChildSpec::worker("models", move |_ctx| {
            (
                ModelsActor {
                    services: s_models.clone(),
                },
                (),
            )
        }))
        .child(ChildSpec::supervisor("devices", devices))
        .child(ChildSpec::worker("scheduler", move |_ctx| {
            (
                SchedulerActor {
                    services: s_sched.clone(),
                },
                (),
            )
        }))
        .child(
            // Each request limits its own restarts (MAX_TASK_STARTS); this bound only catches
            // a storm across many requests.
            ChildSpec::supervisor(
                "requests",
                SupervisorSpec::new(Strategy::Dynamic).intensity(1000, Duration::from_secs(10)),
            )
            .restart(RestartType::Permanent),
        )
}

/// Messages of a device's pool actor.
pub enum PoolMsg {
    /// Current block usage.
    Stats(RpcReplyPort<llmos_kv::PoolStats>),
}

/// Owner of a device's KV block pool in the tree: the memory itself outlives this actor
/// (it belongs to the device runtime), so a restart loses no KV; the actor reports usage.
pub struct PoolActor {
    services: Arc<Services>,
    device: usize,
}

impl Actor for PoolActor {
    type Msg = PoolMsg;
    type State = ();
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ActorRef<PoolMsg>,
        _args: (),
    ) -> Result<(), ActorProcessingErr> {
        let stats = self.services.devices[self.device].pool.stats();
        tracing::info!(device = %self.services.devices[self.device].device.id(), ?stats, "KV pool ready");
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<PoolMsg>,
        message: PoolMsg,
        _state: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        match message {
            PoolMsg::Stats(reply) => {
                let _ = reply.send(self.services.devices[self.device].pool.stats());
            }
        }
        Ok(())
    }
}
