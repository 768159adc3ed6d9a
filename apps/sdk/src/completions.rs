//! How an app generates text: submit or re-attach requests through the runtime, under the
//! app's quotas, and read them as a stream of tokens or as one finished completion.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use llmos_inference::{
    ChatMessage, FinishReason, InferenceError, RequestStream, Runtime, SamplingParams, StreamEvent,
};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::manifest::Quotas;
use crate::AppError;

/// An app's door to the inference runtime. Cheap to clone; every clone shares the app's
/// quota accounting, which outlives the app's restarts (a request keeps its share until
/// it ends, whoever reads it).
#[derive(Clone)]
pub struct Completions {
    inner: Arc<Inner>,
}

struct Inner {
    app: String,
    runtime: Runtime,
    quotas: Quotas,
    usage: Mutex<Usage>,
    submitted: AtomicU64,
    refused: AtomicU64,
    /// One lock per key being submitted: a key's lookup and submission never race
    /// another's for the same key; different keys do not wait on each other.
    keyed: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// What the app's requests hold. A request counts once however many streams (of this
/// instance, of a dead one still draining, of a successor that re-attached) hold it.
#[derive(Default)]
struct Usage {
    requests: usize,
    kv_blocks: usize,
    /// Request id → (its KV blocks, leases holding it).
    by_request: HashMap<u64, (usize, usize)>,
}

/// What an app holds now and has done, for `GET /apps` and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct QuotaUsage {
    /// Requests of this app generating now.
    pub requests: usize,
    /// KV blocks they may need at most (counted for an app with a KV quota, else 0).
    pub kv_blocks: usize,
    /// Requests submitted since the process started.
    pub submitted: u64,
    /// Requests refused by a quota.
    pub refused: u64,
}

/// The model the runtime serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModelInfo {
    /// Its name (the file or directory name).
    pub name: String,
    /// Context length, tokens.
    pub context: usize,
}

impl Completions {
    /// Completions for `app` under `quotas`. The host makes one per enabled app; make
    /// your own only to use the runtime outside the host (embedding, tests).
    pub fn new(app: &str, runtime: Runtime, quotas: Quotas) -> Self {
        Self {
            inner: Arc::new(Inner {
                app: app.to_string(),
                runtime,
                quotas,
                usage: Mutex::new(Usage::default()),
                submitted: AtomicU64::new(0),
                refused: AtomicU64::new(0),
                keyed: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The runtime itself, for what this API does not cover (its tree, its devices). Work
    /// submitted straight to it is not counted against the app's quotas.
    pub fn runtime(&self) -> &Runtime {
        &self.inner.runtime
    }

    /// The model being served.
    pub fn model(&self) -> Result<ModelInfo, AppError> {
        let model = self.inner.runtime.services().model()?;
        Ok(ModelInfo {
            name: model.name.clone(),
            context: model.context,
        })
    }

    /// The prompt of a chat: `messages` in the model's chat template (or the documented
    /// default for a model without one), ready for [`Completions::submit`].
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<String, AppError> {
        Ok(self
            .inner
            .runtime
            .services()
            .model()?
            .chat_prompt(messages)?)
    }

    /// Prompt tokens `prompt` encodes to (BOS included, as [`Completions::submit`] counts).
    pub fn count_tokens(&self, prompt: &str) -> Result<usize, AppError> {
        let model = self.inner.runtime.services().model()?;
        Ok(model
            .tokenizer
            .encode(prompt, true)
            .map_err(InferenceError::from)?
            .len())
    }

    /// The app's quotas.
    pub fn quotas(&self) -> Quotas {
        self.inner.quotas
    }

    /// Current usage.
    pub fn usage(&self) -> QuotaUsage {
        let usage = self.inner.usage.lock().unwrap_or_else(|e| e.into_inner());
        QuotaUsage {
            requests: usage.requests,
            kv_blocks: usage.kv_blocks,
            submitted: self.inner.submitted.load(Ordering::Relaxed),
            refused: self.inner.refused.load(Ordering::Relaxed),
        }
    }

    /// Starts generating a continuation of `prompt`. The request is journaled before this
    /// returns: from then on its id names it across crashes of the app and of the process
    /// (checkpoint the id, then [`Completions::attach`] after a restart). If the caller
    /// is cancelled (its actor killed) after admission, the request still starts but its
    /// id is lost to the caller: use [`Completions::submit_keyed`] when that matters.
    pub async fn submit(
        &self,
        prompt: &str,
        params: SamplingParams,
    ) -> Result<Generation, AppError> {
        let blocks = self.blocks_for(prompt, params.max_tokens);
        let mut lease = self.lease(blocks)?;
        let stream = self.inner.runtime.submit(prompt, params).await?;
        self.inner.submitted.fetch_add(1, Ordering::Relaxed);
        lease.bind(stream.id);
        Ok(Generation::new(stream, Some(lease)))
    }

    /// Exactly-once submission by an app-chosen `key` (unique within the app, e.g.
    /// `session-7-turn-3`): if a request with this key is in the journal — submitted by an
    /// earlier instance, an earlier process, or a call that was cancelled half-way — this
    /// re-attaches to it from its first token instead of submitting again. The key is
    /// journaled with the request, atomically with its `Begin`, so there is no window in
    /// which a crash loses it. Keys are found while the journal holds the request
    /// (finished ones until compaction, every 30 s).
    pub async fn submit_keyed(
        &self,
        key: &str,
        prompt: &str,
        params: SamplingParams,
    ) -> Result<Generation, AppError> {
        let this = self.clone();
        let (key, prompt) = (key.to_string(), prompt.to_string());
        // The lookup and the submission run in a task of their own: a caller cancelled
        // half-way (its actor killed) does not free the key while its submission is still
        // under way, so a successor's call waits for it and then finds it.
        tokio::spawn(async move {
            let lock = this.key_lock(&key);
            let result = {
                let _held = lock.lock().await;
                this.submit_keyed_now(&key, &prompt, params).await
            };
            this.forget_key_lock(&key, lock);
            result
        })
        .await
        .map_err(|e| AppError::failed(format!("keyed submission task: {e}")))?
    }

    async fn submit_keyed_now(
        &self,
        key: &str,
        prompt: &str,
        params: SamplingParams,
    ) -> Result<Generation, AppError> {
        let tag = format!("app:{}:{key}", self.inner.app);
        if let Some(id) = self.inner.runtime.find_tagged(&tag)? {
            return self.attach(id, None).await;
        }
        let blocks = self.blocks_for(prompt, params.max_tokens);
        let mut lease = self.lease(blocks)?;
        let stream = self
            .inner
            .runtime
            .submit_tagged(prompt, params, Some(tag))
            .await?;
        self.inner.submitted.fetch_add(1, Ordering::Relaxed);
        lease.bind(stream.id);
        Ok(Generation::new(stream, Some(lease)))
    }

    fn key_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.inner.keyed.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(key.to_string()).or_default().clone()
    }

    /// Drops the key's lock from the table once nobody else holds or waits on it.
    fn forget_key_lock(&self, key: &str, lock: Arc<tokio::sync::Mutex<()>>) {
        let mut locks = self.inner.keyed.lock().unwrap_or_else(|e| e.into_inner());
        // Clones are only made under this table lock: the table's and ours are the last.
        if Arc::strong_count(&lock) == 2 {
            locks.remove(key);
        }
    }

    /// The request submitted with `key` by [`Completions::submit_keyed`], if the journal
    /// still holds it.
    pub fn find_keyed(&self, key: &str) -> Result<Option<u64>, AppError> {
        let tag = format!("app:{}:{key}", self.inner.app);
        Ok(self.inner.runtime.find_tagged(&tag)?)
    }

    /// Generates and waits for the whole completion.
    pub async fn complete(
        &self,
        prompt: &str,
        params: SamplingParams,
    ) -> Result<Completion, AppError> {
        self.submit(prompt, params).await?.collect().await
    }

    /// Re-attaches to request `id` (submitted earlier, maybe by an earlier instance of the
    /// app or an earlier process): its tokens after index `after` (`None`: all of them),
    /// then live ones, then the end; each token once. A running request counts against
    /// the quotas again, since this app is responsible for it.
    pub async fn attach(&self, id: u64, after: Option<u32>) -> Result<Generation, AppError> {
        let summary = self
            .inner
            .runtime
            .request_summary(id)?
            .ok_or(InferenceError::UnknownRequest(id))?;
        let lease = if summary.finished {
            None
        } else {
            Some(self.lease_request(id, self.blocks(summary.prompt_tokens, summary.max_tokens)))
        };
        let stream = self.inner.runtime.attach(id, after)?;
        Ok(Generation::new(stream, lease))
    }

    /// The KV blocks a request may need at most. Counting them means tokenizing the
    /// prompt once more than the runtime does, so it is done only for an app with a KV
    /// quota; others report 0 reserved blocks.
    fn blocks_for(&self, prompt: &str, max_tokens: usize) -> usize {
        if self.inner.quotas.max_kv_blocks.is_none() {
            return 0;
        }
        let prompt_tokens = self
            .inner
            .runtime
            .services()
            .model()
            .ok()
            .and_then(|m| m.tokenizer.encode(prompt, true).ok())
            .map_or(0, |t| t.len());
        self.blocks(prompt_tokens, max_tokens)
    }

    fn blocks(&self, prompt_tokens: usize, max_tokens: usize) -> usize {
        if self.inner.quotas.max_kv_blocks.is_none() {
            return 0;
        }
        let services = self.inner.runtime.services();
        let context = services.model().map_or(usize::MAX, |m| m.context);
        let block = services.config.block_tokens.max(1);
        prompt_tokens
            .saturating_add(max_tokens)
            .min(context)
            .div_ceil(block)
    }

    fn lease(&self, blocks: usize) -> Result<Lease, AppError> {
        let quotas = self.inner.quotas;
        let mut usage = self.inner.usage.lock().unwrap_or_else(|e| e.into_inner());
        let refuse = |what, limit, in_use, needed| {
            self.inner.refused.fetch_add(1, Ordering::Relaxed);
            Err(AppError::QuotaExceeded {
                app: self.inner.app.clone(),
                what,
                limit,
                in_use,
                needed,
            })
        };
        if let Some(limit) = quotas.max_concurrent_requests {
            if usage.requests + 1 > limit {
                return refuse("concurrent requests", limit, usage.requests, 1);
            }
        }
        if let Some(limit) = quotas.max_kv_blocks {
            if usage.kv_blocks + blocks > limit {
                return refuse("KV blocks", limit, usage.kv_blocks, blocks);
            }
        }
        usage.requests += 1;
        usage.kv_blocks += blocks;
        Ok(Lease {
            inner: self.inner.clone(),
            share: Share::Reserved(blocks),
        })
    }

    /// A lease on a running request, beyond the limits (re-attached work is already
    /// running and must be counted), shared with any other lease on the same request.
    fn lease_request(&self, id: u64, blocks: usize) -> Lease {
        let mut usage = self.inner.usage.lock().unwrap_or_else(|e| e.into_inner());
        let usage = &mut *usage;
        match usage.by_request.get_mut(&id) {
            Some((_, holders)) => *holders += 1,
            None => {
                usage.by_request.insert(id, (blocks, 1));
                usage.requests += 1;
                usage.kv_blocks += blocks;
            }
        }
        Lease {
            inner: self.inner.clone(),
            share: Share::Request(id),
        }
    }
}

/// One holder's part in its app's quota usage, returned when dropped.
struct Lease {
    inner: Arc<Inner>,
    share: Share,
}

enum Share {
    /// Counted before the request had an id (between the quota check and the submit).
    Reserved(usize),
    /// The share of request `id` (counted once, however many leases hold it).
    Request(u64),
}

impl Lease {
    /// The reservation becomes request `id`'s share.
    fn bind(&mut self, id: u64) {
        let Share::Reserved(blocks) = self.share else {
            return;
        };
        let mut usage = self.inner.usage.lock().unwrap_or_else(|e| e.into_inner());
        let usage = &mut *usage;
        match usage.by_request.get_mut(&id) {
            Some((_, holders)) => {
                // Someone re-attached first: the request is already counted.
                *holders += 1;
                usage.requests = usage.requests.saturating_sub(1);
                usage.kv_blocks = usage.kv_blocks.saturating_sub(blocks);
            }
            None => {
                usage.by_request.insert(id, (blocks, 1));
            }
        }
        self.share = Share::Request(id);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut usage = self.inner.usage.lock().unwrap_or_else(|e| e.into_inner());
        let usage = &mut *usage;
        let blocks = match self.share {
            Share::Reserved(blocks) => blocks,
            Share::Request(id) => match usage.by_request.get_mut(&id) {
                Some((_, holders)) if *holders > 1 => {
                    *holders -= 1;
                    return;
                }
                Some(&mut (blocks, _)) => {
                    usage.by_request.remove(&id);
                    blocks
                }
                None => return,
            },
        };
        usage.requests = usage.requests.saturating_sub(1);
        usage.kv_blocks = usage.kv_blocks.saturating_sub(blocks);
    }
}

/// A request being generated: its tokens as they come, then its end.
pub struct Generation {
    /// The request id (the runtime's; stable across restarts).
    pub id: u64,
    /// Tokens the client had received before this stream was attached.
    pub already_delivered: u32,
    events: mpsc::UnboundedReceiver<StreamEvent>,
    lease: Option<Lease>,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("id", &self.id)
            .field("already_delivered", &self.already_delivered)
            .finish_non_exhaustive()
    }
}

impl Generation {
    fn new(stream: RequestStream, lease: Option<Lease>) -> Self {
        Self {
            id: stream.id,
            already_delivered: stream.already_delivered,
            events: stream.events,
            lease,
        }
    }

    /// The next event; `None` once the end was returned (or the runtime shut down).
    pub async fn next(&mut self) -> Option<StreamEvent> {
        let event = self.events.recv().await;
        if !matches!(event, Some(StreamEvent::Token { .. })) {
            self.lease = None;
        }
        event
    }

    /// Reads to the end and returns the completion (the text of the tokens this stream
    /// carried: all of them when it was submitted or attached from the start).
    pub async fn collect(mut self) -> Result<Completion, AppError> {
        let mut text = String::new();
        let mut tokens = Vec::new();
        loop {
            match self.next().await {
                Some(StreamEvent::Token { token, text: t, .. }) => {
                    tokens.push(token);
                    text.push_str(&t);
                }
                Some(StreamEvent::Finished {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    return Ok(Completion {
                        id: self.id,
                        text,
                        tokens,
                        finish_reason: reason,
                        prompt_tokens,
                        completion_tokens,
                    })
                }
                Some(StreamEvent::Failed { error }) => {
                    return Err(AppError::GenerationFailed {
                        request: self.id,
                        error,
                    })
                }
                None => {
                    return Err(AppError::Unavailable {
                        app: "runtime".into(),
                        reason: format!("request {} did not end (shutting down?)", self.id),
                    })
                }
            }
        }
    }
}

impl Drop for Generation {
    /// A request runs to its end even when nobody reads it; its quota share is held
    /// until then, so dropping a stream cannot be used to exceed the quotas.
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (_, closed) = mpsc::unbounded_channel();
        let mut events = std::mem::replace(&mut self.events, closed);
        handle.spawn(async move {
            while let Some(event) = events.recv().await {
                if !matches!(event, StreamEvent::Token { .. }) {
                    break;
                }
            }
            drop(lease);
        });
    }
}

/// A finished generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// The request id.
    pub id: u64,
    /// The generated text (stop strings removed).
    pub text: String,
    /// The generated token ids.
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
}
