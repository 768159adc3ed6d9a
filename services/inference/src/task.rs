//! The inference task: one supervised actor per request, holding its sequence and
//! sampler. It is a cache of the journal: on every (re)start it rebuilds itself from the
//! journaled prompt, parameters, tokens and RNG state, so a restart resumes exactly.
//!
//! Per token: logits arrive from the engine → sample → `task.step` fault point → journal
//! the token (retrying with backoff) → deliver it → ask the engine for the next logits.

use std::sync::Arc;
use std::time::Duration;

use llmos_device::DeviceId;
use llmos_journal::Record;
use llmos_kernel::fault_point;
use llmos_kernel::ractor::{Actor, ActorProcessingErr, ActorRef};
use llmos_kernel::{Addr, ChildSpec, RestartType};

use crate::engine::EngineMsg;
use crate::error::InferenceError;
use crate::sampler::{sample, SamplerRng, SamplingParams};
use crate::scheduler::{SchedulerMsg, SCHEDULER_PATH};
use crate::services::{LoadedModel, Services};
use crate::sink::{FinishReason, RequestSink};
use crate::text::visible;

/// Fault point in a request's task right after a token is sampled (before it is journaled).
pub const TASK_STEP_POINT: &str = "task.step";

/// A request whose task has started this many times without finishing fails instead of
/// starting again: one poisonous request must not exhaust the restart intensity that all
/// requests share.
pub const MAX_TASK_STARTS: u32 = 8;

/// Where tasks live in the tree.
pub const REQUESTS_PATH: &str = "llmos/requests";

/// Messages of a task.
#[derive(Debug)]
pub enum TaskMsg {
    /// Logits after the sequence's last token, for step `step`.
    Logits {
        /// Echo of the step the logits answer.
        step: u64,
        /// One score per vocabulary entry.
        logits: Vec<f32>,
    },
    /// The engine could not run the step.
    StepFailed {
        /// Echo of the step.
        step: u64,
        /// What went wrong.
        error: String,
        /// The device is lost: move to another.
        device_lost: bool,
        /// The pool had no room.
        out_of_blocks: bool,
    },
    /// The engine does not hold the sequence (it restarted): attach again.
    Reattach {
        /// Echo of the step.
        step: u64,
    },
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

/// State of one task instance, rebuilt from the journal at every start.
pub struct TaskState {
    model: Arc<LoadedModel>,
    params: SamplingParams,
    tokens: Vec<u32>,
    prompt_len: usize,
    rng: SamplerRng,
    sink: Arc<RequestSink>,
    step: u64,
    device: Option<(DeviceId, Addr<EngineMsg>)>,
    /// This instance's generation; a newer instance fences this one off.
    generation: u32,
}

impl TaskState {
    fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// The whole generated text so far.
    fn generated_text(&self) -> String {
        self.generated_text_upto(self.generated().len())
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
        let starts = self.services.note_task_start(self.request);
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
        let model = self.services.model()?;
        let rng = if log.tokens.is_empty() {
            SamplerRng::new(params.sampling.seed)
        } else {
            SamplerRng::from_state(&log.last_sampler_state)?
        };
        let sink = match self.services.sink(self.request) {
            Some(sink) => sink,
            None => {
                // No client is attached (resumed in a new process before anyone asked):
                // output goes nowhere until a client re-attaches by id.
                let (sink, _rx) = RequestSink::new(log.delivered, 0);
                let sink = Arc::new(sink);
                self.services.add_sink(self.request, sink.clone());
                sink
            }
        };
        let prompt_len = log.prompt_tokens.len();
        let mut tokens = log.prompt_tokens.clone();
        tokens.extend_from_slice(&log.tokens);
        let mut state = TaskState {
            model,
            params: params.sampling,
            tokens,
            prompt_len,
            rng,
            sink,
            step: 0,
            device: None,
            generation: starts,
        };
        // Journaled tokens the client may not have seen yet (the sink skips the rest).
        let generated = state.generated().len();
        for index in state.sink.delivered() as usize..generated {
            let text = visible(
                &state.generated_text_upto(index + 1),
                &state.params.stop,
                false,
            )
            .text;
            state
                .sink
                .deliver(index as u32, state.tokens[state.prompt_len + index], &text);
        }
        if let Some(code) = log.finished {
            self.finish(
                &myself,
                &mut state,
                FinishReason::from_code(code),
                false,
                None,
            );
            return Ok(state);
        }
        if starts > MAX_TASK_STARTS {
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
                "request {} failed {} times; last failure: {last}",
                self.request,
                starts - 1
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
        if let Some(reason) = self.finished_by_rules(&state) {
            self.finish(&myself, &mut state, reason, true, None);
            return Ok(state);
        }
        self.attach(&myself, &mut state).await?;
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<TaskMsg>,
        message: TaskMsg,
        state: &mut TaskState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            TaskMsg::Logits { step, logits } if step == state.step => {
                match self.on_logits(&myself, state, &logits).await {
                    Ok(()) => {}
                    // Retried already: a restart would fail the same way. The request fails
                    // cleanly; every token its client saw is durable.
                    Err(InferenceError::Journal(err)) => {
                        state
                            .sink
                            .fail(format!("the journal refused writes: {err}"));
                        self.release(state);
                        myself.stop(Some("journal failure".into()));
                    }
                    // A newer instance owns the request (this one outlived a kill while
                    // blocked): leave quietly, touching nothing.
                    Err(InferenceError::Superseded(_)) => {
                        state.device = None;
                        myself.stop(Some("superseded".into()));
                    }
                    Err(other) => return Err(other.into()),
                }
            }
            TaskMsg::StepFailed {
                step,
                error,
                device_lost,
                out_of_blocks,
            } if step == state.step => {
                if device_lost {
                    self.attach(&myself, state).await?;
                } else if out_of_blocks {
                    let failure = format!("KV memory exhausted: {error}");
                    self.finish(&myself, state, FinishReason::Error, true, Some(failure));
                } else {
                    return Err(format!("engine step failed: {error}").into());
                }
            }
            TaskMsg::Reattach { step } if step == state.step => {
                self.attach(&myself, state).await?;
            }
            TaskMsg::EngineLost { device }
                if state.device.as_ref().is_some_and(|(d, _)| *d == device) =>
            {
                self.attach(&myself, state).await?;
            }
            // Answers to steps this instance abandoned.
            _ => {}
        }
        Ok(())
    }
}

/// The first `count` generated tokens as text, decoded in the context of the last prompt
/// token so a leading space survives.
fn generated_text(model: &LoadedModel, tokens: &[u32], prompt_len: usize, count: usize) -> String {
    let prefix = model.tokenizer.decode(&tokens[prompt_len - 1..prompt_len]);
    let full = model
        .tokenizer
        .decode(&tokens[prompt_len - 1..prompt_len + count]);
    match full.strip_prefix(prefix.as_str()) {
        Some(rest) => rest.to_string(),
        None => model
            .tokenizer
            .decode(&tokens[prompt_len..prompt_len + count]),
    }
}

/// The text a client had been shown after `count` generated tokens.
pub(crate) fn visible_upto(
    model: &LoadedModel,
    tokens: &[u32],
    prompt_len: usize,
    count: usize,
    stop: &[String],
    finished: bool,
) -> String {
    if count == 0 {
        return String::new();
    }
    visible(
        &generated_text(model, tokens, prompt_len, count),
        stop,
        finished,
    )
    .text
}

impl TaskState {
    fn generated_text_upto(&self, count: usize) -> String {
        generated_text(&self.model, &self.tokens, self.prompt_len, count)
    }
}

impl TaskActor {
    /// Places the sequence on a device (the current one unless it is lost) and sends the
    /// whole token history; the engine keeps, restores or recomputes its KV.
    async fn attach(
        &self,
        myself: &ActorRef<TaskMsg>,
        state: &mut TaskState,
    ) -> Result<(), InferenceError> {
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
        state.step += 1;
        let message = EngineMsg::Attach {
            seq: self.request,
            tokens: state.tokens.clone(),
            prompt_len: state.prompt_len,
            generation: state.generation,
            step: state.step,
            reply: myself.clone(),
        };
        placed
            .1
            .cast(message)
            .await
            .map_err(|undelivered| undelivered.error)?;
        state.device = Some(placed);
        Ok(())
    }

    async fn on_logits(
        &self,
        myself: &ActorRef<TaskMsg>,
        state: &mut TaskState,
        logits: &[f32],
    ) -> Result<(), InferenceError> {
        let token = sample(logits, &state.params, &state.tokens, &mut state.rng)?;
        fault_point!(TASK_STEP_POINT);
        let index = state.generated().len() as u32;
        self.journal_with_retry(
            Record::Token {
                request: self.request,
                index,
                token,
                sampler_state: state.rng.state(),
            },
            state.generation,
        )
        .await?;
        state.tokens.push(token);

        let reason = self.finished_by_rules(state);
        let text = visible(
            &state.generated_text(),
            &state.params.stop,
            reason.is_some(),
        );
        state.sink.deliver(index, token, &text.text);
        let reason = reason.or(text.stopped.then_some(FinishReason::Stop));
        match reason {
            Some(reason) => self.finish(myself, state, reason, true, None),
            None => {
                state.step += 1;
                let (_, engine) = state
                    .device
                    .as_ref()
                    .ok_or_else(|| InferenceError::Internal("no engine attached".into()))?;
                let next = EngineMsg::Next {
                    seq: self.request,
                    token,
                    generation: state.generation,
                    step: state.step,
                    reply: myself.clone(),
                };
                if engine.cast(next).await.is_err() {
                    self.attach(myself, state).await?;
                }
            }
        }
        Ok(())
    }

    fn finished_by_rules(&self, state: &TaskState) -> Option<FinishReason> {
        let generated = state.generated();
        if generated.last() == Some(&state.model.eos) {
            Some(FinishReason::Stop)
        } else if generated.len() >= state.params.max_tokens
            || state.tokens.len() >= state.model.context
        {
            Some(FinishReason::Length)
        } else {
            None
        }
    }

    /// Appends a record, retrying with exponential backoff; a journal that keeps failing
    /// fails the request (the token is never delivered un-journaled).
    async fn journal_with_retry(
        &self,
        record: Record,
        generation: u32,
    ) -> Result<(), InferenceError> {
        let attempts = self.services.config.journal_attempts.max(1);
        let mut delay = Duration::from_millis(1);
        let mut last = None;
        for attempt in 0..attempts {
            let result = {
                let journal = self.services.journal()?;
                let mut journal = journal.lock().unwrap_or_else(|e| e.into_inner());
                // Checked under the journal lock: a newer instance reads the journal under
                // the same lock after taking its generation, so no write slips in between.
                if self.services.task_generation(self.request) != generation {
                    return Err(InferenceError::Superseded(self.request));
                }
                let result = journal.append(&record);
                self.services.note_journal_append(&result);
                result
            };
            match result {
                Ok(()) => return Ok(()),
                Err(err) => {
                    tracing::warn!(request = self.request, attempt, error = %err, "journal append failed");
                    last = Some(err);
                    // A transient error often clears at once: the first retry is
                    // immediate, later ones back off.
                    if attempt > 0 && attempt + 1 < attempts {
                        tokio::time::sleep(delay).await;
                        delay *= 4;
                    }
                }
            }
        }
        Err(InferenceError::Journal(last.expect("at least one attempt")))
    }

    /// Ends the request: journals `End`, then tells the client (the end, or `failure`),
    /// frees its KV and stops normally. The journal comes first, so a client that hears of
    /// the end finds it recorded.
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
        match failure {
            Some(error) => state.sink.fail(error),
            None => state
                .sink
                .finish(reason, state.prompt_len, state.generated().len()),
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
        self.services.forget_task_starts(self.request);
    }
}
