//! The batch app's actor: one instance's memory ([`BatchState`]), the messages it handles
//! ([`BatchMsg`]), and how it keeps up to `concurrency` items generating.
//!
//! The actor owns every write to the checkpoint store, so writes are ordered, and it never
//! waits on the runtime itself: submissions and generations run in tasks that report back
//! with messages, so the actor keeps answering `GET`s while items generate.
//!
//! Crash safety, step by step for one item:
//! 1. `submissions += 1`, checkpoint: an intent. Should the process die before step 3,
//!    the item is submitted again after the restart and the count says so (2): a redo is
//!    never silent.
//! 2. A *submitter* task calls `Completions::submit`; the runtime journals the request
//!    before it returns the id. The submitter is deliberately not tied to the instance
//!    ([`tokio::spawn`], not [`AppContext::spawn`]): killing the instance in the middle
//!    of a submission must not leave a journaled request whose id nobody learns. Its
//!    result goes to a table of submissions in flight that every instance of the app
//!    shares (it lives in the [`BatchApp`](crate::BatchApp) value, which outlives
//!    instances); an orderly stop waits for it briefly.
//! 3. The actor (this instance or its successor) takes the result, records the item as
//!    `running` with the request id and checkpoints it — before anything waits on the
//!    generation. From here on the item is never submitted again: later instances, and
//!    later processes, re-attach to the id.
//! 4. A *reader* task (tied to the instance) collects the text and reports; `done` or
//!    `failed`, checkpoint. Items `done` or `failed` are never touched again.
//!
//! So a crash of the *app* at any point redoes nothing. What no app can close alone is a
//! death of the whole *process* between steps 1 and 3 (a few milliseconds): the runtime
//! has no way to find a request by a key the app chose before submitting it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use llmos_app::{AppContext, AppError, AppStore, Completions, FinishReason, Generation, Reply};
use llmos_inference::InferenceError;
use tokio::sync::watch;

use crate::job::{clip, parse_job_name, ItemState, Job, JobCreated, JobSummary, JobView, NewJob};
use crate::REPORT_FAULT_POINT;

/// The checkpoint key of the next job id.
const NEXT_ID_KEY: &str = "next-job";

/// How long to wait before trying again when the app's quota or the runtime has no room
/// (room held by others, e.g. requests of a crashed predecessor that keep their quota
/// share to their end, sends no message when it frees up).
const RETRY_DELAY: Duration = Duration::from_millis(100);

/// How long an orderly stop waits for submissions on their way, to record their ids
/// (below the kernel's 5 s shutdown timeout of a worker).
const STOP_WAIT: Duration = Duration::from_secs(3);

/// Messages of the batch app's actor. Route handlers send the first three; the app's own
/// tasks send [`BatchMsg::Work`].
pub enum BatchMsg {
    /// Create a job (the body was checked by [`NewJob::parse`]).
    Create {
        /// The checked request.
        job: NewJob,
        /// Gets the new job's id, or why it could not be stored.
        reply: Reply<Result<JobCreated, AppError>>,
    },
    /// Show a job once at least `wait_done` of its items are done or failed (or the job is
    /// finished) and none of its items is half-way through a submission; `None` answers
    /// at once.
    Get {
        /// `job-N`.
        id: String,
        /// Items done or failed to wait for.
        wait_done: Option<usize>,
        /// Gets the job, or `NotFound`.
        reply: Reply<Result<JobView, AppError>>,
    },
    /// Every job's counts, oldest first.
    List {
        /// Gets the summaries.
        reply: Reply<Vec<JobSummary>>,
    },
    /// News from the app's own tasks (only the app builds these).
    Work(WorkMsg),
}

/// News from the app's own tasks; opaque outside this crate.
pub struct WorkMsg(Work);

enum Work {
    /// A reader finished an item's generation.
    ItemDone {
        ticket: u64,
        item: ItemKey,
        request: u64,
        outcome: Outcome,
    },
    /// Record returned submissions and start pending items (after a start, a submission,
    /// or a wait for room).
    Dispatch,
}

/// (job id, item index).
type ItemKey = (u64, usize);

/// How an item's generation ended.
enum Outcome {
    Done { text: String, reason: FinishReason },
    Failed(String),
}

/// Submissions on their way, shared by every instance of the app: it lives in the
/// [`BatchApp`](crate::BatchApp) value, which outlives instances (not the process).
#[derive(Default)]
pub(crate) struct Inflight {
    submissions: Mutex<HashMap<ItemKey, Submission>>,
    /// How many are still inside `submit` (an orderly stop waits for 0).
    submitting: watch::Sender<usize>,
}

enum Submission {
    /// `Completions::submit` is running.
    Submitting,
    /// It returned; no instance has recorded the result yet.
    Returned(Result<Generation, AppError>),
}

impl Inflight {
    fn lock(&self) -> MutexGuard<'_, HashMap<ItemKey, Submission>> {
        self.submissions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn contains(&self, item: ItemKey) -> bool {
        self.lock().contains_key(&item)
    }

    fn has_job(&self, job: u64) -> bool {
        self.lock().keys().any(|&(j, _)| j == job)
    }

    fn begin(&self, item: ItemKey) {
        self.lock().insert(item, Submission::Submitting);
        self.submitting.send_modify(|n| *n += 1);
    }

    fn returned(&self, item: ItemKey, result: Result<Generation, AppError>) {
        self.lock().insert(item, Submission::Returned(result));
        self.submitting.send_modify(|n| *n = n.saturating_sub(1));
    }

    /// Takes every returned submission, in item order.
    fn take_returned(&self) -> Vec<(ItemKey, Result<Generation, AppError>)> {
        let mut submissions = self.lock();
        let mut done: Vec<ItemKey> = submissions
            .iter()
            .filter(|(_, s)| matches!(s, Submission::Returned(_)))
            .map(|(&k, _)| k)
            .collect();
        done.sort_unstable();
        done.into_iter()
            .filter_map(|k| match submissions.remove(&k) {
                Some(Submission::Returned(result)) => Some((k, result)),
                _ => None,
            })
            .collect()
    }

    /// Puts back a result an instance could not record (its successor will).
    fn put_back(&self, item: ItemKey, result: Result<Generation, AppError>) {
        self.lock().insert(item, Submission::Returned(result));
    }

    /// Waits (at most `limit`) until no submission is inside `submit`.
    async fn settle(&self, limit: Duration) {
        let mut submitting = self.submitting.subscribe();
        let _ = tokio::time::timeout(limit, submitting.wait_for(|n| *n == 0)).await;
    }
}

/// Tickets name readers uniquely in the process, so a report from a reader of an earlier
/// instance (which may reach this one while it restarts) is recognised as not ours.
static NEXT_TICKET: AtomicU64 = AtomicU64::new(1);

/// One instance's memory, rebuilt from the checkpoints by each start.
pub struct BatchState {
    concurrency: usize,
    inflight: Arc<Inflight>,
    jobs: BTreeMap<u64, Job>,
    next_id: u64,
    /// This instance's readers: ticket → item.
    readers: HashMap<u64, ItemKey>,
    /// Long polls waiting for progress; answered by `answer_waiters`.
    waiters: Vec<Waiter>,
    /// A `Dispatch` is on its way (do not schedule another).
    retry_scheduled: bool,
}

struct Waiter {
    job: u64,
    /// Items done or failed to wait for (already capped at the job's size).
    want: usize,
    reply: Reply<Result<JobView, AppError>>,
}

impl BatchState {
    /// Loads every job, re-attaches the items that were running, and asks for a dispatch
    /// of the rest. Waits on nothing but the checkpoint files.
    pub(crate) fn start(
        concurrency: usize,
        inflight: Arc<Inflight>,
        ctx: &AppContext<BatchMsg>,
    ) -> Result<Self, AppError> {
        let store = ctx.store();
        let mut jobs = BTreeMap::new();
        for key in store.keys()? {
            let Some(id) = parse_job_name(&key) else {
                continue;
            };
            // A damaged checkpoint fails the start (and, if it stays damaged, the app is
            // given up and reported): a job is never silently forgotten.
            if let Some(job) = store.get::<Job>(&key)? {
                jobs.insert(id, job);
            }
        }
        let stored_next: u64 = store.get(NEXT_ID_KEY)?.unwrap_or(1);
        // The counter is written before each job; a job is the truth if they disagree.
        let next_id = jobs
            .keys()
            .next_back()
            .map_or(stored_next, |last| stored_next.max(last + 1));
        let mut state = Self {
            concurrency,
            inflight,
            jobs,
            next_id,
            readers: HashMap::new(),
            waiters: Vec::new(),
            retry_scheduled: false,
        };
        let running: Vec<(ItemKey, u64)> = state
            .jobs
            .values()
            .flat_map(|job| {
                job.items
                    .iter()
                    .enumerate()
                    .filter_map(move |(index, item)| match (item.state, item.request) {
                        (ItemState::Running, Some(request)) => Some(((job.id, index), request)),
                        _ => None,
                    })
            })
            .collect();
        for &(item, request) in &running {
            state.spawn_reader(ctx, item, request, None);
        }
        tracing::info!(
            target: "llmos::apps",
            app = ctx.name(),
            jobs = state.jobs.len(),
            reattached = running.len(),
            "batch app state loaded"
        );
        // Pending items are submitted once the actor runs (a start must not wait on the
        // runtime); the cast waits until this instance is up, then delivers.
        state.retry_scheduled = true;
        let handle = ctx.handle().clone();
        ctx.spawn(async move { handle.cast(BatchMsg::Work(WorkMsg(Work::Dispatch))).await });
        Ok(state)
    }

    /// Handles one message.
    pub(crate) fn handle(
        &mut self,
        ctx: &AppContext<BatchMsg>,
        message: BatchMsg,
    ) -> Result<(), AppError> {
        match message {
            BatchMsg::Create { job, reply } => {
                let created = self.create(ctx.store(), job);
                let stored = created.is_ok();
                let _ = reply.send(created);
                if stored {
                    self.fill(ctx)?;
                }
            }
            BatchMsg::Get {
                id,
                wait_done,
                reply,
            } => self.get(&id, wait_done, reply),
            BatchMsg::List { reply } => {
                let _ = reply.send(self.jobs.values().map(Job::summary).collect());
            }
            BatchMsg::Work(WorkMsg(Work::ItemDone {
                ticket,
                item,
                request,
                outcome,
            })) => {
                if self.readers.remove(&ticket).is_none() {
                    // A reader of an earlier instance: this instance re-attached to the
                    // same request, and its own reader reports it.
                    return Ok(());
                }
                self.item_done(ctx.store(), item, request, outcome)?;
                self.fill(ctx)?;
            }
            BatchMsg::Work(WorkMsg(Work::Dispatch)) => {
                self.retry_scheduled = false;
                self.fill(ctx)?;
            }
        }
        self.answer_waiters();
        Ok(())
    }

    /// At an orderly stop (shutdown, operator restart): waits briefly for submissions on
    /// their way and records their request ids, so the next start re-attaches to them.
    pub(crate) async fn stop(&mut self, ctx: &AppContext<BatchMsg>) {
        self.inflight.settle(STOP_WAIT).await;
        if let Err(e) = self.record_submissions(ctx) {
            tracing::warn!(target: "llmos::apps", error = %e, "batch app: submissions not recorded at stop");
        }
    }

    fn create(&mut self, store: &AppStore, request: NewJob) -> Result<JobCreated, AppError> {
        let id = self.next_id;
        // The counter first: an id is never handed out twice, even if the job write fails.
        store.put(NEXT_ID_KEY, &(id + 1))?;
        self.next_id = id + 1;
        let job = Job::new(id, request);
        store.put(&job.name(), &job)?;
        let created = JobCreated {
            id: job.name(),
            total: job.items.len(),
        };
        tracing::info!(target: "llmos::apps", job = %created.id, items = created.total, "batch job created");
        self.jobs.insert(id, job);
        Ok(created)
    }

    fn get(
        &mut self,
        name: &str,
        wait_done: Option<usize>,
        reply: Reply<Result<JobView, AppError>>,
    ) {
        let Some(job) = parse_job_name(name).and_then(|id| self.jobs.get(&id)) else {
            let _ = reply.send(Err(AppError::NotFound(format!("no job `{}`", clip(name)))));
            return;
        };
        let Some(wait_done) = wait_done else {
            let _ = reply.send(Ok(job.view()));
            return;
        };
        let waiter = Waiter {
            job: job.id,
            want: wait_done.min(job.items.len()),
            reply,
        };
        // Answered at the end of this message if it is satisfied already.
        self.waiters.push(waiter);
    }

    /// Records a reader's report, if it is about the item as this instance knows it.
    fn item_done(
        &mut self,
        store: &AppStore,
        (job_id, index): ItemKey,
        request: u64,
        outcome: Outcome,
    ) -> Result<(), AppError> {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return Ok(());
        };
        let Some(item) = job.items.get_mut(index) else {
            return Ok(());
        };
        if item.settled() || item.request != Some(request) {
            return Ok(());
        }
        match outcome {
            Outcome::Done { text, reason } => item.finish(text, reason),
            Outcome::Failed(error) => {
                tracing::warn!(target: "llmos::apps", job = job_id, index, request, %error, "batch item failed");
                item.fail(error);
            }
        }
        // If this write fails, the instance crashes; its successor re-attaches to the
        // request (finished: its text comes straight from the journal) and tries again.
        store.put(&job.name(), job)?;
        Ok(())
    }

    /// Records returned submissions, then starts pending items, oldest job first, while
    /// fewer than `concurrency` are being submitted or read.
    fn fill(&mut self, ctx: &AppContext<BatchMsg>) -> Result<(), AppError> {
        self.record_submissions(ctx)?;
        while self.readers.len() + self.inflight.len() < self.concurrency {
            let Some((job_id, index)) = self.next_pending() else {
                return Ok(());
            };
            if self.quota_full(ctx.completions()) {
                self.retry_later(ctx);
                return Ok(());
            }
            let Some(job) = self.jobs.get_mut(&job_id) else {
                return Ok(());
            };
            // 1. The intent, durably.
            job.items[index].submissions += 1;
            ctx.store().put(&job.name(), job)?;
            // 2. The submission, in a task no crash of this instance can cut short.
            let item = (job_id, index);
            let prompt = job.items[index].prompt.clone();
            let params = job.params.sampling();
            let completions = ctx.completions().clone();
            let inflight = self.inflight.clone();
            let handle = ctx.handle().clone();
            inflight.begin(item);
            tokio::spawn(async move {
                let result = completions.submit(&prompt, params).await;
                inflight.returned(item, result);
                // Wakes whichever instance is current; if this message is lost with a
                // crashing instance, the successor's start dispatches anyway.
                let _ = handle.cast(BatchMsg::Work(WorkMsg(Work::Dispatch))).await;
            });
        }
        Ok(())
    }

    /// Step 3: records what returned submissions say, and starts reading the accepted ones.
    fn record_submissions(&mut self, ctx: &AppContext<BatchMsg>) -> Result<(), AppError> {
        for ((job_id, index), result) in self.inflight.take_returned() {
            let Some(job) = self.jobs.get_mut(&job_id) else {
                continue;
            };
            let item = &mut job.items[index];
            match result {
                Ok(generation) => {
                    let request = generation.id;
                    item.state = ItemState::Running;
                    item.request = Some(request);
                    if let Err(e) = ctx.store().put(&job.name(), job) {
                        // Not recorded: undo in memory, hand it to the successor, crash.
                        let item = &mut job.items[index];
                        item.state = ItemState::Pending;
                        item.request = None;
                        self.inflight.put_back((job_id, index), Ok(generation));
                        return Err(e);
                    }
                    self.spawn_reader(ctx, (job_id, index), request, Some(generation));
                }
                Err(e) if not_now(&e) => {
                    // Not submitted after all: take the intent back, try again later.
                    item.submissions = item.submissions.saturating_sub(1);
                    ctx.store().put(&job.name(), job)?;
                    self.retry_later(ctx);
                }
                Err(e) => {
                    // About the item itself (a prompt longer than the context, …): it
                    // fails alone and the job goes on.
                    tracing::warn!(target: "llmos::apps", job = job_id, index, error = %e, "batch item refused");
                    item.fail(e.to_string());
                    ctx.store().put(&job.name(), job)?;
                }
            }
        }
        Ok(())
    }

    fn next_pending(&self) -> Option<ItemKey> {
        self.jobs.values().find_map(|job| {
            job.items
                .iter()
                .enumerate()
                .find(|&(index, item)| {
                    item.state == ItemState::Pending && !self.inflight.contains((job.id, index))
                })
                .map(|(index, _)| (job.id, index))
        })
    }

    /// The app's concurrent-request quota has no room (a cheap check before writing an
    /// intent; `submit` is still the authority). Submissions on their way may not hold
    /// their share yet, so they count too.
    fn quota_full(&self, completions: &Completions) -> bool {
        completions
            .quotas()
            .max_concurrent_requests
            .is_some_and(|limit| completions.usage().requests + self.inflight.len() >= limit)
    }

    /// Tries again after [`RETRY_DELAY`] (reports of our readers also try again).
    fn retry_later(&mut self, ctx: &AppContext<BatchMsg>) {
        if self.retry_scheduled {
            return;
        }
        self.retry_scheduled = true;
        let handle = ctx.handle().clone();
        ctx.spawn(async move {
            tokio::time::sleep(RETRY_DELAY).await;
            handle.cast(BatchMsg::Work(WorkMsg(Work::Dispatch))).await
        });
    }

    /// Step 4: reads one item's generation to its end in a task of this instance, then
    /// reports. `generation` is the stream of a submission just recorded; `None`
    /// re-attaches to `request`.
    fn spawn_reader(
        &mut self,
        ctx: &AppContext<BatchMsg>,
        item: ItemKey,
        request: u64,
        generation: Option<Generation>,
    ) {
        let ticket = NEXT_TICKET.fetch_add(1, Ordering::Relaxed);
        self.readers.insert(ticket, item);
        let completions = ctx.completions().clone();
        let handle = ctx.handle().clone();
        ctx.spawn(async move {
            let generation = match generation {
                Some(generation) => Ok(generation),
                // Everything from the first token: replayed from the journal, then live.
                None => completions.attach(request, None).await,
            };
            let completion = match generation {
                Ok(generation) => generation.collect().await,
                Err(e) => Err(e),
            };
            let outcome = match completion {
                Ok(done) => Outcome::Done {
                    text: done.text,
                    reason: done.finish_reason,
                },
                // The stream ended without an end (the runtime is going away): fail this
                // task, and with it the instance; a successor re-attaches.
                Err(e @ AppError::Unavailable { .. }) => return Err(e),
                Err(e) => Outcome::Failed(e.to_string()),
            };
            // A test hook: `batch.report=panic` makes this task panic as a bug would.
            llmos_kernel::fault_point!(REPORT_FAULT_POINT, |detail: Option<String>| {
                Err(AppError::failed(format!(
                    "injected fault `{REPORT_FAULT_POINT}`{}",
                    detail.map(|d| format!(": {d}")).unwrap_or_default()
                )))
            });
            handle
                .cast(BatchMsg::Work(WorkMsg(Work::ItemDone {
                    ticket,
                    item,
                    request,
                    outcome,
                })))
                .await
        });
    }

    /// Answers the long polls that are now satisfied: enough items of their job settled,
    /// and none of its items half-way through a submission. Runs after each message is
    /// handled, so an answer reflects everything that message started: it never shows an
    /// item between its intent and its record, and a client acting on it (even by killing
    /// the process) does not land in a submission this progress set off.
    fn answer_waiters(&mut self) {
        let mut views: HashMap<u64, JobView> = HashMap::new();
        for waiter in std::mem::take(&mut self.waiters) {
            let ready = self
                .jobs
                .get(&waiter.job)
                .filter(|job| job.settled() >= waiter.want && !self.inflight.has_job(job.id));
            match ready {
                Some(job) => {
                    let view = views.entry(job.id).or_insert_with(|| job.view()).clone();
                    let _ = waiter.reply.send(Ok(view));
                }
                // Polls whose clients went away are forgotten.
                None if waiter.reply.is_closed() => {}
                None => self.waiters.push(waiter),
            }
        }
    }
}

/// Refusals that mean "not now" rather than "not this item": no room (the app's quota,
/// the runtime's admission, no healthy device) or a runtime that is not there to ask
/// (its actors restarting or shutting down). The item stays pending.
fn not_now(error: &AppError) -> bool {
    matches!(
        error,
        AppError::QuotaExceeded { .. }
            | AppError::Unavailable { .. }
            | AppError::Inference(
                InferenceError::Overloaded(_)
                    | InferenceError::NoDevice(_)
                    | InferenceError::Kernel(_)
            )
    )
}
