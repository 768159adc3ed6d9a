//! Exact resume under every fault point: a fault injected at several token positions, in
//! greedy and in seeded sampling, must leave the output equal to the fault-free output.
//! Alone in its test binary because fault points are process-wide; the cases run one at
//! a time.

mod common;

use common::*;
use llmos_device::DeviceId;
use llmos_inference::Runtime;
use llmos_kernel::KernelEvent;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const PROMPT: &str = "Once upon a time";
const TOKENS: usize = 40;

/// Where resumed KV should come from.
#[derive(Clone, Copy, Debug)]
enum KvSource {
    /// Still held by the engine (the task restarted).
    Kept,
    /// Restored from the block pool after validation (the engine restarted).
    Restored,
}

/// How to tell that the injected fault really happened.
enum Evidence {
    /// A kernel event about a failure of a path containing this text, and the KV on `cpu:0` came back this way (kept, restored) at least
    /// once when the fault was after the prompt.
    Failure(&'static str, KvSource),
    /// A missed heartbeat.
    Hang,
    /// Device `cpu:0` ends up lost.
    DeviceLost,
    /// The journal saw a failed write.
    JournalWriteFailed,
}

async fn run(
    spec: Option<&str>,
    temperature: f32,
    devices: &[DeviceId],
    evidence: Option<&Evidence>,
) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::boot(config(dir.path(), devices)).await.unwrap();
    let mut events = runtime.kernel().subscribe();
    if let Some(spec) = spec {
        llmos_kernel::faults::configure_spec(spec).unwrap();
    }
    let stream = runtime
        .submit(PROMPT, params(temperature, TOKENS))
        .await
        .unwrap();
    let out = collect(stream).await;
    if let Some((name, _)) = spec.and_then(|s| s.split_once('=')) {
        llmos_kernel::faults::clear(name);
    }
    let seen: Vec<KernelEvent> = std::iter::from_fn(|| events.try_next()).collect();
    match evidence {
        Some(Evidence::Failure(path, source)) => {
            assert!(
                seen.iter().any(|e| matches!(e, KernelEvent::Failed { path: p, .. } if p.as_str().contains(path))),
                "{spec:?}: no failure of {path} seen"
            );
            let (kept, restored, _) = runtime.services().devices[0].kv_stats.snapshot();
            let after_prompt = !spec.is_some_and(|s| s.contains("=0*"));
            match source {
                KvSource::Kept if after_prompt => assert!(kept > 0, "{spec:?}: KV not kept"),
                KvSource::Restored if after_prompt => {
                    assert!(restored > 0, "{spec:?}: KV not restored from the pool")
                }
                _ => {}
            }
        }
        Some(Evidence::Hang) => assert!(
            seen.iter()
                .any(|e| matches!(e, KernelEvent::HangDetected { .. })),
            "{spec:?}: no hang detected"
        ),
        Some(Evidence::DeviceLost) => assert!(
            !runtime.services().devices[0].device.is_healthy(),
            "{spec:?}: cpu:0 still healthy"
        ),
        Some(Evidence::JournalWriteFailed) => {
            let journal = runtime.services().journal().unwrap();
            let failed = journal.lock().unwrap().stats().failed_writes;
            assert!(failed > 0, "{spec:?}: no failed journal write");
        }
        None => {}
    }
    runtime.shutdown("test").await;
    out
}

async fn check_point(
    point: &str,
    action: &str,
    positions: &[usize],
    devices: &[DeviceId],
    evidence: Evidence,
) {
    let _serial = SERIAL.lock().await;
    for temperature in [0.0, 0.8] {
        let clean = run(None, temperature, devices, None).await;
        assert_eq!(clean.error, None);
        assert_eq!(clean.tokens.len(), TOKENS);
        for &k in positions {
            let spec = format!("{point}={k}*off->1*{action}->off");
            let faulty = run(Some(&spec), temperature, devices, Some(&evidence)).await;
            assert_eq!(faulty.error, None, "{spec} at temperature {temperature}");
            assert_eq!(
                faulty.tokens, clean.tokens,
                "{spec} at temperature {temperature}: tokens differ"
            );
            assert_eq!(
                faulty.text, clean.text,
                "{spec} at temperature {temperature}: text differs"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_task_resumes_exactly() {
    check_point(
        "task.step",
        "panic",
        &[0, 5, 17, 39],
        &[DeviceId::cpu(0)],
        Evidence::Failure("req-", KvSource::Kept),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_engine_resumes_exactly() {
    check_point(
        "engine.step",
        "panic",
        &[0, 1, 9, 30],
        &[DeviceId::cpu(0)],
        Evidence::Failure("engine", KvSource::Restored),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_engine_is_detected_by_heartbeat_and_resumes_exactly() {
    check_point(
        "engine.hang",
        "return",
        &[0, 7, 25],
        &[DeviceId::cpu(0)],
        Evidence::Hang,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_device_fails_over_to_the_other_and_resumes_exactly() {
    check_point(
        "device.lost:cpu:0",
        "return",
        &[0, 4, 21],
        &[DeviceId::cpu(0), DeviceId::cpu(1)],
        Evidence::DeviceLost,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_journal_write_is_retried_and_resumes_exactly() {
    // Evaluation 0 is the request's Begin (its failure is the caller's error, tested below).
    check_point(
        "journal.append",
        "return",
        &[1, 6, 23],
        &[DeviceId::cpu(0)],
        Evidence::JournalWriteFailed,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_that_keeps_failing_fails_the_request_clearly() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::boot(config(dir.path(), &[DeviceId::cpu(0)]))
        .await
        .unwrap();
    llmos_kernel::faults::configure("journal.append", "1*off->return").unwrap();
    let out = collect(runtime.submit(PROMPT, params(0.0, 10)).await.unwrap()).await;
    llmos_kernel::faults::clear("journal.append");
    let error = out.error.expect("the request fails");
    assert!(
        error.contains("journal") || error.contains("inject"),
        "{error}"
    );
    assert!(out.tokens.is_empty(), "no token is delivered un-journaled");
    runtime.shutdown("test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_always_crashes_fails_alone_with_a_clear_error() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::boot(config(dir.path(), &[DeviceId::cpu(0)]))
        .await
        .unwrap();
    let mut events = runtime.kernel().subscribe();
    llmos_kernel::faults::configure("task.step", "panic").unwrap();
    let out = collect(runtime.submit(PROMPT, params(0.0, 10)).await.unwrap()).await;
    llmos_kernel::faults::clear("task.step");
    let error = out.error.expect("the request fails");
    assert!(
        error.contains("crashed 8 times in a row without producing a token")
            && error.contains("task.step"),
        "{error}"
    );
    let seen: Vec<KernelEvent> = std::iter::from_fn(|| events.try_next()).collect();
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, KernelEvent::Escalated { .. })),
        "one bad request must not escalate"
    );
    // Others are served, and the failed request is over for good.
    let next = collect(runtime.submit(PROMPT, params(0.0, 20)).await.unwrap()).await;
    assert!(KNOWN_CONTINUATION.starts_with(next.text.trim_end()) || next.text.len() > 20);
    assert!(runtime.resume_unfinished().await.unwrap().is_empty());
    runtime.shutdown("test").await;
}

/// A request that crashes again and again but produces tokens in between is never given
/// up: 15 crashes, well past the 8 starts without progress that fail a request, and the
/// text is still the fault-free text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_progresses_between_crashes_is_never_given_up() {
    let _serial = SERIAL.lock().await;
    for temperature in [0.0, 0.8] {
        let clean = run(None, temperature, &[DeviceId::cpu(0)], None).await;
        let mut spec = String::from("task.step=");
        for _ in 0..15 {
            spec.push_str("2*off->1*panic->");
        }
        spec.push_str("off");
        let faulty = run(Some(&spec), temperature, &[DeviceId::cpu(0)], None).await;
        assert_eq!(faulty.error, None, "temperature {temperature}");
        assert_eq!(faulty.tokens, clean.tokens, "temperature {temperature}");
        assert_eq!(faulty.text, clean.text, "temperature {temperature}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_requests_supervisor_restarts_inflight_requests_exactly() {
    let _serial = SERIAL.lock().await;
    let clean = run(None, 0.8, &[DeviceId::cpu(0)], None).await;
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::boot(config(dir.path(), &[DeviceId::cpu(0)]))
        .await
        .unwrap();
    // Slow tokens down so the kill lands mid-generation.
    llmos_kernel::faults::configure("task.step", "sleep(5)").unwrap();
    let mut stream = runtime.submit(PROMPT, params(0.8, TOKENS)).await.unwrap();
    let mut out = Output {
        tokens: Vec::new(),
        text: String::new(),
        finish: None,
        error: None,
    };
    // Take a few tokens, then kill the whole requests supervisor.
    while out.tokens.len() < 5 {
        match stream.events.recv().await.unwrap() {
            llmos_inference::StreamEvent::Token { token, text, .. } => {
                out.tokens.push(token);
                out.text.push_str(&text);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    runtime
        .kernel()
        .kill(llmos_inference::REQUESTS_PATH)
        .unwrap();
    let rest = collect(stream).await;
    llmos_kernel::faults::clear("task.step");
    runtime.shutdown("test").await;
    assert_eq!(rest.error, None);
    out.tokens.extend(rest.tokens);
    out.text.push_str(&rest.text);
    assert_eq!(out.tokens, clean.tokens);
    assert_eq!(out.text, clean.text);
}
