//! Kernel benchmark: restart latency through a stable address, and the cost of a call
//! through the kernel against the same call to a bare ractor actor, measured side by side
//! in one run and printed next to their targets.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llmos_benches::{median_f64, micros, verdict, Summary};
use llmos_kernel::ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use llmos_kernel::{Addr, ChildSpec, Kernel, KernelError, Strategy, SupervisorSpec};

/// Worker threads of the runtime: the CI machine has two cores.
const WORKER_THREADS: usize = 2;

// Far above the minimum sample counts: the whole run still takes about a second, and the
// call ratio sits close enough to its target that a noisier median could flip the verdict.
const RESTART_WARMUP: usize = 300;
const RESTARTS: usize = 10_000;

const CALL_WARMUP_ROUNDS: usize = 20;
const CALL_ROUNDS: usize = 1000;
const CALLS_PER_BATCH: usize = 1000;

const RESTART_TARGET: Duration = Duration::from_micros(50);
const CALL_RATIO_TARGET: f64 = 1.10;

/// Messages of [`Echo`], the one actor type measured on every path.
#[derive(Debug)]
enum EchoMsg {
    /// Answers with the instance number, so a reply proves which instance answered.
    Ping(RpcReplyPort<u64>),
    Panic,
    Fail,
}

/// A minimal worker: the handler does no work, so the bench measures the machinery.
struct Echo {
    instances: Arc<AtomicU64>,
}

impl Actor for Echo {
    type Msg = EchoMsg;
    type State = u64;
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ActorRef<EchoMsg>,
        _args: (),
    ) -> Result<u64, ActorProcessingErr> {
        Ok(self.instances.fetch_add(1, Ordering::Relaxed) + 1)
    }

    async fn handle(
        &self,
        _myself: ActorRef<EchoMsg>,
        message: EchoMsg,
        instance: &mut u64,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            EchoMsg::Ping(reply) => {
                let _ = reply.send(*instance);
                Ok(())
            }
            EchoMsg::Panic => panic!("echo told to panic"),
            EchoMsg::Fail => Err("echo told to fail".into()),
        }
    }
}

fn echo_child(name: &str) -> ChildSpec {
    let instances = Arc::new(AtomicU64::new(0));
    ChildSpec::worker(name, move |_ctx| {
        (
            Echo {
                instances: instances.clone(),
            },
            (),
        )
    })
}

/// Restart latencies of one crash kind, and how many calls hit the dying instance.
struct RestartRun {
    samples: Vec<Duration>,
    retries: u64,
}

/// Crashes the child with `crash()` and times until a call through `addr` is answered by
/// the next instance; calls that land in the dying instance are retried, inside the time.
async fn restart_latency(
    addr: &Addr<EchoMsg>,
    crash: fn() -> EchoMsg,
) -> Result<RestartRun, String> {
    let mut last = ping_until_answered(addr).await?.0;
    let mut run = RestartRun {
        samples: Vec::with_capacity(RESTARTS),
        retries: 0,
    };
    for i in 0..RESTART_WARMUP + RESTARTS {
        let start = Instant::now();
        addr.cast(crash())
            .await
            .map_err(|u| format!("crash message not delivered: {}", u.error))?;
        let (instance, retries) = ping_until_answered(addr).await?;
        let took = start.elapsed();
        // The ping queues behind the crash message, so only a new instance can answer it.
        if instance != last + 1 {
            return Err(format!(
                "expected instance {} to answer, got {instance}",
                last + 1
            ));
        }
        last = instance;
        if i >= RESTART_WARMUP {
            run.samples.push(took);
            run.retries += retries;
        }
    }
    Ok(run)
}

async fn ping_until_answered(addr: &Addr<EchoMsg>) -> Result<(u64, u64), String> {
    let mut retries = 0;
    loop {
        match addr.call(EchoMsg::Ping, None).await {
            Ok(instance) => return Ok((instance, retries)),
            Err(KernelError::DiedBeforeReply(_)) => retries += 1,
            Err(other) => return Err(format!("call failed: {other}")),
        }
    }
}

/// Per-call times (one value per batch) of the kernel and the bare paths.
struct CallRun {
    kernel: Vec<f64>,
    bare: Vec<f64>,
}

async fn kernel_batch(addr: &Addr<EchoMsg>) -> f64 {
    let start = Instant::now();
    for _ in 0..CALLS_PER_BATCH {
        let reply = addr.call(EchoMsg::Ping, None).await;
        black_box(reply.expect("kernel call answered"));
    }
    start.elapsed().as_secs_f64() / CALLS_PER_BATCH as f64
}

async fn bare_batch(actor: &ActorRef<EchoMsg>) -> f64 {
    let start = Instant::now();
    for _ in 0..CALLS_PER_BATCH {
        let reply = actor.call(EchoMsg::Ping, None).await;
        black_box(reply.expect("bare call sent").expect("bare call answered"));
    }
    start.elapsed().as_secs_f64() / CALLS_PER_BATCH as f64
}

/// Alternates batches, swapping which path goes first each round, so drift and noise
/// (frequency scaling, other builds on the machine) fall on both paths alike.
async fn call_round_trips(addr: &Addr<EchoMsg>, bare: &ActorRef<EchoMsg>) -> CallRun {
    let mut run = CallRun {
        kernel: Vec::with_capacity(CALL_ROUNDS),
        bare: Vec::with_capacity(CALL_ROUNDS),
    };
    for round in 0..CALL_WARMUP_ROUNDS + CALL_ROUNDS {
        let (k, b) = if round % 2 == 0 {
            let k = kernel_batch(addr).await;
            (k, bare_batch(bare).await)
        } else {
            let b = bare_batch(bare).await;
            (kernel_batch(addr).await, b)
        };
        if round >= CALL_WARMUP_ROUNDS {
            run.kernel.push(k);
            run.bare.push(b);
        }
    }
    run
}

fn restart_line(label: &str, run: &mut RestartRun) -> Summary {
    let s = Summary::of(&mut run.samples);
    println!(
        "    {label:<14}{:>6} {} {} {} {} {}   {:>6}",
        s.count,
        micros(s.median),
        micros(s.p90),
        micros(s.p99),
        micros(s.min),
        micros(s.max),
        run.retries
    );
    s
}

async fn bench() -> Result<(), String> {
    let spec = SupervisorSpec::new(Strategy::OneForOne)
        .intensity(u32::MAX, Duration::from_secs(1))
        .child(echo_child("crashy"))
        .child(echo_child("steady"));
    let kernel = Kernel::boot("bench", spec)
        .await
        .map_err(|e| format!("boot: {e}"))?;
    let crashy = kernel
        .addr::<EchoMsg>("bench/crashy")
        .map_err(|e| format!("addr: {e}"))?;
    let steady = kernel
        .addr::<EchoMsg>("bench/steady")
        .map_err(|e| format!("addr: {e}"))?;

    println!("[1] restart latency: crash -> restarted child answers Kernel::addr(path).call()");
    println!("    one_for_one root, intensity u32::MAX per 1 s, no backoff;");
    println!(
        "    {RESTART_WARMUP} warm-up + {RESTARTS} measured restarts per line; \
         retries = calls that hit the dying instance (DiedBeforeReply), timed"
    );
    println!(
        "    panic hook: SILENT during this section (std::panic::set_hook(|_| {{}})): the default"
    );
    println!("    hook prints a backtrace (RUST_BACKTRACE is set) and would time std's printing,");
    println!("    not the kernel");
    println!(
        "    {:<14}{:>6} {:>12} {:>12} {:>12} {:>12} {:>12}   {:>6}",
        "crash by", "n", "median", "p90", "p99", "min", "max", "retries"
    );
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let panicked = restart_latency(&crashy, || EchoMsg::Panic).await;
    let returned = restart_latency(&crashy, || EchoMsg::Fail).await;
    std::panic::set_hook(default_hook);
    let panic_summary = restart_line("panic", &mut panicked?);
    let err_summary = restart_line("Err returned", &mut returned?);

    println!();
    println!(
        "[2] call round-trip: Echo::Ping, same actor type, {CALL_ROUNDS} rounds x \
         {CALLS_PER_BATCH} calls, alternating which path goes first ({CALL_WARMUP_ROUNDS} warm-up rounds)"
    );
    let bare_instances = Arc::new(AtomicU64::new(0));
    let (bare, bare_handle) = Actor::spawn(
        None,
        Echo {
            instances: bare_instances,
        },
        (),
    )
    .await
    .map_err(|e| format!("spawn bare actor: {e}"))?;
    let mut calls = call_round_trips(&steady, &bare).await;
    let mut paired: Vec<f64> = calls
        .kernel
        .iter()
        .zip(&calls.bare)
        .map(|(k, b)| k / b)
        .collect();
    let kernel_median = median_f64(&mut calls.kernel);
    let bare_median = median_f64(&mut calls.bare);
    let ratio = kernel_median / bare_median;
    let paired_ratio = median_f64(&mut paired);
    println!(
        "    kernel  Addr::call (ChildSpec::worker)  median {} per call",
        micros(Duration::from_secs_f64(kernel_median))
    );
    println!(
        "    bare    ActorRef::call (Actor::spawn)   median {} per call",
        micros(Duration::from_secs_f64(bare_median))
    );
    println!(
        "    ratio kernel/bare (of medians)            {ratio:>9.3}   <- judged against the target"
    );
    println!(
        "    ratio kernel/bare (median of per-round)   {paired_ratio:>9.3}   (paired cross-check)"
    );

    bare.stop(None);
    let _ = bare_handle.await;
    kernel.shutdown("bench done").await;

    println!();
    println!("targets");
    println!(
        "    restart median, panic        < {:>5.1} µs   measured {}   {}",
        RESTART_TARGET.as_secs_f64() * 1e6,
        micros(panic_summary.median),
        verdict(panic_summary.median < RESTART_TARGET)
    );
    println!(
        "    restart median, Err returned < {:>5.1} µs   measured {}   {}",
        RESTART_TARGET.as_secs_f64() * 1e6,
        micros(err_summary.median),
        verdict(err_summary.median < RESTART_TARGET)
    );
    println!(
        "    call ratio kernel/bare      <= {CALL_RATIO_TARGET:>5.2}      measured {ratio:>12.3}   {}",
        verdict(ratio <= CALL_RATIO_TARGET)
    );
    Ok(())
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .enable_all()
        .build()
        .expect("tokio runtime");
    println!("llmos-kernel bench: tokio multi-thread runtime, {WORKER_THREADS} worker threads");
    println!();
    let started = Instant::now();
    // Spawned rather than run in block_on so the caller is a runtime worker, as an actor
    // or request handler would be, and the main thread adds no third competing thread.
    let outcome = runtime.block_on(async { tokio::spawn(bench()).await });
    match outcome {
        Ok(Ok(())) => println!(
            "\ntotal bench time {:.1} s",
            started.elapsed().as_secs_f64()
        ),
        Ok(Err(reason)) => {
            eprintln!("bench failed: {reason}");
            std::process::exit(1);
        }
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
}
