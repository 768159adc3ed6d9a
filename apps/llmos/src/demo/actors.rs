//! The demo's actors: a ticking telemetry worker, a producer → consumer pipeline wired
//! through the kernel's stable address, and a worker whose own thread does blocking work
//! and beats its heartbeat.

use std::sync::{mpsc, Arc};
use std::time::Duration;

use llmos_kernel::{Addr, Heartbeat, KernelError};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::FAULT_POINT;

/// Pace of the pipeline: slow enough to read the logs, fast enough for a short demo.
const PRODUCE_EVERY: Duration = Duration::from_millis(20);
const TELEMETRY_EVERY: Duration = Duration::from_millis(100);
/// A job of the blocking worker is this many chunks; it beats once per chunk.
const CHUNKS_PER_JOB: u32 = 50;
const ROUNDS_PER_CHUNK: u32 = 20_000;
/// Idle time between jobs; the heartbeat deadline does not apply while idle.
const PAUSE_BETWEEN_JOBS: Duration = Duration::from_millis(50);

/// Counts its own ticks: the simplest permanent worker, there to be restarted or stopped.
pub struct Telemetry;

/// Messages of [`Telemetry`].
pub enum TelemetryMsg {
    /// One period elapsed.
    Tick,
}

/// State of one [`Telemetry`] instance.
pub struct TelemetryState {
    ticks: u64,
    ticker: JoinHandle<()>,
}

impl Actor for Telemetry {
    type Msg = TelemetryMsg;
    type State = TelemetryState;
    type Arguments = ();

    async fn pre_start(
        &self,
        myself: ActorRef<TelemetryMsg>,
        _args: (),
    ) -> Result<TelemetryState, ActorProcessingErr> {
        Ok(TelemetryState {
            ticks: 0,
            ticker: myself.send_interval(TELEMETRY_EVERY, || TelemetryMsg::Tick),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<TelemetryMsg>,
        state: &mut TelemetryState,
    ) -> Result<(), ActorProcessingErr> {
        state.ticker.abort();
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<TelemetryMsg>,
        message: TelemetryMsg,
        state: &mut TelemetryState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            TelemetryMsg::Tick => {
                state.ticks += 1;
                tracing::trace!(ticks = state.ticks, "telemetry tick");
            }
        }
        Ok(())
    }
}

/// The consumer's stable address once the kernel has booted. A start function has no way to
/// resolve a sibling's [`Addr`], so the demo publishes it here after boot; because the
/// address survives restarts, every later producer instance finds it at once.
pub type ConsumerLink = watch::Receiver<Option<Addr<ConsumerMsg>>>;

/// Sends numbered items to the consumer, evaluating the demo's fault point on each one.
pub struct Producer {
    link: ConsumerLink,
}

impl Producer {
    /// A producer that starts once `link` holds the consumer's address.
    pub fn new(link: ConsumerLink) -> Self {
        Self { link }
    }
}

/// Messages of [`Producer`].
pub enum ProducerMsg {
    /// The consumer's address is known: start producing.
    Connect(Addr<ConsumerMsg>),
    /// Produce the next item.
    Produce,
}

/// State of one [`Producer`] instance.
#[derive(Default)]
pub struct ProducerState {
    consumer: Option<Addr<ConsumerMsg>>,
    produced: u64,
    ticker: Option<JoinHandle<()>>,
}

impl Actor for Producer {
    type Msg = ProducerMsg;
    type State = ProducerState;
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ActorRef<ProducerMsg>,
        _args: (),
    ) -> Result<ProducerState, ActorProcessingErr> {
        Ok(ProducerState::default())
    }

    async fn post_start(
        &self,
        myself: ActorRef<ProducerMsg>,
        _state: &mut ProducerState,
    ) -> Result<(), ActorProcessingErr> {
        // Waiting here would hold up the actor's mailbox (and its stop signal): wait aside.
        let mut link = self.link.clone();
        tokio::spawn(async move {
            let consumer = link
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|a| a.clone());
            if let Some(consumer) = consumer {
                // Fails only if this instance died meanwhile; its successor connects itself.
                let _ = myself.cast(ProducerMsg::Connect(consumer));
            }
        });
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<ProducerMsg>,
        state: &mut ProducerState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(ticker) = state.ticker.take() {
            ticker.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<ProducerMsg>,
        message: ProducerMsg,
        state: &mut ProducerState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ProducerMsg::Connect(consumer) => {
                if state.consumer.is_none() {
                    state.consumer = Some(consumer);
                    state.ticker =
                        Some(myself.send_interval(PRODUCE_EVERY, || ProducerMsg::Produce));
                }
            }
            ProducerMsg::Produce => {
                let Some(consumer) = &state.consumer else {
                    return Ok(());
                };
                // Once per item, so `N*off->1*panic` crashes the producer on item N+1.
                llmos_kernel::fault_point!(FAULT_POINT);
                state.produced += 1;
                if let Err(undelivered) = consumer.cast(ConsumerMsg::Item(state.produced)).await {
                    match undelivered.error {
                        // In an orderly shutdown the consumer stops before its producer.
                        KernelError::Stopped(_) => {
                            tracing::debug!(item = state.produced, "consumer stopped")
                        }
                        error => tracing::warn!(item = state.produced, %error, "item lost"),
                    }
                }
            }
        }
        Ok(())
    }
}

/// What the consumers have received, shared across instances so the demo can wait for items
/// to flow instead of guessing with sleeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Items received by every instance so far.
    pub received: u64,
    /// Sum of the items received by the current instance.
    pub sum: u64,
}

/// Sums the items it receives.
pub struct Consumer {
    progress: Arc<watch::Sender<Progress>>,
}

impl Consumer {
    /// A consumer reporting to `progress`.
    pub fn new(progress: Arc<watch::Sender<Progress>>) -> Self {
        Self { progress }
    }
}

/// Messages of [`Consumer`].
pub enum ConsumerMsg {
    /// One item to add.
    Item(u64),
}

impl Actor for Consumer {
    type Msg = ConsumerMsg;
    type State = u64;
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ActorRef<ConsumerMsg>,
        _args: (),
    ) -> Result<u64, ActorProcessingErr> {
        self.progress.send_modify(|p| p.sum = 0);
        Ok(0)
    }

    async fn handle(
        &self,
        _myself: ActorRef<ConsumerMsg>,
        message: ConsumerMsg,
        sum: &mut u64,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ConsumerMsg::Item(item) => {
                *sum += item;
                let sum = *sum;
                self.progress.send_modify(|p| {
                    p.received += 1;
                    p.sum = sum;
                });
            }
        }
        Ok(())
    }
}

/// A worker whose real work happens on its own std thread, as model inference will: the
/// thread beats the heartbeat the kernel gave this instance, and the supervisor's watchdog
/// replaces the instance if the thread goes silent for longer than the deadline.
pub struct Crunch {
    heartbeat: Option<Heartbeat>,
}

impl Crunch {
    /// A worker beating `heartbeat` (present only for children declared `.blocking(…)`).
    pub fn new(heartbeat: Option<Heartbeat>) -> Self {
        Self { heartbeat }
    }
}

/// Messages of [`Crunch`].
pub enum CrunchMsg {
    /// The thread finished a job.
    JobDone {
        /// Its result.
        checksum: u64,
    },
}

/// State of one [`Crunch`] instance.
pub struct CrunchState {
    /// Dropping it tells the thread to stop.
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    jobs: u64,
}

impl Actor for Crunch {
    type Msg = CrunchMsg;
    type State = CrunchState;
    type Arguments = ();

    async fn pre_start(
        &self,
        myself: ActorRef<CrunchMsg>,
        _args: (),
    ) -> Result<CrunchState, ActorProcessingErr> {
        let heartbeat = self
            .heartbeat
            .clone()
            .ok_or("the crunch worker must be declared blocking to get a heartbeat")?;
        let (stop, stopped) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("watchdog-demo".into())
            .spawn(move || crunch(&heartbeat, &stopped, &myself))?;
        Ok(CrunchState {
            stop: Some(stop),
            thread: Some(thread),
            jobs: 0,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<CrunchMsg>,
        state: &mut CrunchState,
    ) -> Result<(), ActorProcessingErr> {
        drop(state.stop.take());
        if let Some(thread) = state.thread.take() {
            // The thread notices within one chunk; joining must not block a runtime worker.
            let joined = tokio::task::spawn_blocking(move || thread.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                return Err("the crunch thread panicked".into());
            }
        }
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<CrunchMsg>,
        message: CrunchMsg,
        state: &mut CrunchState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            CrunchMsg::JobDone { checksum } => {
                state.jobs += 1;
                tracing::trace!(jobs = state.jobs, checksum, "crunch job done");
            }
        }
        Ok(())
    }
}

/// The blocking loop: busy jobs with a beat per chunk, idle pauses between them. Ends when
/// its actor drops the stop sender or the supervisor abandons this instance.
fn crunch(heartbeat: &Heartbeat, stop: &mpsc::Receiver<()>, report: &ActorRef<CrunchMsg>) {
    let mut checksum: u64 = 0x9E37_79B9_7F4A_7C15;
    loop {
        for _ in 0..CHUNKS_PER_JOB {
            // Abandoned: a replacement owns the work now, so this instance must not go on.
            if heartbeat.beat().is_err() {
                return;
            }
            checksum = mix(checksum);
            if !matches!(stop.try_recv(), Err(mpsc::TryRecvError::Empty)) {
                return;
            }
        }
        if heartbeat.check().is_err() || report.cast(CrunchMsg::JobDone { checksum }).is_err() {
            return;
        }
        heartbeat.idle();
        if !matches!(
            stop.recv_timeout(PAUSE_BETWEEN_JOBS),
            Err(mpsc::RecvTimeoutError::Timeout)
        ) {
            return;
        }
    }
}

/// Some CPU work that cannot be optimised away (splitmix64 rounds).
fn mix(mut x: u64) -> u64 {
    for _ in 0..ROUNDS_PER_CHUNK {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x = std::hint::black_box(z ^ (z >> 31));
    }
    x
}
