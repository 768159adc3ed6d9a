//! The inference task: one supervised actor per request, the owner of its recovery. It is
//! a cache of the journal: at every (re)start, and whenever its engine goes away, it reads
//! the journaled prompt, parameters, tokens and sampler state, delivers what its clients
//! have not seen, and attaches the request to an engine, which generates from there. No
//! token passes through the task: the engine's step loop samples, journals and delivers,
//! and tells the task when the request ends, fails, crashed in its own part of a step, or
//! must be attached again.

use std::sync::Arc;
use std::time::Duration;

use llmos_device::DeviceId;
use llmos_journal::{Record, RequestLog};
use llmos_kernel::ractor::{Actor, ActorProcessingErr, ActorRef};
use llmos_kernel::{Addr, ChildSpec, RestartType};

use crate::engine::{Attach, EngineMsg};
use crate::error::InferenceError;
use crate::sampler::{SamplerRng, SamplingParams};
use crate::scheduler::{SchedulerMsg, SCHEDULER_PATH};
use crate::services::{LoadedModel, Services};
use crate::sink::{FinishReason, RequestSink};
use crate::text::TextStream;

/// Fault point in a request's part of an engine step, right after its token is sampled
/// (before it is journaled): `panic` (or `return`) crashes that request's task only.
pub const TASK_STEP_POINT: &str = "task.step";

/// The `task.step` point of one request (`task.step:req-N`): faults for that request only.
pub fn task_step_point_for(request: u64) -> String {
    format!("{TASK_STEP_POINT}:req-{request}")
}

/// A request whose task starts this many times in a row without a new token in between
/// fails instead of starting again: one poisonous request must not exhaust the restart
/// intensity that all requests share, while a request that progresses between crashes is
/// never given up.
pub const MAX_STALLED_STARTS: u32 = 8;

/// Where tasks live in the tree.
pub const REQUESTS_PATH: &str = "llmos/requests";

/// Messages of a task (all from its engine, or from the scheduler).
#[derive(Debug)]
pub enum TaskMsg {
    /// The request ended: its end is journaled and its clients were told.
    Finished,
    /// The request failed for good (poison, or the journal refused its tokens); its
    /// clients were told.
    Failed {
        /// What went wrong.
        error: String,
    },
    /// The request's own part of a step crashed (its sampling, or `task.step`): this task
    /// instance fails, and its supervisor starts the next.
    Crashed {
        /// The panic or error.
        reason: String,
    },
    /// The engine no longer holds the request (its device is lost): attach again.
    Reattach,
    /// The engine of `device` failed or hung: attach again (elsewhere if it is lost).
    EngineLost {
        /// The device whose engine went away.
        device: DeviceId,
    },
}

/// Journal payload of a request: its parameters and the model it was admitted for.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct RequestParams {
    pub(crate) sampling: SamplingParams,
    pub(crate) model: String,
    /// The submitter's idempotency key ([`crate::Runtime::submit_tagged`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tag: Option<String>,
}

/// The task actor of one request.
pub struct TaskActor {
    services: Arc<Services>,
    request: u64,
}

/// A child spec for the task of `request` (transient: restarted after crashes, gone
/// when it finishes).
pub(crate) fn task_spec(services: Arc<Services>, request: u64) -> ChildSpec {
    ChildSpec::worker(task_name(request), move |_ctx| {
        (
            TaskActor {
                services: services.clone(),
                request,
            },
            (),
        )
    })
    .restart(RestartType::Transient)
}

pub(crate) fn task_name(request: u64) -> String {
    format!("req-{request}")
}

/// State of one task instance.
pub struct TaskState {
    sink: Arc<RequestSink>,
    /// Where the request is attached.
    device: Option<(DeviceId, Addr<EngineMsg>)>,
    /// This instance's generation; a newer instance fences this one off.
    generation: u32,
}

/// What the journal says of a request, ready to attach.
struct Journaled {
    log: RequestLog,
    params: SamplingParams,
}

impl Journaled {
    fn tokens(&self) -> Vec<u32> {
        let mut tokens = self.log.prompt_tokens.clone();
        tokens.extend_from_slice(&self.log.tokens);
        tokens
    }
}

impl Actor for TaskActor {
    type Msg = TaskMsg;
    type State = TaskState;
    type Arguments = ();

    async fn pre_start(
        &self,
        myself: ActorRef<TaskMsg>,
        _args: (),
    ) -> Result<TaskState, ActorProcessingErr> {
        llmos_kernel::faults::declare(TASK_STEP_POINT, "a request's task crashes after sampling");
        llmos_kernel::faults::declare("task.step:req-N", "request N's task crashes after sampling");
        // The generation is taken before the journal is read: see the engine's fencing.
        let generation = self.services.next_task_generation(self.request);
        let journaled = self.read_journal()?;
        let stalled = self
            .services
            .note_task_progress(self.request, journaled.log.tokens.len());
        let model = self.services.model()?;
        let sink = match self.services.sink(self.request) {
            Some(sink) => sink,
            None => {
                // No client is attached (resumed in a new process before anyone asked):
                // output goes nowhere until a client re-attaches by id.
                let (sink, _rx) = RequestSink::new(journaled.log.delivered, 0);
                let sink = Arc::new(sink);
                self.services.add_sink(self.request, sink.clone());
                sink
            }
        };
        let mut state = TaskState {
            sink,
            device: None,
            generation,
        };
        deliver_journaled(&model, &state.sink, &journaled);
        if let Some(code) = journaled.log.finished {
            self.finish(
                &myself,
                &mut state,
                FinishReason::from_code(code),
                false,
                None,
            );
            return Ok(state);
        }
        if stalled >= MAX_STALLED_STARTS {
            let last = self
                .services
                .kernel()
                .ok()
                .and_then(|k| {
                    k.snapshot()
                        .find(&format!("{REQUESTS_PATH}/{}", task_name(self.request)))
                        .and_then(|n| n.last_failure.clone())
                })
                .map(|f| f.reason)
                .unwrap_or_else(|| "unknown".into());
            let failure = format!(
                "request {} crashed {stalled} times in a row without producing a token; \
                 last failure: {last}",
                self.request
            );
            self.finish(
                &myself,
                &mut state,
                FinishReason::Error,
                true,
                Some(failure),
            );
            return Ok(state);
        }
        if let Some(reason) = finished_by_rules(&model, &journaled) {
            self.finish(&myself, &mut state, reason, true, None);
            return Ok(state);
        }
        self.attach(&myself, &mut state, journaled).await?;
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<TaskMsg>,
        message: TaskMsg,
        state: &mut TaskState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            TaskMsg::Finished => {
                self.release(state);
                myself.stop(Some("finished".into()));
            }
            TaskMsg::Failed { error } => {
                tracing::warn!(request = self.request, %error, "request failed");
                self.release(state);
                myself.stop(Some("failed".into()));
            }
            TaskMsg::Crashed { reason } => {
                return Err(format!("request crashed in its engine step: {reason}").into());
            }
            TaskMsg::Reattach => {
                let journaled = self.read_journal()?;
                self.attach(&myself, state, journaled).await?;
            }
            TaskMsg::EngineLost { device }
                if state.device.as_ref().is_some_and(|(d, _)| *d == device) =>
            {
                let journaled = self.read_journal()?;
                self.attach(&myself, state, journaled).await?;
            }
            TaskMsg::EngineLost { .. } => {}
        }
        Ok(())
    }
}

/// Delivers the journaled tokens the sink has not delivered yet (a crash between journal
/// and delivery, or a resume), with the text they showed.
fn deliver_journaled(model: &LoadedModel, sink: &RequestSink, journaled: &Journaled) {
    let log = &journaled.log;
    let from = sink.delivered() as usize;
    if from >= log.tokens.len() {
        return;
    }
    let mut text = TextStream::new(&model.tokenizer, &log.prompt_tokens, &journaled.params.stop);
    for (index, &token) in log.tokens.iter().enumerate() {
        text.push(&model.tokenizer, token);
        if index + 1 == log.tokens.len() && log.finished.is_some() {
            text.finish();
        }
        if index >= from {
            sink.deliver(index as u32, token, text.visible().text);
        }
    }
}

/// A journaled request that is complete by its own rules (its last token ended it, but
/// its `End` was not journaled).
fn finished_by_rules(model: &LoadedModel, journaled: &Journaled) -> Option<FinishReason> {
    let log = &journaled.log;
    let generated = log.tokens.len();
    if log.tokens.last() == Some(&model.eos) {
        return Some(FinishReason::Stop);
    }
    if generated >= journaled.params.max_tokens
        || log.prompt_tokens.len() + generated >= model.context
    {
        return Some(FinishReason::Length);
    }
    let text = TextStream::replayed(
        &model.tokenizer,
        &log.prompt_tokens,
        &journaled.params.stop,
        &log.tokens,
    );
    text.stopped().then_some(FinishReason::Stop)
}

impl TaskActor {
    fn read_journal(&self) -> Result<Journaled, InferenceError> {
        let log = {
            let journal = self.services.journal()?;
            let journal = journal.lock().unwrap_or_else(|e| e.into_inner());
            journal
                .request(self.request)
                .cloned()
                .ok_or(InferenceError::UnknownRequest(self.request))?
        };
        let params: RequestParams = serde_json::from_slice(&log.params).map_err(|e| {
            InferenceError::Corrupt(format!("request {}: params: {e}", self.request))
        })?;
        Ok(Journaled {
            log,
            params: params.sampling,
        })
    }

    /// Places the request on a device (the current one unless it is lost) and hands it
    /// to that device's engine with everything the journal says.
    async fn attach(
        &self,
        myself: &ActorRef<TaskMsg>,
        state: &mut TaskState,
        journaled: Journaled,
    ) -> Result<(), InferenceError> {
        if journaled.log.finished.is_some() {
            // Ended meanwhile; the engine's `Finished` is on its way.
            return Ok(());
        }
        let model = self.services.model()?;
        deliver_journaled(&model, &state.sink, &journaled);
        let scheduler = self
            .services
            .kernel()?
            .addr::<SchedulerMsg>(SCHEDULER_PATH)?;
        let request = self.request;
        let placed = scheduler
            .call(
                |reply| SchedulerMsg::Place { request, reply },
                Some(Duration::from_secs(30)),
            )
            .await??;
        if let Some((before, engine)) = state.device.take() {
            if before != placed.0 {
                let _ = engine.cast(EngineMsg::Detach { seq: request }).await;
            }
        }
        let log = &journaled.log;
        let rng = if log.tokens.is_empty() {
            SamplerRng::new(journaled.params.seed)
        } else {
            SamplerRng::from_state(&log.last_sampler_state)?
        };
        let text = TextStream::replayed(
            &model.tokenizer,
            &log.prompt_tokens,
            &journaled.params.stop,
            &log.tokens,
        );
        let attach = Attach {
            seq: request,
            generation: state.generation,
            tokens: journaled.tokens(),
            prompt_len: log.prompt_tokens.len(),
            params: journaled.params,
            rng,
            text,
            sink: state.sink.clone(),
            task: myself.clone(),
        };
        placed
            .1
            .cast(EngineMsg::Attach(Box::new(attach)))
            .await
            .map_err(|undelivered| undelivered.error)?;
        state.device = Some(placed);
        Ok(())
    }

    /// Ends the request from the task (found ended or complete in the journal, or given
    /// up): journals `End` when asked, then tells the client (the end, or `failure`),
    /// and stops normally. The journal comes first, so a client that hears of the end
    /// finds it recorded.
    fn finish(
        &self,
        myself: &ActorRef<TaskMsg>,
        state: &mut TaskState,
        reason: FinishReason,
        journal: bool,
        failure: Option<String>,
    ) {
        if journal {
            let end = Record::End {
                request: self.request,
                reason: reason.code(),
            };
            let appended = self.services.journal().and_then(|j| {
                let mut j = j.lock().unwrap_or_else(|e| e.into_inner());
                if self.services.task_generation(self.request) != state.generation {
                    return Err(InferenceError::Superseded(self.request));
                }
                let result = j.append(&end);
                self.services.note_journal_append(&result);
                result.map_err(InferenceError::from)
            });
            match appended {
                Ok(()) => {}
                // A newer instance owns the request: end nothing, detach nothing.
                Err(InferenceError::Superseded(_)) => {
                    myself.stop(Some("superseded".into()));
                    return;
                }
                // The tokens are durable; a missing End only means a later resume finds
                // the request complete by its own rules and ends it then.
                Err(err) => {
                    tracing::warn!(request = self.request, error = %err, "could not journal the end")
                }
            }
        }
        let log_sizes = self
            .read_journal()
            .ok()
            .map(|j| (j.log.prompt_tokens.len(), j.log.tokens.len()));
        match failure {
            Some(error) => state.sink.fail(error),
            None => {
                let (prompt, generated) = log_sizes.unwrap_or((0, 0));
                state.sink.finish(reason, prompt, generated)
            }
        }
        self.release(state);
        myself.stop(Some("finished".into()));
    }

    fn release(&self, state: &mut TaskState) {
        if let Some((_, engine)) = state.device.take() {
            let seq = self.request;
            tokio::spawn(async move {
                let _ = engine.cast(EngineMsg::Detach { seq }).await;
            });
        }
        if let Ok(kernel) = self.services.kernel() {
            if let Ok(scheduler) = kernel.addr::<SchedulerMsg>(SCHEDULER_PATH) {
                let request = self.request;
                tokio::spawn(async move {
                    let _ = scheduler.cast(SchedulerMsg::Release { request }).await;
                });
            }
        }
        self.services.remove_sink(self.request);
        self.services.forget_request(self.request);
    }
}
