//! `llmos demo`: boots a small tree of real actors, crashes the producer through the
//! `kernel.demo` fault point, shows the kernel restarting it, then shuts down in order, at
//! once or on SIGINT/SIGTERM.
//!
//! Every step waits on kernel events or on the consumer's progress, never on a sleep, so the
//! output is the same on a fast or a loaded machine.

mod actors;

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use llmos_kernel::{
    faults, ChildSpec, EventStream, Kernel, KernelError, KernelEvent, Strategy, SupervisorSpec,
    TreeExit,
};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use self::actors::{Consumer, ConsumerLink, ConsumerMsg, Crunch, Producer, Progress, Telemetry};
use crate::output::Output;

/// The fault point the producer evaluates on every item.
pub const FAULT_POINT: &str = "kernel.demo";
/// What the demo injects when the environment does not configure the point: one panic.
const INJECTED: &str = "1*panic->off";
const ROOT: &str = "llmos";
const PRODUCER: &str = "llmos/workers/producer";
const CONSUMER: &str = "llmos/workers/consumer";
/// Items that must reach the consumer before a crash is injected and after a restart: proof
/// that the pipeline works, rather than a guess that it had time to.
const FLOW_ITEMS: u64 = 3;
/// When the environment configures the point, the demo cannot know when (or whether) it
/// fires; this many items without a failure ends the wait.
const QUIET_ITEMS: u64 = 100;
/// Bound on any single wait of the demo: reached only if something is broken.
const GUARD: Duration = Duration::from_secs(10);

/// Arguments of `llmos demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many times to crash the producer; more than 3 within 10 s exceed the `workers`
    /// supervisor's restart intensity and escalate to the root.
    #[arg(long, value_name = "N", default_value_t = 1)]
    crashes: u32,

    /// After the crashes, print `ready` and keep the tree running until SIGINT or SIGTERM,
    /// then shut it down in order.
    #[arg(long)]
    until_signal: bool,
}

/// Why the demo could not complete.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The tree did not boot (including a bad `LLMOS_FAILPOINTS`).
    #[error("cannot boot the demo tree")]
    Boot(#[source] KernelError),
    /// A kernel operation failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// Failures escalated past the root supervisor.
    #[error("the supervision tree failed: {0}")]
    TreeFailed(String),
    /// Something the demo waits for did not happen.
    #[error("no {0} within {GUARD:?}")]
    Stalled(&'static str),
    /// Stdout is gone (e.g. a closed pipe).
    #[error("cannot write the demo's output")]
    Output(#[from] std::io::Error),
}

/// Runs the demo to its end.
pub async fn run(args: DemoArgs, out: Output) -> Result<(), DemoError> {
    faults::declare(
        FAULT_POINT,
        "the demo's producer fails while producing an item (evaluated once per item)",
    );
    let (link, link_rx) = watch::channel(None);
    let progress = Arc::new(watch::Sender::new(Progress::default()));
    let kernel = Kernel::boot(ROOT, tree(link_rx, progress.clone()))
        .await
        .map_err(DemoError::Boot)?;
    let mut demo = Demo {
        events: kernel.subscribe(),
        progress: progress.subscribe(),
        kernel,
        out,
    };
    // Only now, with the subscription in place, may items (and so faults) happen.
    link.send_replace(Some(demo.kernel.addr::<ConsumerMsg>(CONSUMER)?));

    let configured = faults::list()
        .into_iter()
        .find(|point| point.name == FAULT_POINT)
        .and_then(|point| point.actions);
    demo.out.record(
        || match &configured {
            Some(actions) => {
                format!(
                    "fault point {FAULT_POINT}={actions} (from {})",
                    faults::ENV_VAR
                )
            }
            None => format!("fault point {FAULT_POINT}: the demo injects {INJECTED}"),
        },
        || {
            json!({
                "event": "fault_point",
                "point": FAULT_POINT,
                "actions": configured.as_deref().unwrap_or(INJECTED),
                "source": if configured.is_some() { faults::ENV_VAR } else { "demo" },
            })
        },
    )?;
    demo.out.tree("booted", &demo.kernel.snapshot())?;

    let crashes = demo.crash(args.crashes, configured.as_deref()).await?;
    demo.wait_for_items(FLOW_ITEMS, "items after the restart")
        .await?;
    let progress = *demo.progress.borrow();
    demo.out.record(
        || {
            format!(
                "flow       the consumer received {} items in all, summing {} since its last start",
                progress.received, progress.sum
            )
        },
        || json!({ "event": "flow", "received": progress.received, "sum": progress.sum }),
    )?;
    let label = format!(
        "after {crashes} crash{}",
        if crashes == 1 { "" } else { "es" }
    );
    demo.out.tree(&label, &demo.kernel.snapshot())?;

    demo.finish(args.until_signal).await
}

/// The demo tree, children in start order:
///
/// ```text
/// llmos            one_for_one
/// ├─ telemetry     worker
/// ├─ workers       rest_for_one, 3 restarts in 10 s
/// │  ├─ producer   worker: evaluates `kernel.demo` per item, sends to the consumer
/// │  └─ consumer   worker: sums the items
/// └─ watchdog-demo blocking worker with a 200 ms heartbeat deadline
/// ```
fn tree(link: ConsumerLink, progress: Arc<watch::Sender<Progress>>) -> SupervisorSpec {
    // rest_for_one: the consumer depends on its producer, so a producer crash restarts both.
    let workers = SupervisorSpec::new(Strategy::RestForOne)
        .intensity(3, Duration::from_secs(10))
        .child(ChildSpec::worker("producer", move |_ctx| {
            (Producer::new(link.clone()), ())
        }))
        .child(ChildSpec::worker("consumer", move |_ctx| {
            (Consumer::new(progress.clone()), ())
        }));
    SupervisorSpec::new(Strategy::OneForOne)
        .child(ChildSpec::worker("telemetry", |_ctx| (Telemetry, ())))
        .child(ChildSpec::supervisor("workers", workers))
        .child(
            ChildSpec::worker("watchdog-demo", |ctx| {
                (Crunch::new(ctx.heartbeat().cloned()), ())
            })
            .blocking(Duration::from_millis(200)),
        )
}

/// What ended a wait.
enum Woke {
    /// An event matched.
    Event,
    /// The consumer reached the item count.
    Items,
}

struct Demo {
    kernel: Kernel,
    events: EventStream,
    progress: watch::Receiver<Progress>,
    out: Output,
}

impl Demo {
    /// Crashes the producer `count` times, each time waiting for the restart to complete;
    /// returns the number of crashes seen. With the point configured from the environment
    /// the demo injects nothing and waits for the configured actions to fail the producer.
    async fn crash(&mut self, count: u32, configured: Option<&str>) -> Result<u32, DemoError> {
        let failed = |e: &KernelEvent| matches!(e, KernelEvent::Failed { path, .. } if path.as_str() == PRODUCER);
        let mut crashes = 0;
        for crash in 1..=count {
            match configured {
                None => {
                    self.wait_for_items(FLOW_ITEMS, "items reaching the consumer")
                        .await?;
                    faults::configure(FAULT_POINT, INJECTED)?;
                    self.out.record(
                        || format!("inject     {FAULT_POINT}={INJECTED} (crash {crash} of {count})"),
                        || json!({ "event": "inject", "point": FAULT_POINT, "actions": INJECTED, "crash": crash }),
                    )?;
                    self.wait(None, "failure of the producer", failed).await?;
                }
                Some(actions) => {
                    let target = self.progress.borrow().received + QUIET_ITEMS;
                    if let Woke::Items = self
                        .wait(Some(target), "failure of the producer", failed)
                        .await?
                    {
                        self.out.record(
                            || format!("no crash   {FAULT_POINT}={actions} let {QUIET_ITEMS} items through"),
                            || json!({ "event": "no_crash", "point": FAULT_POINT, "actions": actions, "items": QUIET_ITEMS }),
                        )?;
                        break;
                    }
                }
            }
            crashes += 1;
            // rest_for_one restarts the producer, then the consumer; so does a restart of
            // the whole `workers` supervisor after an escalation.
            self.wait(
                None,
                "restart of the consumer",
                |e| matches!(e, KernelEvent::Started { path, .. } if path.as_str() == CONSUMER),
            )
            .await?;
        }
        Ok(crashes)
    }

    /// Waits until `more` items reached the consumer, printing kernel events meanwhile.
    async fn wait_for_items(&mut self, more: u64, what: &'static str) -> Result<(), DemoError> {
        let target = self.progress.borrow().received + more;
        self.wait(Some(target), what, |_| false).await.map(drop)
    }

    /// Prints kernel events as they come until one matches `done`, or until the consumer
    /// has received `items` in all. A failed root ends the wait with an error.
    async fn wait(
        &mut self,
        items: Option<u64>,
        what: &'static str,
        mut done: impl FnMut(&KernelEvent) -> bool,
    ) -> Result<Woke, DemoError> {
        let deadline = Instant::now() + GUARD;
        let mut progress = self.progress.clone();
        loop {
            let reached = async {
                match items {
                    Some(target) => progress.wait_for(|p| p.received >= target).await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                event = self.events.next() => event.ok_or(DemoError::Stalled(what))?,
                reached = reached => {
                    return if reached { Ok(Woke::Items) } else { Err(DemoError::Stalled(what)) };
                }
                () = tokio::time::sleep_until(deadline) => return Err(DemoError::Stalled(what)),
            };
            self.out.event(&event)?;
            if let KernelEvent::RootFailed { reason } = event {
                return Err(DemoError::TreeFailed(reason));
            }
            if done(&event) {
                return Ok(Woke::Event);
            }
        }
    }

    /// Shuts the tree down (now, or on a signal), printing each stop as it happens.
    async fn finish(mut self, until_signal: bool) -> Result<(), DemoError> {
        let kernel = self.kernel.clone();
        let exit = if until_signal {
            // The handler is installed before `ready` is printed, so a signal sent on
            // `ready` always reaches it.
            let until_signal = kernel.shutdown_on_signal()?;
            self.out.ready()?;
            self.print_events_until(pin!(until_signal)).await?
        } else {
            self.print_events_until(pin!(kernel.shutdown("demo finished")))
                .await?
        };
        match exit {
            TreeExit::Shutdown => Ok(()),
            TreeExit::RootFailed(reason) => Err(DemoError::TreeFailed(reason)),
        }
    }

    /// Drives `until` to completion, printing kernel events as they happen.
    async fn print_events_until<T>(
        &mut self,
        mut until: Pin<&mut impl Future<Output = T>>,
    ) -> Result<T, DemoError> {
        let value = loop {
            tokio::select! {
                value = &mut until => break value,
                event = self.events.next() => match event {
                    Some(event) => self.out.event(&event)?,
                    // Only if the kernel were gone; nothing more to print, just finish.
                    None => break until.await,
                },
            }
        };
        // The kernel publishes before it returns: what is queued now happened before the end.
        while let Some(event) = self.events.try_next() {
            self.out.event(&event)?;
        }
        Ok(value)
    }
}
