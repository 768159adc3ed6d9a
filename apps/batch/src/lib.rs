//! The batch app: works through a queue of prompts and resumes after a crash without
//! redoing finished items. An example of an app on the LLMasOS app SDK ([`llmos_app`]).
//!
//! # HTTP API (under `/apps/batch/`)
//!
//! - `POST /jobs` with `{"prompts": [..], "max_tokens": 64, "temperature": 0, "seed": 0,
//!   "stop": [..]}` (only `prompts` is required: 1 to 1000 non-empty strings) → 202
//!   `{"id": "job-N", "total": n}`. A body that is not JSON or not an object, an unknown
//!   field or no `prompts` is 400; a value of the wrong kind or out of range is 422 with
//!   the field as the error's `param` (`prompts`, `prompts[3]`, `temperature`, …). The
//!   message names the field.
//! - `GET /jobs/job-N` → `{"id", "state": "running"|"done", "done", "failed", "total",
//!   "items": [{"index", "prompt", "state", "request", "text", "finish_reason", "error",
//!   "submissions"}]}`; 404 for an unknown job. `?wait_done=K` waits until at least K
//!   items are done or failed (or the job is finished) and none is half-way through a
//!   submission, then answers the same body: how clients follow progress without
//!   polling in a loop. A wait survives restarts of the app (the route asks again).
//! - `GET /jobs` → `{"jobs": [{"id", "state", "done", "failed", "total"}]}`.
//!
//! # How it survives crashes
//!
//! Everything that must outlive the actor is in two places the SDK makes durable: the
//! app's checkpoint store (one checkpoint per job, `job-N`, plus the id counter) and the
//! runtime's journal (every request, with the key it was submitted under, and every
//! token). Each item is submitted with
//! [`Completions::submit_keyed`](llmos_app::Completions::submit_keyed) under the key
//! `job-N-item-I`, journaled atomically with the request: if a crash, of the app or of
//! the whole process, cuts a submission short, the item is submitted again and the key
//! finds the request, which is re-attached instead of generated again. Once submitted,
//! the item is checkpointed as `running` with its request id, and later instances
//! re-attach by id ([`Completions::attach`](llmos_app::Completions::attach)): a finished
//! request replays from the journal, an unfinished one (resumed by the runtime before
//! apps start) goes on where it was. Items `done` or `failed` are never touched again.
//! Each item counts the requests created for it, from what the journal shows under its
//! key (`submissions`); 1 for every item after any number of crashes is the proof that
//! nothing was redone. See [`worker`] for the exact order of writes.
//!
//! # Configuration
//!
//! ```toml
//! [apps.batch]
//! enabled = true
//! max_concurrent_requests = 4   # the app's quota (default 4)
//!
//! [apps.batch.settings]
//! concurrency = 2               # items generating at once (1..=64, default 2)
//! ```
//! When the quota (or the runtime) has no room, e.g. with `concurrency` above the quota,
//! items wait for a running one to finish; they do not fail. See [`worker`], "Waiting for
//! room".
//!
//! # Fault points
//!
//! Besides the SDK's `app.handle:batch` and `app.checkpoint:batch`, the app evaluates
//! [`REPORT_FAULT_POINT`] in each item's reader task (a `panic` there crashes the
//! instance the way a bug in its own background work would).

pub mod job;
mod routes;
pub mod worker;

use llmos_app::axum::Router;
use llmos_app::{App, AppApi, AppContext, AppError, AppManifest, Quotas};
use serde_json::Value;

pub use job::{
    ItemState, ItemView, JobCreated, JobParams, JobState, JobSummary, JobView, NewJob, MAX_PROMPTS,
};
pub use worker::{BatchMsg, BatchState};

/// The name the binary registers the app under (its routes are `/apps/batch/...`).
pub const BATCH_APP: &str = "batch";

/// Items generating at once when the settings do not say.
pub const DEFAULT_CONCURRENCY: usize = 2;

/// The most items one instance runs at once.
pub const MAX_CONCURRENCY: usize = 64;

/// Evaluated in every item's reader task after its generation ended, before it reports
/// (`panic`: the task panics and the instance crashes; `return`: the task fails).
pub const REPORT_FAULT_POINT: &str = "batch.report";

/// The batch app. Build it with [`BatchApp::from_settings`]; the binary registers it with
/// `registry.register(BATCH_APP, false, BatchApp::from_settings)`. One value per hosted
/// app: every instance of the app shares it.
#[derive(Debug)]
pub struct BatchApp {
    concurrency: usize,
}

impl BatchApp {
    /// The app from its `[apps.batch.settings]` table (`null` when absent: the defaults).
    /// Accepts `concurrency` (1..=64); anything else is an `AppError::Config`.
    pub fn from_settings(settings: &Value) -> Result<BatchApp, AppError> {
        llmos_kernel::faults::declare(
            REPORT_FAULT_POINT,
            "a batch item's reader task fails after its generation (panic: as a bug would)",
        );
        let config = |message: String| Err(AppError::Config(message));
        let fields = match settings {
            Value::Null => return Ok(Self::default()),
            Value::Object(fields) => fields,
            _ => return config("settings must be a table (with `concurrency`)".into()),
        };
        if let Some(unknown) = fields.keys().find(|k| *k != "concurrency") {
            return config(format!(
                "unknown setting `{}` (the batch app has: concurrency)",
                job::clip(unknown)
            ));
        }
        let concurrency = match fields.get("concurrency") {
            None => DEFAULT_CONCURRENCY,
            Some(value) => match value.as_u64().and_then(|n| usize::try_from(n).ok()) {
                Some(n) if (1..=MAX_CONCURRENCY).contains(&n) => n,
                _ => {
                    return config(format!(
                        "concurrency must be an integer in 1..={MAX_CONCURRENCY}, not {value}"
                    ))
                }
            },
        };
        Ok(BatchApp { concurrency })
    }

    /// Items this app keeps generating at once.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }
}

impl Default for BatchApp {
    fn default() -> Self {
        Self {
            concurrency: DEFAULT_CONCURRENCY,
        }
    }
}

impl App for BatchApp {
    type Msg = BatchMsg;
    type State = BatchState;

    fn manifest(&self) -> AppManifest {
        AppManifest::new(
            "Batch jobs: works through a queue of prompts and resumes after a crash without redoing finished items",
        )
        .quotas(Quotas {
            max_concurrent_requests: Some(4),
            max_kv_blocks: None,
        })
    }

    /// Loads the jobs, re-attaches running items, asks for a dispatch of pending ones.
    async fn start(&self, ctx: &AppContext<BatchMsg>) -> Result<BatchState, AppError> {
        BatchState::start(self.concurrency, ctx)
    }

    async fn handle(
        &self,
        ctx: &AppContext<BatchMsg>,
        message: BatchMsg,
        state: &mut BatchState,
    ) -> Result<(), AppError> {
        state.handle(ctx, message)
    }

    fn routes(&self, api: AppApi<BatchMsg>) -> Router {
        routes::router(api)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn settings_default_and_check_concurrency() {
        assert_eq!(
            BatchApp::from_settings(&Value::Null).unwrap().concurrency(),
            2
        );
        assert_eq!(
            BatchApp::from_settings(&json!({})).unwrap().concurrency(),
            2
        );
        assert_eq!(
            BatchApp::from_settings(&json!({"concurrency": 64}))
                .unwrap()
                .concurrency(),
            64
        );
        for bad in [
            json!({"concurrency": 0}),
            json!({"concurrency": 65}),
            json!({"concurrency": -1}),
            json!({"concurrency": 1.5}),
            json!({"concurrency": "2"}),
            json!({"concurency": 2}),
            json!([1]),
            json!(3),
        ] {
            match BatchApp::from_settings(&bad) {
                Err(AppError::Config(message)) => assert!(!message.is_empty()),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_manifest_sets_a_request_quota() {
        let manifest = BatchApp::default().manifest();
        assert_eq!(manifest.quotas.max_concurrent_requests, Some(4));
        assert!(!manifest.mount_root);
    }
}
