//! The batch app in-process on a real runtime (stories260K), driven through the host's
//! router:
//! - a fault-free job equals the same prompts completed directly;
//! - a job survives its actor being killed (mid-job, and while it submits), an operator
//!   restart while it submits, its handler panicking (`app.handle:batch`), its own
//!   background task panicking (`batch.report`), and a restart of the whole runtime on
//!   the same state directory (mid-job, and while it submits) — each time with the same
//!   texts, and one request per item: the app's own count says so, and so do the
//!   runtime's journal (one request under each item's key) and the SDK's count of the
//!   requests the app created;
//! - a key that names a request which never generated a token is replaced, not
//!   re-attached;
//! - a quota below the app's concurrency makes items wait, not fail;
//! - bad input is refused with clear errors (400, or 422 naming the field as `param`),
//!   and the app keeps working.
//!
//! Progress is followed with the app's long poll and restarts with kernel events, never
//! with sleeps. Fault points are process-wide, so every case holds `SERIAL` (they share
//! the app name `batch` too) and clears what it configured.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use llmos_app::axum::body::Body;
use llmos_app::axum::http::{Method, Request, StatusCode};
use llmos_app::axum::Router;
use llmos_app::{AppConfig, AppHost, AppRegistry, Completions, QuotaUsage, Quotas, SamplingParams};
use llmos_app_batch::{BatchApp, BATCH_APP, REPORT_FAULT_POINT};
use llmos_device::DeviceId;
use llmos_inference::{Runtime, RuntimeConfig};
use llmos_kernel::KernelEvent;
use serde_json::{json, Value};
use tower::ServiceExt;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A guard for waits that should never take this long (not a synchronisation).
const GUARD: Duration = Duration::from_secs(120);

/// The batch app's actor in the tree.
const APP_PATH: &str = "llmos/apps/batch/main";

const PROMPTS: [&str; 6] = [
    "Once upon a time",
    "The cat",
    "Tom and Sue went",
    "Lily had a",
    "One day, a little",
    "The sun was",
];

const MAX_TOKENS: usize = 24;

fn stories260k() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/models/stories260K/stories260K-f32.gguf"
    ))
}

/// Clears the fault points it names when dropped, also when a test fails.
struct Faults(Vec<String>);

impl Faults {
    fn set(&mut self, point: &str, actions: &str) {
        llmos_kernel::faults::configure(point, actions).expect("fault spec");
        self.0.push(point.to_string());
    }
}

impl Drop for Faults {
    fn drop(&mut self) {
        for point in &self.0 {
            llmos_kernel::faults::clear(point);
        }
    }
}

/// A runtime, the app host with only the batch app, and its router.
struct System {
    runtime: Runtime,
    router: Router,
    host: AppHost,
    /// Requests the runtime resumed from the journal at boot.
    resumed: Vec<u64>,
}

/// Boots as `llmos serve` does: runtime, resume, then the apps.
async fn boot(dir: &Path, config: AppConfig) -> System {
    boot_on(dir, DeviceId::cpu(0), config).await
}

/// [`boot`] on one logical device.
async fn boot_on(dir: &Path, device: DeviceId, config: AppConfig) -> System {
    let model = stories260k();
    assert!(
        model.exists(),
        "the test model is missing: {}",
        model.display()
    );
    llmos_device::init_cpu_threads(2);
    let mut runtime_config = RuntimeConfig::new(model, dir);
    runtime_config.devices = vec![device];
    let runtime = Runtime::boot(runtime_config).await.expect("boot");
    let resumed = runtime.resume_unfinished().await.expect("resume");
    let resumed = resumed.iter().map(|stream| stream.id).collect();
    let mut registry = AppRegistry::new();
    registry.register(BATCH_APP, false, BatchApp::from_settings);
    let configs = BTreeMap::from([(
        BATCH_APP.to_string(),
        AppConfig {
            enabled: Some(true),
            ..config
        },
    )]);
    let host = AppHost::new(&runtime, &registry, &configs, None).expect("host");
    host.start().await.expect("apps start");
    let router = host.router().expect("router");
    System {
        runtime,
        router,
        host,
        resumed,
    }
}

impl System {
    /// What the batch app's requests hold and have done in this process (the SDK's count).
    fn usage(&self) -> QuotaUsage {
        let status = self.host.status();
        let batch = status.iter().find(|s| s.name == BATCH_APP).expect("batch");
        batch.usage
    }
}

/// One request through the router: status and JSON body.
async fn send(
    router: &Router,
    method: Method,
    uri: &str,
    body: Option<&str>,
) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(uri);
    let body = match body {
        Some(text) => {
            request = request.header("content-type", "application/json");
            Body::from(text.to_string())
        }
        None => Body::empty(),
    };
    let response = tokio::time::timeout(
        GUARD,
        router.clone().oneshot(request.body(body).expect("request")),
    )
    .await
    .expect("answered within the hang guard")
    .expect("the router is infallible");
    let status = response.status();
    let bytes = llmos_app::axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
    (status, body)
}

/// Submits a job of `prompts`; returns its id.
async fn submit(router: &Router, prompts: &[&str]) -> String {
    let body = json!({"prompts": prompts, "max_tokens": MAX_TOKENS, "temperature": 0, "seed": 0});
    let (status, created) = send(
        router,
        Method::POST,
        "/apps/batch/jobs",
        Some(&body.to_string()),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    assert_eq!(created["total"], prompts.len());
    created["id"].as_str().expect("an id").to_string()
}

/// The job once at least `done` items are settled (the long poll).
async fn wait_done(router: &Router, id: &str, done: usize) -> Value {
    let uri = format!("/apps/batch/jobs/{id}?wait_done={done}");
    let (status, job) = send(router, Method::GET, &uri, None).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    job
}

/// The sampling of every job these tests submit.
fn params() -> SamplingParams {
    SamplingParams {
        max_tokens: MAX_TOKENS,
        temperature: 0.0,
        seed: 0,
        ..SamplingParams::default()
    }
}

/// What each prompt completes to when generated directly, outside the app.
async fn direct(runtime: &Runtime, prompts: &[&str]) -> Vec<String> {
    let completions = Completions::new("direct", runtime.clone(), Quotas::default());
    let mut texts = Vec::new();
    for prompt in prompts {
        let done = completions
            .complete(prompt, params())
            .await
            .expect("direct completion");
        texts.push(done.text);
    }
    texts
}

fn items(job: &Value) -> &Vec<Value> {
    job["items"].as_array().expect("items")
}

/// A finished job: every item done once, texts as `expected`, distinct request ids.
fn assert_finished(job: &Value, expected: &[String]) {
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["done"], expected.len(), "{job}");
    assert_eq!(job["failed"], 0, "{job}");
    assert_eq!(job["total"], expected.len());
    let mut requests = Vec::new();
    for (i, item) in items(job).iter().enumerate() {
        assert_eq!(item["index"], i);
        assert_eq!(item["prompt"], PROMPTS[i]);
        assert_eq!(item["state"], "done", "{item}");
        assert_eq!(item["text"], expected[i].as_str(), "item {i}");
        assert!(
            matches!(item["finish_reason"].as_str(), Some("stop" | "length")),
            "{item}"
        );
        assert_eq!(item["error"], Value::Null);
        assert_eq!(
            item["submissions"], 1,
            "item {i} was submitted again: {item}"
        );
        requests.push(item["request"].as_u64().expect("a request id"));
    }
    requests.sort_unstable();
    requests.dedup();
    assert_eq!(requests.len(), expected.len(), "one request per item");
}

/// The runtime's journal holds at most one request under each item's key, and it is the
/// item's (at most: finished requests leave the journal at its next compaction). Not the
/// app's word for it: the requests are found by the tag the SDK journaled with them.
fn assert_one_request_per_key(runtime: &Runtime, job: &Value) {
    let completions = Completions::new(BATCH_APP, runtime.clone(), Quotas::default());
    let name = job["id"].as_str().expect("a job id");
    for item in items(job) {
        let key = match item["rekeyed"].as_u64() {
            None => format!("{name}-item-{}", item["index"]),
            Some(k) => format!("{name}-item-{}-{k}", item["index"]),
        };
        let Some(found) = completions.find_keyed(&key).expect("the journal") else {
            continue;
        };
        assert_eq!(Some(found), item["request"].as_u64(), "{key}: {item}");
        let journal = runtime.services().journal().expect("the journal");
        let journal = journal.lock().unwrap();
        let tag = |id: &u64| {
            let params: Value = serde_json::from_slice(&journal.requests()[id].params).unwrap();
            params["tag"].clone()
        };
        let tagged = tag(&found);
        assert!(tagged.is_string(), "{key}: {tagged}");
        let under: Vec<u64> = journal
            .requests()
            .keys()
            .filter(|id| tag(id) == tagged)
            .copied()
            .collect();
        assert_eq!(under, [found], "{key}: more than one request under the key");
    }
}

/// Items of `before` that were done keep their request and text in `after`.
fn assert_kept(before: &Value, after: &Value) {
    let mut kept = 0;
    for (old, new) in items(before).iter().zip(items(after)) {
        if old["state"] == "done" {
            assert_eq!(old["request"], new["request"], "{old} vs {new}");
            assert_eq!(old["text"], new["text"]);
            kept += 1;
        }
        if old["state"] == "running" {
            // Re-attached, not resubmitted.
            assert_eq!(old["request"], new["request"], "{old} vs {new}");
        }
    }
    assert!(kept >= 2, "the long poll answered with 2 done: {before}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fault_free_job_equals_direct_completions() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let system = boot(dir.path(), AppConfig::default()).await;
    let id = submit(&system.router, &PROMPTS).await;
    assert_eq!(id, "job-1");
    let job = wait_done(&system.router, &id, PROMPTS.len()).await;
    let expected = direct(&system.runtime, &PROMPTS).await;
    assert_finished(&job, &expected);
    assert_one_request_per_key(&system.runtime, &job);
    assert!(expected.iter().any(|t| !t.is_empty()), "{expected:?}");
    let usage = system.usage();
    assert_eq!((usage.submitted, usage.requests), (6, 0), "{usage:?}");

    // Without `wait_done` the answer is immediate, and the list shows the job.
    let (status, again) = send(&system.router, Method::GET, "/apps/batch/jobs/job-1", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again, job);
    let (status, list) = send(&system.router, Method::GET, "/apps/batch/jobs", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        list,
        json!({"jobs": [{"id": "job-1", "state": "done", "done": 6, "failed": 0, "total": 6}]})
    );
    system.runtime.shutdown("test").await;
}

/// How a crash is brought about in the middle of a job.
#[derive(Clone, Copy, Debug)]
enum Crash {
    /// The kernel kills the actor right after the job is accepted, while it is submitting
    /// the first items.
    KillWhileSubmitting,
    /// The operator restarts the app right after the job is accepted: an orderly stop
    /// (the app's stop hook runs) while it is submitting the first items.
    RestartWhileSubmitting,
    /// The kernel kills the actor.
    Kill,
    /// The next message the actor handles panics (`app.handle:batch`).
    HandlerPanic,
    /// The next reader task to finish panics (`batch.report`).
    ReaderPanic,
}

/// Runs a job, crashes the app as `crash` says once 2 items are done, and checks the job
/// completes with the fault-free texts and nothing submitted twice.
async fn crash_mid_job(crash: Crash) {
    let _serial = SERIAL.lock().await;
    let mut faults = Faults(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let system = boot(dir.path(), AppConfig::default()).await;
    // Slow tokens down so the crash lands while items are generating.
    faults.set("task.step", "sleep(10)");
    let mut events = system.runtime.kernel().subscribe();
    let id = submit(&system.router, &PROMPTS).await;
    let before = match crash {
        Crash::KillWhileSubmitting | Crash::RestartWhileSubmitting => None,
        _ => Some(wait_done(&system.router, &id, 2).await),
    };
    if let Some(before) = &before {
        assert!(
            before["done"].as_u64().unwrap() < PROMPTS.len() as u64,
            "the crash must land mid-job: {before}"
        );
    }

    match crash {
        Crash::KillWhileSubmitting | Crash::Kill => {
            system.runtime.kernel().kill(APP_PATH).expect("kill")
        }
        Crash::RestartWhileSubmitting => system
            .runtime
            .kernel()
            .restart_child(APP_PATH)
            .await
            .expect("restart"),
        Crash::HandlerPanic => faults.set(&llmos_app::handle_fault_point(BATCH_APP), "1*panic"),
        Crash::ReaderPanic => faults.set(REPORT_FAULT_POINT, "1*panic"),
    }
    let restarted = events
        .wait_for(GUARD, |e| {
            matches!(e, KernelEvent::Started { path, restarts } if path.as_str() == APP_PATH && *restarts >= 1)
        })
        .await;
    assert!(restarted.is_ok(), "{crash:?}: the app was not restarted");

    let after = wait_done(&system.router, &id, PROMPTS.len()).await;
    drop(faults);
    let expected = direct(&system.runtime, &PROMPTS).await;
    assert_finished(&after, &expected);
    assert_one_request_per_key(&system.runtime, &after);
    // The SDK counts the requests the app created (not those a cancelled call created:
    // its successor re-attached to them): never more than one per item.
    let usage = system.usage();
    assert!(
        usage.submitted <= PROMPTS.len() as u64,
        "{crash:?}: {usage:?}"
    );
    if let Some(before) = &before {
        assert_kept(before, &after);
    }
    system.runtime.shutdown("test").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_actor_while_it_submits_redoes_nothing() {
    crash_mid_job(Crash::KillWhileSubmitting).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restarting_the_app_while_it_submits_redoes_nothing() {
    crash_mid_job(Crash::RestartWhileSubmitting).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_actor_mid_job_redoes_nothing() {
    crash_mid_job(Crash::Kill).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_handler_mid_job_redoes_nothing() {
    crash_mid_job(Crash::HandlerPanic).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_reader_task_mid_job_redoes_nothing() {
    crash_mid_job(Crash::ReaderPanic).await;
}

/// Runs a job, shuts the runtime down (once 2 items are done, or right after the job is
/// accepted), boots a new runtime and host on the same state directory, and checks the
/// job completes with the fault-free texts and nothing submitted twice.
async fn restart_mid_job(at_once: bool) {
    let _serial = SERIAL.lock().await;
    let mut faults = Faults(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let (before, first_submitted) = {
        let system = boot(dir.path(), AppConfig::default()).await;
        faults.set("task.step", "sleep(10)");
        let id = submit(&system.router, &PROMPTS).await;
        let before = if at_once {
            None
        } else {
            let before = wait_done(&system.router, &id, 2).await;
            assert!(
                before["done"].as_u64().unwrap() < PROMPTS.len() as u64,
                "the restart must land mid-job: {before}"
            );
            Some(before)
        };
        system.runtime.shutdown("test").await;
        (before, system.usage().submitted)
    };
    drop(faults);

    // A new runtime and host on the same state directory, as after `llmos serve` restarts:
    // the same journal and checkpoints. On another logical device, because the old
    // runtime's KV pool file (`kv-cpu-0.pool`) is unmapped only some time after
    // `shutdown` returns, and a second mapping in one process is refused; the resumed
    // requests then recompute their KV from the journal, which is exact.
    let system = boot_on(dir.path(), DeviceId::cpu(1), AppConfig::default()).await;
    let after = wait_done(&system.router, "job-1", PROMPTS.len()).await;
    let expected = direct(&system.runtime, &PROMPTS).await;
    assert_finished(&after, &expected);
    assert_one_request_per_key(&system.runtime, &after);
    let submitted = first_submitted + system.usage().submitted;
    assert!(
        submitted <= PROMPTS.len() as u64,
        "{submitted} requests created"
    );
    // Every request the new runtime resumed is an item's: none was journaled by a
    // submission the shutdown cut short and then left generating for nobody.
    let requests: Vec<u64> = items(&after)
        .iter()
        .filter_map(|item| item["request"].as_u64())
        .collect();
    for resumed in &system.resumed {
        assert!(requests.contains(resumed), "request {resumed}: {after}");
    }
    if let Some(before) = &before {
        assert_kept(before, &after);
        // The runtime resumed exactly the requests of the items that were running, and
        // the app re-attached to them.
        let mut running: Vec<u64> = items(before)
            .iter()
            .filter(|item| item["state"] == "running")
            .filter_map(|item| item["request"].as_u64())
            .collect();
        running.sort_unstable();
        assert!(!running.is_empty(), "{before}");
        let mut resumed = system.resumed.clone();
        resumed.sort_unstable();
        assert_eq!(resumed, running, "{before}");
    }
    // The id counter survived too.
    assert_eq!(submit(&system.router, &PROMPTS[..1]).await, "job-2");
    system.runtime.shutdown("test").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_restart_mid_job_redoes_nothing() {
    restart_mid_job(false).await;
}

/// Submissions on their way at the shutdown are cut short with the app (it stops before
/// the runtime). Those that got as far as the journal are resumed by the next process,
/// whose app finds them by the items' keys and re-attaches; the others are submitted
/// afresh. Either way one request per item, each read by its item.
#[tokio::test(flavor = "multi_thread")]
async fn a_process_restart_while_submitting_redoes_nothing() {
    restart_mid_job(true).await;
}

/// A key that names a request which ended without generating a token is not re-attached
/// (that would only fail the item) but replaced: the item moves to a fresh key and is
/// generated once. After a shutdown that began half-way through a submission, such a
/// request is one the runtime journaled but could not start; here it is one whose task
/// crashed before its first token every time (`task.step=panic`), put under the key the
/// app will use for its first item.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_whose_request_never_generated_is_replaced() {
    let _serial = SERIAL.lock().await;
    let mut faults = Faults(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let system = boot(dir.path(), AppConfig::default()).await;
    let mut events = system.runtime.kernel().subscribe();
    let squatter = {
        faults.set("task.step", "panic");
        let completions = Completions::new(BATCH_APP, system.runtime.clone(), Quotas::default());
        let generation = completions
            .submit_keyed("job-1-item-0", PROMPTS[0], params())
            .await
            .expect("submitted");
        let id = generation.id;
        let end = tokio::time::timeout(GUARD, generation.collect())
            .await
            .expect("the request ends");
        assert!(end.is_err(), "{end:?}");
        id
    };
    drop(faults);
    // Its client hears of the failure before the end is journaled; the task stops after.
    let task = format!("/req-{squatter}");
    let ended = events
        .wait_for(
            GUARD,
            |e| matches!(e, KernelEvent::Exited { path, .. } if path.as_str().ends_with(&task)),
        )
        .await;
    assert!(ended.is_ok(), "request {squatter}'s task did not stop");
    let summary = system.runtime.request_summary(squatter).unwrap().unwrap();
    assert!(summary.finished && summary.generated == 0, "{summary:?}");

    let id = submit(&system.router, &PROMPTS).await;
    assert_eq!(id, "job-1");
    let job = wait_done(&system.router, &id, PROMPTS.len()).await;
    let expected = direct(&system.runtime, &PROMPTS).await;
    assert_finished(&job, &expected);
    assert_one_request_per_key(&system.runtime, &job);
    let first = &items(&job)[0];
    assert_eq!(first["rekeyed"], 1, "{first}");
    assert_ne!(first["request"], squatter, "{first}");
    assert!(items(&job)[1..]
        .iter()
        .all(|item| item.get("rekeyed").is_none()));
    system.runtime.shutdown("test").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quota_below_the_concurrency_makes_items_wait_not_fail() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let config = AppConfig {
        max_concurrent_requests: Some(1),
        settings: json!({"concurrency": 4}),
        ..AppConfig::default()
    };
    let system = boot(dir.path(), config).await;
    let id = submit(&system.router, &PROMPTS).await;
    let job = wait_done(&system.router, &id, PROMPTS.len()).await;
    let expected = direct(&system.runtime, &PROMPTS).await;
    assert_finished(&job, &expected);
    assert_one_request_per_key(&system.runtime, &job);
    // Items waited for room (a reader's report) instead of asking the quota in a loop.
    let usage = system.usage();
    assert_eq!((usage.submitted, usage.refused), (6, 0), "{usage:?}");
    system.runtime.shutdown("test").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_and_the_app_keeps_working() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let system = boot(dir.path(), AppConfig::default()).await;
    let router = &system.router;
    let too_many: Vec<String> = (0..1001).map(|i| format!("p{i}")).collect();
    let too_many = json!({ "prompts": too_many }).to_string();
    const BAD: StatusCode = StatusCode::BAD_REQUEST;
    const INVALID: StatusCode = StatusCode::UNPROCESSABLE_ENTITY;
    // (what, body, status, `param` (the field of a 422), a part of the message)
    let cases: Vec<(&str, String, StatusCode, Option<&str>, &str)> = vec![
        (
            "malformed JSON",
            "{\"prompts\": [".into(),
            BAD,
            None,
            "JSON",
        ),
        ("not an object", "[1]".into(), BAD, None, "JSON object"),
        ("no prompts", "{}".into(), BAD, None, "prompts"),
        (
            "unknown field",
            r#"{"prompts": ["a"], "n": 2}"#.into(),
            BAD,
            None,
            "`n`",
        ),
        (
            "prompts not a list",
            r#"{"prompts": "a"}"#.into(),
            INVALID,
            Some("prompts"),
            "prompts",
        ),
        (
            "empty list",
            r#"{"prompts": []}"#.into(),
            INVALID,
            Some("prompts"),
            "prompts",
        ),
        (
            "non-string prompt",
            r#"{"prompts": ["a", 7]}"#.into(),
            INVALID,
            Some("prompts[1]"),
            "prompts[1]",
        ),
        (
            "empty prompt",
            r#"{"prompts": [""]}"#.into(),
            INVALID,
            Some("prompts[0]"),
            "prompts[0]",
        ),
        (
            "too many prompts",
            too_many,
            INVALID,
            Some("prompts"),
            "1000",
        ),
        (
            "mistyped seed",
            r#"{"prompts": ["a"], "seed": "x"}"#.into(),
            INVALID,
            Some("seed"),
            "seed",
        ),
        (
            "bad temperature",
            r#"{"prompts": ["a"], "temperature": -1}"#.into(),
            INVALID,
            Some("temperature"),
            "temperature",
        ),
        (
            "zero max_tokens",
            r#"{"prompts": ["a"], "max_tokens": 0}"#.into(),
            INVALID,
            Some("max_tokens"),
            "max_tokens",
        ),
    ];
    for (what, body, status, param, needle) in cases {
        let (got, error) = send(router, Method::POST, "/apps/batch/jobs", Some(&body)).await;
        assert_eq!(got, status, "{what}: {error}");
        let message = error["error"]["message"]
            .as_str()
            .expect("an error message");
        assert!(message.contains(needle), "{what}: {message}");
        assert!(error["error"]["code"].is_string(), "{what}: {error}");
        assert_eq!(error["error"]["param"].as_str(), param, "{what}: {error}");
    }
    for uri in [
        "/apps/batch/jobs/job-1",
        "/apps/batch/jobs/whatever",
        "/apps/batch/jobs/job-1?wait_done=3",
    ] {
        let (status, error) = send(router, Method::GET, uri, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{uri}: {error}");
        assert_eq!(error["error"]["code"], "not_found");
    }
    let (status, error) = send(
        router,
        Method::GET,
        "/apps/batch/jobs/job-1?wait_done=x",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("wait_done"));

    // Nothing was created, and the app still works.
    let (_, list) = send(router, Method::GET, "/apps/batch/jobs", None).await;
    assert_eq!(list, json!({"jobs": []}));
    let id = submit(router, &PROMPTS[..2]).await;
    assert_eq!(id, "job-1");
    let job = wait_done(router, &id, 2).await;
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["done"], 2);
    system.runtime.shutdown("test").await;
}
