//! The batch app in-process on a real runtime (stories260K), driven through the host's
//! router:
//! - a fault-free job equals the same prompts completed directly;
//! - a job survives its actor being killed (mid-job, and while it submits), an operator
//!   restart while it submits, its handler panicking (`app.handle:batch`), its own
//!   background task panicking (`batch.report`), and a restart of the whole runtime on
//!   the same state directory (mid-job, and while it submits) — each time with the same
//!   texts, and no item submitted twice;
//! - a quota below the app's concurrency makes items wait, not fail;
//! - bad input is refused with clear errors, and the app keeps working.
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
use llmos_app::{AppConfig, AppHost, AppRegistry, Completions, Quotas, SamplingParams};
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
    _host: AppHost,
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
        _host: host,
        resumed,
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

/// What each prompt completes to when generated directly, outside the app.
async fn direct(runtime: &Runtime, prompts: &[&str]) -> Vec<String> {
    let completions = Completions::new("direct", runtime.clone(), Quotas::default());
    let params = SamplingParams {
        max_tokens: MAX_TOKENS,
        temperature: 0.0,
        seed: 0,
        ..SamplingParams::default()
    };
    let mut texts = Vec::new();
    for prompt in prompts {
        let done = completions
            .complete(prompt, params.clone())
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
    assert!(expected.iter().any(|t| !t.is_empty()), "{expected:?}");

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
    let before = {
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
        before
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

/// Submissions on their way at the shutdown either return (the app's stop hook records
/// their ids) or are refused by the stopping runtime (their items stay pending and are
/// submitted by the next process).
///
/// Not checked here: a refused submission may already have journaled its request (the
/// runtime writes `Begin` before starting the task, and does not end the request when
/// the start fails), so the next process resumes it with no one reading it.
#[tokio::test(flavor = "multi_thread")]
async fn a_process_restart_while_submitting_redoes_nothing() {
    restart_mid_job(true).await;
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
    let cases: Vec<(&str, String, StatusCode, &str)> = vec![
        (
            "malformed JSON",
            "{\"prompts\": [".into(),
            StatusCode::BAD_REQUEST,
            "JSON",
        ),
        (
            "no prompts",
            "{}".into(),
            StatusCode::BAD_REQUEST,
            "prompts",
        ),
        (
            "empty list",
            r#"{"prompts": []}"#.into(),
            StatusCode::BAD_REQUEST,
            "prompts",
        ),
        (
            "non-string prompt",
            r#"{"prompts": ["a", 7]}"#.into(),
            StatusCode::BAD_REQUEST,
            "prompts[1]",
        ),
        (
            "empty prompt",
            r#"{"prompts": [""]}"#.into(),
            StatusCode::BAD_REQUEST,
            "prompts[0]",
        ),
        (
            "too many prompts",
            too_many,
            StatusCode::BAD_REQUEST,
            "1000",
        ),
        (
            "unknown field",
            r#"{"prompts": ["a"], "n": 2}"#.into(),
            StatusCode::BAD_REQUEST,
            "`n`",
        ),
        (
            "bad temperature",
            r#"{"prompts": ["a"], "temperature": -1}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "temperature",
        ),
        (
            "zero max_tokens",
            r#"{"prompts": ["a"], "max_tokens": 0}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "max_tokens",
        ),
    ];
    for (what, body, status, needle) in cases {
        let (got, error) = send(router, Method::POST, "/apps/batch/jobs", Some(&body)).await;
        assert_eq!(got, status, "{what}: {error}");
        let message = error["error"]["message"]
            .as_str()
            .expect("an error message");
        assert!(message.contains(needle), "{what}: {message}");
        assert!(error["error"]["code"].is_string(), "{what}: {error}");
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
