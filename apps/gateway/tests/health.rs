//! `GET /health` tells the truth: a real runtime on stories260K behind the real router,
//! driven in-process, answers 200 only while the tree, every device and the journal's
//! appends are well — and 503 with the reason while a device is lost, the journal fails
//! its writes or the tree has escalated to the top. Alone in its test binary because
//! fault points are process-wide; the cases run one at a time.

use std::path::PathBuf;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use llmos_device::DeviceId;
use llmos_gateway::GatewayConfig;
use llmos_inference::{Runtime, RuntimeConfig};
use llmos_kernel::KernelEvent;
use serde_json::{json, Value};
use tower::ServiceExt;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A guard for waits that should never take this long (not a synchronisation).
const GUARD: Duration = Duration::from_secs(60);

fn stories260k() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/models/stories260K/stories260K-f32.gguf"
    ))
}

/// A runtime on stories260K in `dir` on `devices`, and the gateway's router over it.
async fn boot(dir: &std::path::Path, devices: &[DeviceId]) -> (Runtime, Router) {
    let model = stories260k();
    assert!(
        model.exists(),
        "the test model is missing: {}",
        model.display()
    );
    llmos_device::init_cpu_threads(2);
    let mut config = RuntimeConfig::new(model, dir);
    config.devices = devices.to_vec();
    config.kv_budget_bytes = 8 << 20;
    let runtime = Runtime::boot(config).await.expect("boot");
    let router = llmos_gateway::router(runtime.clone(), GatewayConfig::default()).expect("router");
    (runtime, router)
}

/// One request through the router: status and body bytes.
async fn send(
    router: &Router,
    method: Method,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, Vec<u8>) {
    let mut request = Request::builder().method(method).uri(uri);
    let body = match body {
        Some(value) => {
            request = request.header("content-type", "application/json");
            Body::from(value.to_string())
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
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    (status, bytes.to_vec())
}

async fn health(router: &Router) -> (StatusCode, Value) {
    let (status, body) = send(router, Method::GET, "/health", None).await;
    let body: Value = serde_json::from_slice(&body).expect("health is JSON");
    (status, body)
}

async fn metrics(router: &Router) -> String {
    let (status, body) = send(router, Method::GET, "/metrics", None).await;
    assert_eq!(status, StatusCode::OK);
    String::from_utf8(body).expect("metrics are text")
}

/// A short greedy completion: status and JSON body.
async fn complete(router: &Router) -> (StatusCode, Value) {
    let request = json!({"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0});
    let (status, body) = send(router, Method::POST, "/v1/completions", Some(request)).await;
    let body: Value = serde_json::from_slice(&body).expect("completion answers are JSON");
    (status, body)
}

fn reasons(body: &Value) -> Vec<String> {
    body["reasons"]
        .as_array()
        .expect("reasons is a list")
        .iter()
        .map(|r| r.as_str().expect("a reason is a string").to_string())
        .collect()
}

/// The value of one sample line (`name{labels} value`) of the exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_runtime_answers_200_ok() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (runtime, router) = boot(dir.path(), &[DeviceId::cpu(0)]).await;

    let (status, body) = health(&router).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ok");
    assert_eq!(reasons(&body), Vec::<String>::new());
    assert_eq!(body["journal"]["state"], "open");
    assert_eq!(body["journal"]["consecutive_failures"], 0);
    assert_eq!(body["journal"]["last_error"], Value::Null);

    let (status, answer) = complete(&router).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, body) = health(&router).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let text = metrics(&router).await;
    assert_eq!(
        sample(&text, "llmos_journal_append_failures_total"),
        Some(0.0)
    );
    assert_eq!(sample(&text, "llmos_journal_failing"), Some(0.0));
    runtime.shutdown("test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_device_answers_503_naming_it_while_the_other_serves() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let devices = llmos_device::parse_device_list("cpu:0,cpu:1").unwrap();
    let (runtime, router) = boot(dir.path(), &devices).await;
    let (status, body) = health(&router).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // The device fails its health probe (what the console's `devices` command runs); the
    // loss is sticky, so the fault can go at once.
    llmos_kernel::faults::configure("device.lost:cpu:1", "return").unwrap();
    let probe = runtime.services().devices[1].device.probe();
    llmos_kernel::faults::clear("device.lost:cpu:1");
    assert!(!probe.healthy, "{probe:?}");
    assert!(runtime.services().devices[0].device.is_healthy());

    let (status, body) = health(&router).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "unhealthy");
    let why = reasons(&body);
    assert!(why.iter().any(|r| r.contains("cpu:1")), "{why:?}");
    assert!(!why.iter().any(|r| r.contains("cpu:0")), "{why:?}");
    assert_eq!(
        body["devices"],
        json!([{"id": "cpu:0", "healthy": true}, {"id": "cpu:1", "healthy": false}])
    );

    // Requests are still served, by cpu:0 — two at once, so placement is not idle-only.
    let (first, second) = tokio::join!(complete(&router), complete(&router));
    for (status, answer) in [first, second] {
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert!(
            !answer["choices"][0]["text"]
                .as_str()
                .unwrap_or("")
                .is_empty(),
            "{answer}"
        );
    }
    let (status, _) = health(&router).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a lost device stays lost"
    );
    let text = metrics(&router).await;
    assert_eq!(
        sample(&text, "llmos_device_healthy{device=\"cpu:0\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "llmos_device_healthy{device=\"cpu:1\"}"),
        Some(0.0)
    );
    runtime.shutdown("test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_journal_answers_503_until_an_append_succeeds() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (runtime, router) = boot(dir.path(), &[DeviceId::cpu(0)]).await;
    let attempts = u64::from(runtime.services().config.journal_attempts);

    // Every append fails: the request's Begin is refused, so the request is.
    llmos_kernel::faults::configure("journal.append", "return").unwrap();
    let (status, answer) = complete(&router).await;
    llmos_kernel::faults::clear("journal.append");
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("journal.append"),
        "{answer}"
    );
    let (status, body) = health(&router).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let why = reasons(&body);
    assert!(
        why.iter()
            .any(|r| r.starts_with("journal failing: ") && r.contains("journal.append")),
        "{why:?}"
    );
    assert_eq!(body["journal"]["state"], "failing");
    assert_eq!(body["journal"]["consecutive_failures"], 1);
    assert!(body["journal"]["last_error"]
        .as_str()
        .unwrap()
        .contains("journal.append"));
    let text = metrics(&router).await;
    assert_eq!(
        sample(&text, "llmos_journal_append_failures_total"),
        Some(1.0)
    );
    assert_eq!(sample(&text, "llmos_journal_failing"), Some(1.0));

    // The Begin succeeds, then every token append fails (retried): the request fails with
    // an error response and the journal is failing again, once per attempt.
    llmos_kernel::faults::configure("journal.append", "1*off->return").unwrap();
    let (status, answer) = complete(&router).await;
    llmos_kernel::faults::clear("journal.append");
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("journal"),
        "{answer}"
    );
    let (status, body) = health(&router).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["journal"]["state"], "failing");
    assert_eq!(body["journal"]["consecutive_failures"], attempts);
    assert_eq!(body["journal"]["failures_total"], 1 + attempts);

    // The fault is gone: the next request succeeds, and with its first append so does
    // health.
    let (status, answer) = complete(&router).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, body) = health(&router).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["journal"]["state"], "open");
    assert_eq!(body["journal"]["consecutive_failures"], 0);
    assert!(
        body["journal"]["last_error"]
            .as_str()
            .unwrap()
            .contains("journal.append"),
        "the last error stays for diagnosis: {body}"
    );
    let text = metrics(&router).await;
    assert_eq!(
        sample(&text, "llmos_journal_append_failures_total"),
        Some((1 + attempts) as f64)
    );
    assert_eq!(sample(&text, "llmos_journal_failing"), Some(0.0));
    runtime.shutdown("test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_recovers_to_200_and_an_escalation_answers_503() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (runtime, router) = boot(dir.path(), &[DeviceId::cpu(0)]).await;
    let kernel = runtime.kernel().clone();
    let mut events = kernel.subscribe();

    // A permanent child crashes and is restarted: the tree is whole again.
    kernel.kill("llmos/models").unwrap();
    events
        .wait_for(GUARD, |e| {
            matches!(e, KernelEvent::Started { path, restarts } if path.as_str() == "llmos/models" && *restarts >= 1)
        })
        .await
        .expect("models restarted");
    let (status, body) = health(&router).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let text = metrics(&router).await;
    assert_eq!(
        sample(&text, "llmos_actor_restarts_total{actor=\"llmos/models\"}"),
        Some(1.0)
    );

    // It crashes again and can no longer start: the root's restart intensity runs out and
    // the failure escalates to the top.
    llmos_kernel::faults::configure("kernel.start:llmos/models", "return").unwrap();
    kernel.kill("llmos/models").unwrap();
    let escalated = events
        .wait_for(GUARD, |e| matches!(e, KernelEvent::RootFailed { .. }))
        .await;
    llmos_kernel::faults::clear("kernel.start:llmos/models");
    escalated.expect("the root failed");
    let (status, body) = health(&router).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let why = reasons(&body);
    assert!(why.iter().any(|r| r == "llmos: failed"), "{why:?}");
    assert!(why.iter().any(|r| r == "llmos/models: failed"), "{why:?}");
    let (status, answer) = complete(&router).await;
    assert!(status.is_server_error(), "{status}: {answer}");
    runtime.shutdown("test").await;
}
