//! The app host and SDK against a real runtime (stories260K): quotas refuse what exceeds
//! them and hold a request's share until it ends; a failed task or handler crashes only
//! its instance, which restarts with its checkpoints; an app that crashes more often
//! than its policy allows is given up while other apps run on; checkpoint faults are
//! errors. Fault points are process-global: the tests take turns.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use llmos_app::{
    App, AppConfig, AppContext, AppError, AppHandle, AppHost, AppManifest, AppRegistry,
    Completions, Quotas, Reply, SamplingParams,
};
use llmos_inference::{Runtime, RuntimeConfig};
use llmos_kernel::{faults, KernelEvent};
use tokio::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::const_new(());
const GUARD: Duration = Duration::from_secs(30);

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/models/stories260K/stories260K-f32.gguf")
}

/// A small app to exercise the host: it counts its starts in a checkpoint and does what
/// its messages say.
struct Probe;

enum ProbeMsg {
    Starts(Reply<u64>),
    /// Sent to itself from `start`.
    Note,
    Notes(Reply<u64>),
    Checkpoint(Reply<Result<(), AppError>>),
    FailTask,
    PanicTask,
}

impl App for Probe {
    type Msg = ProbeMsg;
    /// (starts, notes received by this instance).
    type State = (u64, u64);

    fn manifest(&self) -> AppManifest {
        AppManifest::new("test probe")
    }

    async fn start(&self, ctx: &AppContext<ProbeMsg>) -> Result<(u64, u64), AppError> {
        let starts = ctx.store().get::<u64>("starts")?.unwrap_or(0) + 1;
        ctx.store().put("starts", &starts)?;
        ctx.send_self(ProbeMsg::Note)?;
        Ok((starts, 0))
    }

    async fn handle(
        &self,
        ctx: &AppContext<ProbeMsg>,
        message: ProbeMsg,
        (starts, notes): &mut (u64, u64),
    ) -> Result<(), AppError> {
        match message {
            ProbeMsg::Starts(reply) => {
                let _ = reply.send(*starts);
            }
            ProbeMsg::Note => *notes += 1,
            ProbeMsg::Notes(reply) => {
                let _ = reply.send(*notes);
            }
            ProbeMsg::Checkpoint(reply) => {
                let _ = reply.send(ctx.store().put("x", &1));
            }
            ProbeMsg::FailTask => ctx.spawn(async { Err(AppError::failed("task gave up")) }),
            ProbeMsg::PanicTask => ctx.spawn(async { panic!("task bug") }),
        }
        Ok(())
    }
}

async fn boot(dir: &Path) -> Runtime {
    llmos_device::init_cpu_threads(2);
    let mut config = RuntimeConfig::new(model(), dir);
    config.kv_budget_bytes = 8 << 20;
    let runtime = Runtime::boot(config).await.expect("boot");
    runtime.resume_unfinished().await.expect("resume");
    runtime
}

async fn host(runtime: &Runtime, configs: BTreeMap<String, AppConfig>) -> AppHost {
    let mut registry = AppRegistry::new();
    registry.register("probe", true, |_| Ok(Probe));
    registry.register("other", true, |_| Ok(Probe));
    let host = AppHost::new(runtime, &registry, &configs, None).expect("host");
    host.start().await.expect("start apps");
    host
}

fn handle(runtime: &Runtime, app: &str) -> AppHandle<ProbeMsg> {
    AppHandle::for_path(app, runtime.kernel(), &format!("llmos/apps/{app}/main")).expect("handle")
}

fn started(e: &KernelEvent, path: &str) -> bool {
    matches!(e, KernelEvent::Started { path: p, .. } if p.as_str() == path)
}

fn params(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ..SamplingParams::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_refuse_excess_and_hold_until_the_request_ends() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let runtime = boot(dir.path()).await;
    let one = Completions::new(
        "one",
        runtime.clone(),
        Quotas {
            max_concurrent_requests: Some(1),
            max_kv_blocks: None,
        },
    );
    let first = one.submit("Once upon a time", params(40)).await.unwrap();
    let refused = one.submit("Once upon a time", params(4)).await;
    assert!(
        matches!(
            refused,
            Err(AppError::QuotaExceeded {
                what: "concurrent requests",
                limit: 1,
                ..
            })
        ),
        "{refused:?}"
    );
    assert_eq!(refused.unwrap_err().status(), 429);
    // Dropping the stream does not return the share: the request still runs.
    let id = first.id;
    drop(first);
    assert_eq!(one.usage().requests, 1);
    let watcher = Completions::new("watcher", runtime.clone(), Quotas::default());
    watcher
        .attach(id, None)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let mut freed = false;
    for _ in 0..100_000 {
        if one.usage().requests == 0 {
            freed = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(freed, "the share comes back when the request ends");
    one.complete("Once upon a time", params(4)).await.unwrap();
    assert_eq!(one.usage().refused, 1);
    assert_eq!(one.usage().submitted, 2);

    // 16 positions per block: 5 prompt tokens + 40 → 3 blocks; + 20 → 2 blocks.
    let kv = Completions::new(
        "kv",
        runtime.clone(),
        Quotas {
            max_concurrent_requests: None,
            max_kv_blocks: Some(2),
        },
    );
    let refused = kv.submit("Once upon a time", params(40)).await;
    assert!(
        matches!(
            refused,
            Err(AppError::QuotaExceeded {
                what: "KV blocks",
                needed: 3,
                ..
            })
        ),
        "{refused:?}"
    );
    let fits = kv.submit("Once upon a time", params(20)).await.unwrap();
    assert_eq!(kv.usage().kv_blocks, 2);
    let done = fits.collect().await.unwrap();
    assert_eq!(done.completion_tokens, 20);
    assert_eq!(kv.usage().kv_blocks, 0, "returned when the end is read");
    runtime.shutdown("test over").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_task_crashes_only_its_instance_which_restarts_from_checkpoints() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let runtime = boot(dir.path()).await;
    let host = host(&runtime, BTreeMap::new()).await;
    let app = handle(&runtime, "probe");
    assert_eq!(app.call(ProbeMsg::Starts, None).await.unwrap(), 1);
    assert_eq!(
        app.call(ProbeMsg::Notes, None).await.unwrap(),
        1,
        "what start sent itself was handled first"
    );
    for (crash, starts) in [(ProbeMsg::FailTask, 2), (ProbeMsg::PanicTask, 3)] {
        let mut events = runtime.kernel().subscribe();
        app.cast(crash).await.unwrap();
        events
            .wait_for(GUARD, |e| started(e, "llmos/apps/probe/main"))
            .await
            .expect("restarted");
        assert_eq!(app.call(ProbeMsg::Starts, None).await.unwrap(), starts);
    }
    let snapshot = runtime.kernel().snapshot();
    let other = snapshot.find("llmos/apps/other/main").expect("other app");
    assert_eq!(other.restarts, 0, "the other app was not disturbed");
    assert!(host.health_reasons().is_empty());
    runtime.shutdown("test over").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_gives_the_app_up_and_others_run_on() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let runtime = boot(dir.path()).await;
    let configs = BTreeMap::from([(
        "probe".to_string(),
        AppConfig {
            max_restarts: Some(2),
            period_secs: Some(60.0),
            max_backoff_ms: Some(0),
            ..AppConfig::default()
        },
    )]);
    let host = host(&runtime, configs).await;
    let app = handle(&runtime, "probe");
    let mut events = runtime.kernel().subscribe();
    for _ in 0..2 {
        app.cast(ProbeMsg::PanicTask).await.unwrap();
        events
            .wait_for(GUARD, |e| started(e, "llmos/apps/probe/main"))
            .await
            .expect("restarted");
    }
    app.cast(ProbeMsg::PanicTask).await.unwrap();
    events
        .wait_for(GUARD, |e| {
            matches!(e, KernelEvent::Escalated { path, .. } if path.as_str() == "llmos/apps/probe")
        })
        .await
        .expect("given up");
    let mut reasons = Vec::new();
    for _ in 0..100_000 {
        reasons = host.health_reasons();
        if !reasons.is_empty() {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(reasons[0].contains("probe"), "{reasons:?}");
    let status = host.status();
    let state = |name: &str| {
        status
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.state.clone())
    };
    assert_eq!(state("probe").as_deref(), Some("given_up"));
    assert_eq!(state("other").as_deref(), Some("running"));
    let other = handle(&runtime, "other");
    assert_eq!(other.call(ProbeMsg::Starts, None).await.unwrap(), 1);
    let snapshot = runtime.kernel().snapshot();
    assert_eq!(
        snapshot.find("llmos/apps").unwrap().restarts,
        0,
        "`apps` itself never restarted"
    );
    runtime.shutdown("test over").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_and_handler_faults_are_errors_that_clear() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let runtime = boot(dir.path()).await;
    let _host = host(&runtime, BTreeMap::new()).await;
    let app = handle(&runtime, "probe");
    faults::configure("app.checkpoint:probe", "return(disk full)").unwrap();
    let failed = app.call(ProbeMsg::Checkpoint, None).await.unwrap();
    faults::clear("app.checkpoint:probe");
    match failed {
        Err(AppError::Checkpoint { reason, .. }) => {
            assert!(reason.contains("disk full"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    app.call(ProbeMsg::Checkpoint, None).await.unwrap().unwrap();
    // A message handled under `app.handle:probe=return` crashes the instance.
    let mut events = runtime.kernel().subscribe();
    faults::configure("app.handle:probe", "1*return(injected)->off").unwrap();
    app.cast(ProbeMsg::FailTask).await.unwrap();
    events
        .wait_for(GUARD, |e| {
            matches!(e, KernelEvent::Failed { path, reason } if path.as_str() == "llmos/apps/probe/main" && reason.contains("injected"))
        })
        .await
        .expect("the injected failure");
    faults::clear("app.handle:probe");
    assert_eq!(app.call(ProbeMsg::Starts, None).await.unwrap(), 2);
    runtime.shutdown("test over").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_submission_is_exactly_once_across_instances_and_processes() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let runtime = boot(dir.path()).await;
    let first = Completions::new("keyed", runtime.clone(), Quotas::default());
    let submitted = first
        .submit_keyed("job-1-item-0", "Once upon a time", params(30))
        .await
        .unwrap();
    let id = submitted.id;
    // A successor (another Completions of the same app) finds it by key: one request,
    // counted once however many streams hold it.
    let again = first
        .submit_keyed("job-1-item-0", "Once upon a time", params(30))
        .await
        .unwrap();
    assert_eq!(again.id, id);
    assert_eq!(first.usage().submitted, 1);
    assert_eq!(first.usage().requests, 1, "one share per request");
    let other_key = first
        .submit_keyed("job-1-item-1", "Once upon a time", params(30))
        .await
        .unwrap();
    assert_ne!(other_key.id, id);
    let expected = submitted.collect().await.unwrap();
    assert_eq!(again.collect().await.unwrap().text, expected.text);
    other_key.collect().await.unwrap();
    // Keys are per app.
    assert_eq!(
        Completions::new("another", runtime.clone(), Quotas::default())
            .find_keyed("job-1-item-0")
            .unwrap(),
        None
    );
    runtime.shutdown("test over").await;

    // A new process on the same state directory (another logical device: the old pool
    // file is released asynchronously) finds the finished request by its key.
    llmos_device::init_cpu_threads(2);
    let mut config = RuntimeConfig::new(model(), dir.path());
    config.kv_budget_bytes = 8 << 20;
    config.devices = vec![llmos_device::DeviceId::cpu(1)];
    let runtime = Runtime::boot(config).await.expect("boot again");
    runtime.resume_unfinished().await.unwrap();
    let successor = Completions::new("keyed", runtime.clone(), Quotas::default());
    assert_eq!(successor.find_keyed("job-1-item-0").unwrap(), Some(id));
    let replayed = successor
        .submit_keyed("job-1-item-0", "Once upon a time", params(30))
        .await
        .unwrap();
    assert_eq!(replayed.id, id);
    assert_eq!(replayed.collect().await.unwrap().text, expected.text);
    assert_eq!(successor.usage().submitted, 0, "nothing submitted again");
    runtime.shutdown("test over").await;
}
