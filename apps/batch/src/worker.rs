//! The batch app's actor: one instance's memory ([`BatchState`]), the messages it handles
//! ([`BatchMsg`]), and how it keeps up to `concurrency` items generating.
//!
//! The actor owns every write to the checkpoint store, so writes are ordered, and it never
//! waits on the runtime itself: submissions and generations run in tasks of the instance
//! ([`AppContext::spawn`]: aborted when it dies) that report back with messages, so the
//! actor keeps answering `GET`s while items generate.
//!
//! Crash safety, step by step for one item (its key is `job-N-item-I`):
//! 1. The intent: `submissions` goes from 0 to 1, checkpointed. A pending item that
//!    already counts 1 was being submitted when an instance or the process died; it is
//!    submitted again, and the count is not raised for that.
//! 2. A *submitter* task calls [`Completions::submit_keyed`] with the item's key. The
//!    runtime journals the key atomically with the request, so if an earlier call for the
//!    item got that far (in a killed instance, in a dead process), this one re-attaches to
//!    that request from its first token instead of submitting again.
//! 3. The actor records the item as `running` with the request id and checkpoints it
//!    before anything waits on the generation. From here on later instances, and later
//!    processes, re-attach by id ([`Completions::attach`]).
//! 4. A *reader* task collects the text and reports; `done` or `failed`, checkpoint.
//!    Items `done` or `failed` are never touched again.
//!
//! So a crash at any point, of the app or of the whole process, redoes nothing: before
//! step 3 the item is pending and goes through step 2 again, after it the id is kept.
//! One case asks for more: if the key names a request that ended without generating a
//! token (the runtime ends a journaled request whose task cannot start, except when an
//! orderly shutdown is what stopped it: that one stays for the next process), re-attaching
//! would only fail the item. It moves to a fresh key instead (`rekeyed`, checkpointed)
//! and is submitted again, which redoes nothing since nothing was generated.
//!
//! `submissions` is the proof, counted from the journal rather than trusted: step 3 (or a
//! refusal) sets it to 1 if a request was under the item's key just before the call
//! ([`Completions::find_keyed`]: made by an earlier call that a crash cut short), plus 1
//! if the call created a new one (the id it returned is not the one found). A second
//! request for an item would show as 2.
//!
//! # Waiting for room
//!
//! A submission refused for lack of room (the app's quota, the runtime's admission) or
//! because the runtime is not there to ask leaves its item pending, and nothing more is
//! submitted until one of this instance's items ends: its reader reports after its
//! generation ended, that is after its quota share was returned, which is when room comes
//! back. If nothing of this instance is in flight, no such report will come (the room is
//! held by others: another app's requests, or a dead instance's dropped stream that still
//! drains to its end), and one timer, [`IDLE_RETRY`], asks again.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use llmos_app::{
    AppContext, AppError, AppStore, Completions, FinishReason, Generation, Reply, SamplingParams,
};
use llmos_inference::InferenceError;

use crate::job::{clip, parse_job_name, ItemState, Job, JobCreated, JobSummary, JobView, NewJob};
use crate::REPORT_FAULT_POINT;

/// The checkpoint key of the next job id.
const NEXT_ID_KEY: &str = "next-job";

/// How long to wait before submitting again when there was no room and nothing of this
/// instance is in flight to say when there is (see the module docs). At most one such
/// timer is armed at a time.
pub const IDLE_RETRY: Duration = Duration::from_millis(200);

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
    /// A submitter's call returned.
    Submitted {
        ticket: u64,
        item: ItemKey,
        submission: Submission,
    },
    /// A reader finished an item's generation.
    ItemDone {
        ticket: u64,
        item: ItemKey,
        request: u64,
        outcome: Outcome,
    },
    /// Start pending items (after a start, or the idle retry).
    Dispatch,
}

/// (job id, item index).
type ItemKey = (u64, usize);

/// What a submitter found.
enum Submission {
    /// What one `submit_keyed` call came to.
    Called {
        result: Result<Generation, AppError>,
        /// Requests under the item's key as the journal shows them around the call (see
        /// the module docs); `None` when the journal could not be asked.
        requests: Option<u32>,
    },
    /// The key names this request, which ended without generating a token: not called.
    Unstarted(u64),
}

/// How an item's generation ended.
enum Outcome {
    Done { text: String, reason: FinishReason },
    Failed(String),
}

/// Tickets name tasks uniquely in the process, so a report from a task of an earlier
/// instance (which may reach this one while it restarts) is recognised as not ours.
static NEXT_TICKET: AtomicU64 = AtomicU64::new(1);

/// One instance's memory, rebuilt from the checkpoints by each start.
pub struct BatchState {
    concurrency: usize,
    jobs: BTreeMap<u64, Job>,
    next_id: u64,
    /// This instance's submitters: ticket → item.
    submitters: HashMap<u64, ItemKey>,
    /// This instance's readers: ticket → item.
    readers: HashMap<u64, ItemKey>,
    /// Long polls waiting for progress; answered by `answer_waiters`.
    waiters: Vec<Waiter>,
    /// A submission found no room: submit nothing until an item of ours ends (or the
    /// idle retry fires).
    no_room: bool,
    /// A `Dispatch` is on its way (do not schedule another).
    dispatch_scheduled: bool,
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
    pub(crate) fn start(concurrency: usize, ctx: &AppContext<BatchMsg>) -> Result<Self, AppError> {
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
            jobs,
            next_id,
            submitters: HashMap::new(),
            readers: HashMap::new(),
            waiters: Vec::new(),
            no_room: false,
            dispatch_scheduled: false,
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
        // Pending items (those a crash caught half-way through their submission too) are
        // submitted once the actor runs: a start must not wait on the runtime. The cast
        // waits until this instance is up, then delivers.
        state.schedule_dispatch(ctx, None);
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
            BatchMsg::Work(WorkMsg(Work::Submitted {
                ticket,
                item,
                submission,
            })) => {
                // One of an earlier instance's is dropped (its stream drains to the end);
                // this instance submits the item again and finds the request by its key.
                if self.submitters.remove(&ticket).is_some() {
                    self.submitted(ctx, item, submission)?;
                    self.fill(ctx)?;
                }
            }
            BatchMsg::Work(WorkMsg(Work::ItemDone {
                ticket,
                item,
                request,
                outcome,
            })) => {
                // One of an earlier instance's is ignored: this instance re-attached to the
                // same request, and its own reader reports it.
                if self.readers.remove(&ticket).is_some() {
                    self.item_done(ctx.store(), item, request, outcome)?;
                    // Its quota share was returned before it reported: room.
                    self.no_room = false;
                    self.fill(ctx)?;
                }
            }
            BatchMsg::Work(WorkMsg(Work::Dispatch)) => {
                self.dispatch_scheduled = false;
                self.no_room = false;
                self.fill(ctx)?;
            }
        }
        self.answer_waiters();
        Ok(())
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

    /// Starts pending items, oldest job first, while fewer than `concurrency` are being
    /// submitted or read and there is room.
    fn fill(&mut self, ctx: &AppContext<BatchMsg>) -> Result<(), AppError> {
        while self.submitters.len() + self.readers.len() < self.concurrency {
            let Some((job_id, index)) = self.next_pending() else {
                return Ok(());
            };
            if self.no_room || self.quota_full(ctx.completions()) {
                self.wait_for_room(ctx);
                return Ok(());
            }
            let Some(job) = self.jobs.get_mut(&job_id) else {
                return Ok(());
            };
            // 1. The intent, durably (unless a submission cut short already made it).
            if job.items[index].submissions == 0 {
                job.items[index].submissions = 1;
                ctx.store().put(&job.name(), job)?;
            }
            // 2. The submission, by the item's key.
            let key = job.key(index);
            let prompt = job.items[index].prompt.clone();
            let params = job.params.sampling();
            self.spawn_submitter(ctx, (job_id, index), key, prompt, params);
        }
        Ok(())
    }

    /// Step 2 in a task of this instance: one keyed submission, and what the journal shows
    /// for the key around it.
    fn spawn_submitter(
        &mut self,
        ctx: &AppContext<BatchMsg>,
        item: ItemKey,
        key: String,
        prompt: String,
        params: SamplingParams,
    ) {
        let ticket = NEXT_TICKET.fetch_add(1, Ordering::Relaxed);
        self.submitters.insert(ticket, item);
        let completions = ctx.completions().clone();
        let handle = ctx.handle().clone();
        ctx.spawn(async move {
            let submission = submit(&completions, &key, &prompt, params).await;
            handle
                .cast(BatchMsg::Work(WorkMsg(Work::Submitted {
                    ticket,
                    item,
                    submission,
                })))
                .await
        });
    }

    /// Step 3: records what a submission came to, and starts reading an accepted one.
    fn submitted(
        &mut self,
        ctx: &AppContext<BatchMsg>,
        (job_id, index): ItemKey,
        submission: Submission,
    ) -> Result<(), AppError> {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return Ok(());
        };
        let item = &mut job.items[index];
        let (result, requests) = match submission {
            Submission::Called { result, requests } => (result, requests),
            Submission::Unstarted(request) => {
                // Stays pending, and `fill` submits it again under its next key.
                tracing::info!(target: "llmos::apps", job = job_id, index, request, "batch item rekeyed: its request never started");
                item.rekeyed += 1;
                return ctx.store().put(&job.name(), job);
            }
        };
        if let Some(requests) = requests {
            item.submissions = requests;
        }
        let generation = match result {
            Ok(generation) => {
                item.state = ItemState::Running;
                item.request = Some(generation.id);
                generation
            }
            Err(e) if not_now(&e) => {
                // Stays pending (the count says whether the key names a request already).
                tracing::debug!(target: "llmos::apps", job = job_id, index, error = %e, "batch item waits for room");
                self.no_room = true;
                return ctx.store().put(&job.name(), job);
            }
            Err(e) => {
                // About the item itself (a prompt longer than the context, …): it fails
                // alone and the job goes on.
                tracing::warn!(target: "llmos::apps", job = job_id, index, error = %e, "batch item refused");
                item.fail(e.to_string());
                return ctx.store().put(&job.name(), job);
            }
        };
        // If this write fails the instance crashes, and its successor submits the item
        // again: the key finds this request.
        ctx.store().put(&job.name(), job)?;
        let request = generation.id;
        self.spawn_reader(ctx, (job_id, index), request, Some(generation));
        Ok(())
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

    /// The oldest pending item that no submitter of this instance holds.
    fn next_pending(&self) -> Option<ItemKey> {
        self.jobs.values().find_map(|job| {
            job.items
                .iter()
                .enumerate()
                .find(|&(index, item)| {
                    item.state == ItemState::Pending
                        && !self.submitters.values().any(|&k| k == (job.id, index))
                })
                .map(|(index, _)| (job.id, index))
        })
    }

    /// The app's concurrent-request quota has no room (a cheap check before writing an
    /// intent; `submit_keyed` is still the authority). This instance's submitters count
    /// too, as they may not hold their share yet.
    fn quota_full(&self, completions: &Completions) -> bool {
        completions
            .quotas()
            .max_concurrent_requests
            .is_some_and(|limit| completions.usage().requests + self.submitters.len() >= limit)
    }

    /// Submits nothing more until room returns: the next report of this instance's tasks
    /// says when, or, with none in flight, the idle retry.
    fn wait_for_room(&mut self, ctx: &AppContext<BatchMsg>) {
        if self.submitters.is_empty() && self.readers.is_empty() {
            self.schedule_dispatch(ctx, Some(IDLE_RETRY));
        }
    }

    /// Sends this instance a `Dispatch` (after `delay`), unless one is on its way.
    fn schedule_dispatch(&mut self, ctx: &AppContext<BatchMsg>, delay: Option<Duration>) {
        if std::mem::replace(&mut self.dispatch_scheduled, true) {
            return;
        }
        let handle = ctx.handle().clone();
        ctx.spawn(async move {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            handle.cast(BatchMsg::Work(WorkMsg(Work::Dispatch))).await
        });
    }

    /// Answers the long polls that are now satisfied: enough items of their job settled,
    /// and none of its items half-way through a submission. Runs after each message is
    /// handled, so an answer reflects everything that message started: it never shows an
    /// item between its intent and its record, so the items it shows as `running` are
    /// exactly those with a request.
    fn answer_waiters(&mut self) {
        let mut views: HashMap<u64, JobView> = HashMap::new();
        for waiter in std::mem::take(&mut self.waiters) {
            let ready = self.jobs.get(&waiter.job).filter(|job| {
                job.settled() >= waiter.want && !job.items.iter().any(|i| i.submitting())
            });
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

/// One `submit_keyed` call for `key`, and how many requests the journal shows under the
/// key around it: 1 if one was there just before the call, plus 1 if the call created a
/// new one (a refused call may have journaled one that could not start). No call if the
/// key names a request that ended without generating a token.
async fn submit(
    completions: &Completions,
    key: &str,
    prompt: &str,
    params: SamplingParams,
) -> Submission {
    let not_called = |e: AppError| Submission::Called {
        result: Err(e),
        requests: None,
    };
    let before = match completions.find_keyed(key) {
        Ok(before) => before,
        Err(e) => return not_called(e),
    };
    if let Some(request) = before {
        // Every token a request samples is journaled, its last one included: none means
        // it never generated anything.
        match completions.runtime().request_summary(request) {
            Ok(Some(summary)) if summary.finished && summary.generated == 0 => {
                return Submission::Unstarted(request)
            }
            Ok(_) => {}
            Err(e) => return not_called(e.into()),
        }
    }
    let result = completions.submit_keyed(key, prompt, params).await;
    let after = match &result {
        Ok(generation) => Ok(Some(generation.id)),
        Err(_) => completions.find_keyed(key),
    };
    let requests = after
        .ok()
        .map(|after| u32::from(before.is_some()) + u32::from(after.is_some() && after != before));
    Submission::Called { result, requests }
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
