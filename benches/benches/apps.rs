//! App SDK benchmark: what hosting work as an app costs. Generation through an app's
//! `Completions` (quota lease, stream wrapper) against `Runtime::submit` on the same
//! runtime, interleaved round by round; a call to an app actor through its `AppHandle`;
//! a checkpoint write and read; and the keyed-submission lookup as the journal grows.

use std::path::PathBuf;
use std::time::Instant;

use llmos_app::{
    App, AppConfig, AppContext, AppError, AppHandle, AppHost, AppManifest, AppRegistry, AppStore,
    Completions, Quotas, Reply, SamplingParams, StreamEvent,
};
use llmos_benches::{median_f64, micros, verdict, Summary};
use llmos_inference::{Runtime, RuntimeConfig};
use llmos_kernel::ractor::{Actor, ActorProcessingErr, ActorRef};
use llmos_kernel::ChildSpec;

const WORKER_THREADS: usize = 2;
const CPU_THREADS: usize = 2;
const ROUNDS: usize = 15;
const TOKENS: usize = 128;
const REQUESTS_PER_ROUND: usize = 4;
const CALLS: usize = 20_000;
const CHECKPOINTS: usize = 300;
const RATIO_TARGET: f64 = 0.95;

fn stories260k() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/models/stories260K/stories260K-f32.gguf")
}

/// An app whose handler does nothing: the call path is what is measured.
struct Echo;

enum EchoMsg {
    Ping(Reply<u64>),
}

impl App for Echo {
    type Msg = EchoMsg;
    type State = u64;

    fn manifest(&self) -> AppManifest {
        AppManifest::new("bench echo")
    }

    async fn start(&self, _ctx: &AppContext<EchoMsg>) -> Result<u64, AppError> {
        Ok(0)
    }

    async fn handle(
        &self,
        _ctx: &AppContext<EchoMsg>,
        message: EchoMsg,
        count: &mut u64,
    ) -> Result<(), AppError> {
        let EchoMsg::Ping(reply) = message;
        *count += 1;
        let _ = reply.send(*count);
        Ok(())
    }
}

/// The same do-nothing handler as a plain kernel worker, for the side-by-side call.
struct BareEcho;

impl Actor for BareEcho {
    type Msg = EchoMsg;
    type State = u64;
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ActorRef<EchoMsg>,
        _args: (),
    ) -> Result<u64, ActorProcessingErr> {
        Ok(0)
    }

    async fn handle(
        &self,
        _myself: ActorRef<EchoMsg>,
        message: EchoMsg,
        count: &mut u64,
    ) -> Result<(), ActorProcessingErr> {
        let EchoMsg::Ping(reply) = message;
        *count += 1;
        let _ = reply.send(*count);
        Ok(())
    }
}

fn params() -> SamplingParams {
    SamplingParams {
        max_tokens: TOKENS,
        ..SamplingParams::default()
    }
}

/// Tokens/s of `REQUESTS_PER_ROUND` concurrent greedy requests straight to the runtime.
async fn runtime_round(runtime: &Runtime) -> f64 {
    let started = Instant::now();
    let mut streams = Vec::new();
    for _ in 0..REQUESTS_PER_ROUND {
        streams.push(
            runtime
                .submit("Once upon a time", params())
                .await
                .expect("submit"),
        );
    }
    let mut tokens = 0;
    for mut stream in streams {
        while let Some(event) = stream.events.recv().await {
            match event {
                StreamEvent::Token { .. } => tokens += 1,
                _ => break,
            }
        }
    }
    tokens as f64 / started.elapsed().as_secs_f64()
}

/// The same through an app's `Completions`.
async fn app_round(completions: &Completions) -> f64 {
    let started = Instant::now();
    let mut generations = Vec::new();
    for _ in 0..REQUESTS_PER_ROUND {
        generations.push(
            completions
                .submit("Once upon a time", params())
                .await
                .expect("submit"),
        );
    }
    let mut tokens = 0;
    for generation in generations {
        tokens += generation
            .collect()
            .await
            .expect("complete")
            .completion_tokens;
    }
    tokens as f64 / started.elapsed().as_secs_f64()
}

async fn bench() -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut config = RuntimeConfig::new(stories260k(), dir.path());
    config.kv_budget_bytes = 32 << 20;
    let runtime = Runtime::boot(config).await.map_err(|e| e.to_string())?;
    runtime
        .resume_unfinished()
        .await
        .map_err(|e| e.to_string())?;
    let completions = Completions::new(
        "bench",
        runtime.clone(),
        Quotas {
            max_concurrent_requests: Some(64),
            max_kv_blocks: Some(1 << 20),
        },
    );

    println!("\n1. generation, stories260K greedy, {REQUESTS_PER_ROUND} concurrent requests × {TOKENS} tokens, {ROUNDS} interleaved rounds");
    runtime_round(&runtime).await;
    app_round(&completions).await;
    let (mut direct, mut through_app, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // Alternate the order so neither path always runs on a warmer machine.
        let (d, a) = if round % 2 == 0 {
            let d = runtime_round(&runtime).await;
            (d, app_round(&completions).await)
        } else {
            let a = app_round(&completions).await;
            (runtime_round(&runtime).await, a)
        };
        direct.push(d);
        through_app.push(a);
        ratios.push(a / d);
    }
    let (d, a, r) = (
        median_f64(&mut direct),
        median_f64(&mut through_app),
        median_f64(&mut ratios),
    );
    println!("   Runtime::submit            {d:>9.0} tok/s (median)");
    println!("   app Completions::submit    {a:>9.0} tok/s (median)");
    println!(
        "   ratio app / runtime        {r:>9.3} (median of per-round ratios; target ≥ {RATIO_TARGET}) {}",
        verdict(r >= RATIO_TARGET)
    );

    println!(
        "\n2. a call through an AppHandle vs the same do-nothing handler as a plain kernel worker, {CALLS} calls each, interleaved"
    );
    let mut registry = AppRegistry::new();
    registry.register("echo", true, |_| Ok(Echo));
    let host = AppHost::new(
        &runtime,
        &registry,
        &std::collections::BTreeMap::<String, AppConfig>::new(),
        None,
    )
    .map_err(|e| e.to_string())?;
    host.start().await.map_err(|e| e.to_string())?;
    let echo = AppHandle::<EchoMsg>::for_path("echo", runtime.kernel(), "llmos/apps/echo/main")
        .map_err(|e| e.to_string())?;
    runtime
        .kernel()
        .start_child("llmos", ChildSpec::worker("bare-echo", |_| (BareEcho, ())))
        .await
        .map_err(|e| e.to_string())?;
    let bare = runtime
        .kernel()
        .addr::<EchoMsg>("llmos/bare-echo")
        .map_err(|e| e.to_string())?;
    // Interleaved batches: the ratio compares calls made under the same conditions.
    let (mut app_batches, mut bare_batches, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..CALLS / 100 {
        let started = Instant::now();
        for _ in 0..100 {
            echo.call(EchoMsg::Ping, None)
                .await
                .map_err(|e| e.to_string())?;
        }
        let app = started.elapsed().as_secs_f64() / 100.0;
        let started = Instant::now();
        for _ in 0..100 {
            bare.call(EchoMsg::Ping, None)
                .await
                .map_err(|e| e.to_string())?;
        }
        let plain = started.elapsed().as_secs_f64() / 100.0;
        app_batches.push(app * 1e6);
        bare_batches.push(plain * 1e6);
        ratios.push(app / plain);
    }
    println!(
        "   AppHandle::call                 {:>7.2} µs (median of 100-call batches)",
        median_f64(&mut app_batches)
    );
    println!(
        "   kernel Addr::call, plain worker {:>7.2} µs",
        median_f64(&mut bare_batches)
    );
    println!(
        "   ratio app / plain               {:>7.3} (the app path adds the AppMsg wrapper and the app.handle:NAME fault point)",
        median_f64(&mut ratios)
    );

    println!(
        "\n3. checkpoints (AppStore, 1 KiB JSON value, in {}), {CHECKPOINTS} each",
        dir.path().display()
    );
    let store =
        AppStore::open("bench", dir.path().join("apps/bench")).map_err(|e| e.to_string())?;
    let value: Vec<u64> = (0..100).collect();
    let (mut puts, mut gets) = (Vec::new(), Vec::new());
    for _ in 0..CHECKPOINTS {
        let started = Instant::now();
        store.put("k", &value).map_err(|e| e.to_string())?;
        puts.push(started.elapsed());
        let started = Instant::now();
        let back: Option<Vec<u64>> = store.get("k").map_err(|e| e.to_string())?;
        gets.push(started.elapsed());
        assert_eq!(back.as_deref(), Some(&value[..]));
    }
    let (puts, gets) = (Summary::of(&mut puts), Summary::of(&mut gets));
    println!(
        "   put (tmp + fsync + rename + dir fsync)  median {} p99 {}",
        micros(puts.median),
        micros(puts.p99)
    );
    println!(
        "   get (read + crc check + parse)          median {} p99 {}",
        micros(gets.median),
        micros(gets.p99)
    );

    println!("\n4. keyed-submission lookup (find_keyed: an index beside the journal, checked against it)");
    let keyed = Completions::new("keyed", runtime.clone(), Quotas::default());
    let short = SamplingParams {
        max_tokens: 1,
        ..SamplingParams::default()
    };
    let mut in_journal = 0usize;
    for target in [10usize, 100, 1000] {
        while in_journal < target {
            keyed
                .submit_keyed(
                    &format!("k-{in_journal}"),
                    "Once upon a time",
                    short.clone(),
                )
                .await
                .map_err(|e| e.to_string())?
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            in_journal += 1;
        }
        let mut samples = Vec::new();
        for i in 0..200 {
            let started = Instant::now();
            let found = keyed
                .find_keyed(&format!("k-{}", i % target))
                .map_err(|e| e.to_string())?;
            samples.push(started.elapsed());
            assert!(found.is_some());
        }
        let s = Summary::of(&mut samples);
        println!(
            "   ~{target:>5} requests in the journal: median {} p99 {}",
            micros(s.median),
            micros(s.p99)
        );
    }
    runtime.shutdown("bench over").await;
    Ok(())
}

fn main() {
    let threads = llmos_device::init_cpu_threads(CPU_THREADS);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .enable_all()
        .build()
        .expect("tokio runtime");
    println!(
        "llmos apps bench: tokio {WORKER_THREADS} worker threads; candle CPU threads {threads}; {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let started = Instant::now();
    // On a worker, as a request handler would be: block_on's own thread is not one, and
    // every call from it would pay two cross-thread wake-ups.
    let outcome = rt
        .block_on(rt.spawn(bench()))
        .unwrap_or_else(|e| Err(format!("bench task: {e}")));
    if let Err(reason) = outcome {
        eprintln!("bench failed: {reason}");
        std::process::exit(1);
    }
    println!(
        "\ntotal bench time {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
