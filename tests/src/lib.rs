//! Test actors and helpers shared by the integration tests: a probe worker whose every
//! life-cycle step is recorded, event-synchronised waits, and an HTTP/SSE client
//! ([`http`]) for tests and benchmarks that drive a real server.

pub mod http;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llmos_kernel::ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use llmos_kernel::{ChildSpec, EventStream, KernelEvent};

/// Upper bound on any single event wait: a guard against hangs, never a synchronisation.
pub const WAIT: Duration = Duration::from_secs(10);

/// Shared record of life-cycle steps (`"start a"`, `"stop a"`) in the order they happened.
#[derive(Clone, Default)]
pub struct Journal(Arc<Mutex<Vec<String>>>);

impl Journal {
    /// Appends one entry.
    pub fn push(&self, entry: impl Into<String>) {
        self.0.lock().unwrap().push(entry.into());
    }

    /// Everything recorded so far.
    pub fn entries(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// Entries starting with `prefix`, prefix removed.
    pub fn with_prefix(&self, prefix: &str) -> Vec<String> {
        self.entries()
            .iter()
            .filter_map(|e| e.strip_prefix(prefix).map(str::to_string))
            .collect()
    }

    /// Forgets everything.
    pub fn clear(&self) {
        self.0.lock().unwrap().clear();
    }
}

/// Messages a [`Probe`] understands.
#[derive(Debug)]
pub enum ProbeMsg {
    /// Answers with the instance number (1 for the first instance, 2 after one restart…).
    Ping(RpcReplyPort<u64>),
    /// Records `note` in the journal as `"<name> got <note>"`.
    Note(String),
    /// Panics in the handler.
    Panic,
    /// Returns an error from the handler.
    Fail,
    /// Stops normally.
    Stop,
}

/// How a probe's `pre_start` behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartBehaviour {
    /// Starts normally.
    Ok,
    /// `pre_start` returns an error.
    Fail,
    /// `pre_start` fails for the first `n` instances started after this is set, then works.
    FailTimes(u64),
}

/// A worker that records `start NAME` / `stop NAME` and answers pings with its instance
/// number, counted across restarts.
pub struct Probe {
    name: String,
    journal: Journal,
    instances: Arc<AtomicU64>,
    start: Arc<Mutex<StartBehaviour>>,
    stop_delay: Option<Duration>,
}

/// Handle kept by the test to observe and steer a probe across its restarts.
#[derive(Clone)]
pub struct ProbeControl {
    /// Instances started so far (successful starts).
    pub instances: Arc<AtomicU64>,
    /// The next starts' behaviour.
    pub start: Arc<Mutex<StartBehaviour>>,
}

impl ProbeControl {
    /// Successful starts so far.
    pub fn started(&self) -> u64 {
        self.instances.load(Ordering::SeqCst)
    }

    /// Sets how the next starts behave.
    pub fn set_start(&self, behaviour: StartBehaviour) {
        *self.start.lock().unwrap() = behaviour;
    }
}

/// A child spec running a [`Probe`] named `name`, plus its control handle.
pub fn probe(name: &str, journal: &Journal) -> (ChildSpec, ProbeControl) {
    probe_with(name, journal, None)
}

/// Like [`probe`], with a `post_stop` that takes `stop_delay` (to exercise shutdown timeouts).
pub fn probe_with(
    name: &str,
    journal: &Journal,
    stop_delay: Option<Duration>,
) -> (ChildSpec, ProbeControl) {
    let control = ProbeControl {
        instances: Arc::new(AtomicU64::new(0)),
        start: Arc::new(Mutex::new(StartBehaviour::Ok)),
    };
    let (name_owned, journal, ctl) = (name.to_string(), journal.clone(), control.clone());
    let spec = ChildSpec::worker(name, move |_ctx| {
        (
            Probe {
                name: name_owned.clone(),
                journal: journal.clone(),
                instances: ctl.instances.clone(),
                start: ctl.start.clone(),
                stop_delay,
            },
            (),
        )
    });
    (spec, control)
}

/// State of one probe instance.
pub struct ProbeState {
    instance: u64,
}

impl Actor for Probe {
    type Msg = ProbeMsg;
    type State = ProbeState;
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ActorRef<ProbeMsg>,
        _args: (),
    ) -> Result<ProbeState, ActorProcessingErr> {
        let fail = {
            let mut start = self.start.lock().unwrap();
            match *start {
                StartBehaviour::Ok => false,
                StartBehaviour::Fail => true,
                StartBehaviour::FailTimes(0) => {
                    *start = StartBehaviour::Ok;
                    false
                }
                StartBehaviour::FailTimes(n) => {
                    *start = StartBehaviour::FailTimes(n - 1);
                    true
                }
            }
        };
        if fail {
            self.journal.push(format!("failed-start {}", self.name));
            return Err(format!("{} refuses to start", self.name).into());
        }
        let instance = self.instances.fetch_add(1, Ordering::SeqCst) + 1;
        self.journal.push(format!("start {}", self.name));
        Ok(ProbeState { instance })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<ProbeMsg>,
        _state: &mut ProbeState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(delay) = self.stop_delay {
            tokio::time::sleep(delay).await;
        }
        self.journal.push(format!("stop {}", self.name));
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<ProbeMsg>,
        message: ProbeMsg,
        state: &mut ProbeState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ProbeMsg::Ping(reply) => {
                let _ = reply.send(state.instance);
            }
            ProbeMsg::Note(note) => self.journal.push(format!("{} got {note}", self.name)),
            ProbeMsg::Panic => panic!("{} was told to panic", self.name),
            ProbeMsg::Fail => return Err(format!("{} was told to fail", self.name).into()),
            ProbeMsg::Stop => myself.stop(Some("done".into())),
        }
        Ok(())
    }
}

/// Waits for the supervisor at `supervisor` to finish handling an exit of `child`.
pub async fn exit_handled(events: &mut EventStream, supervisor: &str, child: &str) -> KernelEvent {
    events
        .wait_for(WAIT, |e| {
            matches!(e, KernelEvent::ExitHandled { supervisor: s, child: c }
                if s.as_str() == supervisor && c.as_str() == child)
        })
        .await
        .unwrap_or_else(|err| panic!("{supervisor} did not handle the exit of {child}: {err}"))
}

/// Waits for `Started` of `path`.
pub async fn started(events: &mut EventStream, path: &str) -> KernelEvent {
    events
        .wait_for(
            WAIT,
            |e| matches!(e, KernelEvent::Started { path: p, .. } if p.as_str() == path),
        )
        .await
        .unwrap_or_else(|err| panic!("{path} did not start: {err}"))
}
