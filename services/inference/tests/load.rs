//! The engine under load, with faults: many concurrent streams (greedy and seeded
//! sampling) must each produce exactly the text the same request produces alone without
//! faults — under a seeded chaos schedule of task crashes, engine crashes and hangs and
//! device losses; under KV memory far too small for all of them (preemption); next to a
//! poison request that crashes every step it is in (it fails alone); and through steps
//! slower than the heartbeat deadline (per-layer heartbeats: no hang is declared).
//! Alone in its test binary because fault points are process-wide; cases run one at a time.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use llmos_device::DeviceId;
use llmos_inference::{Runtime, RuntimeConfig, SamplingParams};
use llmos_kernel::KernelEvent;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Distinct prompts, so no two requests share a continuation.
const OPENINGS: [&str; 8] = [
    "Once upon a time",
    "One day, a little girl",
    "The dog ran",
    "Tom and his mom",
    "There was a big tree",
    "Lily liked to",
    "The sun was",
    "A cat saw a bird",
];

/// Request `i` of a load: its prompt and parameters (even: greedy; odd: seeded sampling).
fn request(i: usize, max_tokens: usize) -> (String, SamplingParams) {
    let prompt = format!(
        "{} {}",
        OPENINGS[i % OPENINGS.len()],
        "and".repeat(i / OPENINGS.len())
    );
    let params = SamplingParams {
        temperature: if i.is_multiple_of(2) { 0.0 } else { 0.8 },
        top_p: if i % 4 == 1 { 0.9 } else { 1.0 },
        top_k: if i % 4 == 3 { 40 } else { 0 },
        max_tokens,
        seed: 1000 + i as u64,
        ..SamplingParams::default()
    };
    (prompt.trim_end().to_string(), params)
}

/// Each request run alone, one after the other, without faults.
async fn alone(config: RuntimeConfig, n: usize, max_tokens: usize) -> Vec<Output> {
    let runtime = Runtime::boot(config).await.unwrap();
    let mut out = Vec::new();
    for i in 0..n {
        let (prompt, params) = request(i, max_tokens);
        out.push(collect(runtime.submit(&prompt, params).await.unwrap()).await);
        assert_eq!(out[i].error, None, "request {i} alone");
    }
    runtime.shutdown("test").await;
    out
}

/// All `n` requests at once; returns each one's output (index order) and their ids.
async fn together(
    runtime: &Runtime,
    n: usize,
    max_tokens: usize,
    guard: Duration,
) -> (Vec<Output>, Vec<u64>) {
    let mut ids = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..n {
        let (prompt, params) = request(i, max_tokens);
        let stream = runtime.submit(&prompt, params).await.unwrap();
        ids.push(stream.id);
        tasks.push(tokio::spawn(collect_within(stream, guard)));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    (out, ids)
}

fn assert_same(context: &str, got: &[Output], want: &[Output]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.error, None, "{context}: request {i} failed");
        assert_eq!(
            g.tokens, w.tokens,
            "{context}: request {i}: tokens differ from running alone"
        );
        assert_eq!(
            g.text, w.text,
            "{context}: request {i}: text differs from running alone"
        );
        assert_eq!(g.finish, w.finish, "{context}: request {i}: finish differs");
    }
}

/// A fault schedule in the `fail` crate's syntax: `count` faults of `action`, each after
/// a gap drawn from `gap` evaluations.
fn schedule(
    rng: &mut ChaCha8Rng,
    action: &str,
    count: usize,
    gap: std::ops::Range<usize>,
) -> String {
    let mut spec = String::new();
    for _ in 0..count {
        spec.push_str(&format!("{}*off->1*{action}->", rng.gen_range(gap.clone())));
    }
    spec.push_str("off");
    spec
}

const CHAOS_STREAMS: usize = 16;
const CHAOS_TOKENS: usize = 48;

fn chaos_config(dir: &std::path::Path) -> RuntimeConfig {
    let mut config = config(dir, &[DeviceId::cpu(0), DeviceId::cpu(1), DeviceId::cpu(2)]);
    config.engine_heartbeat = Duration::from_millis(400);
    config
}

async fn chaos(seed: u64, reference: &[Output]) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::boot(chaos_config(dir.path())).await.unwrap();
    let mut events = runtime.kernel().subscribe();
    // Every request's own task crashes 3 to 5 times (`task.step:req-N` is evaluated once
    // per token it samples, 48 in all); the engine points are evaluated once per step of
    // each engine (about 50 each) and hit whatever is in the batch; device.lost once per
    // step of that device. Request ids start at 1 in a fresh state directory.
    let mut specs: Vec<(String, String)> = (1..=CHAOS_STREAMS as u64)
        .map(|id| {
            let crashes = rng.gen_range(3..=5);
            (
                format!("task.step:req-{id}"),
                schedule(&mut rng, "panic", crashes, 1..10),
            )
        })
        .collect();
    specs.extend([
        (
            "engine.step".to_string(),
            schedule(&mut rng, "panic", 4, 6..20),
        ),
        (
            "engine.hang".to_string(),
            schedule(&mut rng, "return", 2, 10..40),
        ),
        (
            "device.lost:cpu:0".to_string(),
            schedule(&mut rng, "return", 1, 5..25),
        ),
        (
            "device.lost:cpu:1".to_string(),
            schedule(&mut rng, "return", 1, 20..60),
        ),
    ]);
    for (point, spec) in &specs {
        llmos_kernel::faults::configure(point, spec).unwrap();
    }
    let (got, ids) = together(
        &runtime,
        CHAOS_STREAMS,
        CHAOS_TOKENS,
        Duration::from_secs(120),
    )
    .await;
    for (point, _) in &specs {
        llmos_kernel::faults::clear(point);
    }
    let seen: Vec<KernelEvent> = std::iter::from_fn(|| events.try_next()).collect();
    let context = format!("chaos seed {seed} (rerun: LLMOS_CHAOS_SEED={seed})");
    assert_same(&context, &got, reference);
    // The faults really happened, and hit every request.
    let mut task_crashes: HashMap<u64, usize> = HashMap::new();
    for e in &seen {
        if let KernelEvent::Failed { path, .. } = e {
            if let Some(id) = path.as_str().strip_prefix("llmos/requests/req-") {
                *task_crashes.entry(id.parse().unwrap()).or_default() += 1;
            }
        }
    }
    assert_eq!(ids, (1..=CHAOS_STREAMS as u64).collect::<Vec<_>>());
    for id in &ids {
        assert!(
            task_crashes.get(id).copied().unwrap_or(0) >= 3,
            "{context}: request {id}'s task crashed fewer than 3 times: {task_crashes:?}"
        );
    }
    assert!(
        seen.iter().any(
            |e| matches!(e, KernelEvent::Failed { path, .. } if path.as_str().ends_with("/engine"))
        ),
        "{context}: no engine crash"
    );
    assert!(
        seen.iter()
            .any(|e| matches!(e, KernelEvent::HangDetected { .. })),
        "{context}: no hang"
    );
    let lost = runtime
        .services()
        .devices
        .iter()
        .filter(|d| !d.device.is_healthy())
        .count();
    assert_eq!(lost, 2, "{context}: cpu:0 and cpu:1 are lost");
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, KernelEvent::Escalated { .. })),
        "{context}: a fault escalated: {seen:?}"
    );
    runtime.shutdown("test").await;
}

/// 16 concurrent streams, greedy and seeded, under a seeded schedule of every fault the
/// engine knows: each stream's text equals the request run alone without faults, and no
/// request is given up. `LLMOS_CHAOS_SEED` reruns one seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_keeps_every_stream_exact() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let reference = alone(chaos_config(dir.path()), CHAOS_STREAMS, CHAOS_TOKENS).await;
    let seeds: Vec<u64> = match std::env::var("LLMOS_CHAOS_SEED") {
        Ok(seed) => vec![seed.parse().expect("LLMOS_CHAOS_SEED is a number")],
        Err(_) => vec![1, 2],
    };
    for seed in seeds {
        eprintln!("chaos seed {seed}");
        chaos(seed, &reference).await;
    }
}

/// Many long requests and KV memory for a fraction of them: the engine preempts and
/// resumes, and every request completes with its fault-free text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_exhaustion_preempts_and_every_request_completes_exactly() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let reference = alone(config(dir.path(), &[DeviceId::cpu(0)]), 10, 150).await;
    let dir = tempfile::tempdir().unwrap();
    let mut small = config(dir.path(), &[DeviceId::cpu(0)]);
    // stories260K: 1,280 bytes of K/V per position, so 24 blocks of 16 positions hold
    // 384 positions, for 10 requests of about 160 positions each.
    small.kv_budget_bytes = 24 * 16 * 1280;
    let runtime = Runtime::boot(small).await.unwrap();
    let (got, _) = together(&runtime, 10, 150, Duration::from_secs(120)).await;
    assert_same("small KV", &got, &reference);
    let preemptions = runtime.services().metrics.preemptions.get();
    assert!(preemptions > 0, "no preemption happened");
    eprintln!("{preemptions} preemptions");
    runtime.shutdown("test").await;
}

/// A request whose every step crashes (or hangs) the engine is found and fails alone;
/// every other request finishes with its fault-free text, and nothing escalates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_request_fails_alone() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let reference = alone(config(dir.path(), &[DeviceId::cpu(0)]), 6, 40).await;
    for kind in ["engine.step", "engine.hang"] {
        let dir = tempfile::tempdir().unwrap();
        let runtime = Runtime::boot(config(dir.path(), &[DeviceId::cpu(0)]))
            .await
            .unwrap();
        let mut events = runtime.kernel().subscribe();
        // Request ids start at 1 in a fresh state directory: the third is the poison.
        let point = format!("{kind}:req-3");
        let action = if kind == "engine.step" {
            "panic"
        } else {
            "return"
        };
        llmos_kernel::faults::configure(&point, action).unwrap();
        let (got, ids) = together(&runtime, 6, 40, Duration::from_secs(120)).await;
        llmos_kernel::faults::clear(&point);
        assert_eq!(ids[2], 3);
        let error = got[2].error.clone().expect("the poison request fails");
        assert!(error.contains("crashed the engine"), "{kind}: {error}");
        for i in [0, 1, 3, 4, 5] {
            assert_same(kind, &got[i..=i], &reference[i..=i]);
        }
        let seen: Vec<KernelEvent> = std::iter::from_fn(|| events.try_next()).collect();
        assert!(
            !seen
                .iter()
                .any(|e| matches!(e, KernelEvent::Escalated { .. })),
            "{kind}: escalated"
        );
        assert_eq!(runtime.services().metrics.poisoned.get(), 1);
        runtime.shutdown("test").await;
    }
}

/// A step slower than the heartbeat deadline is not a hang while each layer beats: every
/// layer sleeps 100 ms under a 300 ms deadline (steps of 500 ms and more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_step_is_not_a_hang() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), &[DeviceId::cpu(0)]);
    config.engine_heartbeat = Duration::from_millis(300);
    let runtime = Runtime::boot(config).await.unwrap();
    let mut events = runtime.kernel().subscribe();
    llmos_kernel::faults::configure("engine.layer", "sleep(100)").unwrap();
    let out = collect(
        runtime
            .submit("Once upon a time", params(0.0, 4))
            .await
            .unwrap(),
    )
    .await;
    llmos_kernel::faults::clear("engine.layer");
    assert_eq!(out.error, None);
    assert_eq!(out.tokens.len(), 4);
    let seen: Vec<KernelEvent> = std::iter::from_fn(|| events.try_next()).collect();
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, KernelEvent::HangDetected { .. })),
        "a slow step was taken for a hang"
    );
    runtime.shutdown("test").await;
}

/// K/V stored as f16: concurrent streams crashed mid-way (engine restarted: KV restored
/// from the f16 pool; a task crashed: KV kept) produce exactly their fault-free text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f16_kv_resumes_exactly() {
    let _serial = SERIAL.lock().await;
    let f16 = |dir: &std::path::Path| {
        let mut c = config(dir, &[DeviceId::cpu(0)]);
        c.kv_dtype = llmos_inference::KvDtype::F16;
        c
    };
    let dir = tempfile::tempdir().unwrap();
    let reference = alone(f16(dir.path()), 6, 48).await;
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::boot(f16(dir.path())).await.unwrap();
    let mut events = runtime.kernel().subscribe();
    llmos_kernel::faults::configure("engine.step", "20*off->1*panic->off").unwrap();
    llmos_kernel::faults::configure("task.step:req-2", "10*off->1*panic->off").unwrap();
    let (got, _) = together(&runtime, 6, 48, Duration::from_secs(60)).await;
    llmos_kernel::faults::clear("engine.step");
    llmos_kernel::faults::clear("task.step:req-2");
    assert_same("f16 KV", &got, &reference);
    let seen: Vec<KernelEvent> = std::iter::from_fn(|| events.try_next()).collect();
    assert!(seen.iter().any(
        |e| matches!(e, KernelEvent::Failed { path, .. } if path.as_str().ends_with("/engine"))
    ));
    let (_, restored, _) = runtime.services().devices[0].kv_stats.snapshot();
    assert!(restored > 0, "KV came back from the f16 pool");
    runtime.shutdown("test").await;
}
