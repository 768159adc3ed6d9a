//! Child and supervisor specifications: what to start, how to restart it, how to stop it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use ractor::{Actor, ActorCell};
use serde::Serialize;

use crate::backoff::Backoff;
use crate::heartbeat::Heartbeat;
use crate::kernel::KernelShared;
use crate::managed::Managed;
use crate::path::ActorPath;
use crate::registry::NodeEntry;
use crate::supervisor::{SupervisorActor, SupervisorInit};

/// When a child that exited is restarted (Erlang's restart types).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartType {
    /// Always restarted, whatever the exit reason.
    Permanent,
    /// Restarted only after an abnormal exit (failure, panic, hang, kill).
    Transient,
    /// Never restarted; removed from its supervisor when it exits.
    Temporary,
}

/// How a child is stopped when its supervisor stops it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Shutdown {
    /// Killed at once, without running its `post_stop`.
    Kill,
    /// Asked to stop; killed if it has not stopped within the duration.
    Timeout(Duration),
    /// Asked to stop and waited for without limit (the default for supervisors).
    Infinity,
}

/// Which children a supervisor restarts when one of them must be restarted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Only the child that exited.
    OneForOne,
    /// All children: the others are stopped (in reverse order) and all restarted in order.
    OneForAll,
    /// The child that exited and every child started after it.
    RestForOne,
    /// Children added and removed at run time (Erlang's `simple_one_for_one`); each child is
    /// restarted on its own, and a child that will not be restarted is removed.
    Dynamic,
}

/// Restart intensity: at most `max_restarts` restarts within `period`; one more and the
/// supervisor stops its children and fails upward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Intensity {
    /// Restarts allowed within the period.
    pub max_restarts: u32,
    /// The sliding window.
    pub period: Duration,
}

impl Default for Intensity {
    /// OTP's default: 1 restart in 5 seconds is far too strict for a server, so the kernel
    /// uses 10 restarts in 10 seconds.
    fn default() -> Self {
        Self {
            max_restarts: 10,
            period: Duration::from_secs(10),
        }
    }
}

/// What a start function receives: where the child sits in the tree and the kernel
/// services it may use.
pub struct StartContext {
    /// The supervisor the child must link to (`Actor::spawn_linked(…, ctx.supervisor())`).
    pub(crate) supervisor: ActorCell,
    pub(crate) node: Arc<NodeEntry>,
    pub(crate) kernel: Arc<KernelShared>,
    pub(crate) heartbeat: Option<Heartbeat>,
}

impl StartContext {
    /// The supervisor to link the new actor to.
    pub fn supervisor(&self) -> ActorCell {
        self.supervisor.clone()
    }

    /// The child's stable path.
    pub fn path(&self) -> &ActorPath {
        &self.node.path
    }

    /// The heartbeat of this instance, for children declared as doing blocking work.
    /// A new instance gets a new heartbeat; the previous one is abandoned.
    pub fn heartbeat(&self) -> Option<&Heartbeat> {
        self.heartbeat.as_ref()
    }

    /// A stable address of another actor of the tree, e.g. a sibling started earlier (or
    /// later: its address waits for it like for a restart).
    pub fn addr<M: ractor::Message>(&self, path: &str) -> crate::Result<crate::Addr<M>> {
        self.kernel.addr(path)
    }

    /// Counts one handled message for this node (used by start functions that spawn actors
    /// not wrapped by [`ChildSpec::worker`]).
    pub fn count_message(&self) {
        self.node.count_message();
    }
}

/// The start function of a child: called once at start and again at every restart.
pub type StartFn =
    Arc<dyn Fn(StartContext) -> BoxFuture<'static, Result<ActorCell, String>> + Send + Sync>;

/// Everything a supervisor needs to know to run one child.
#[derive(Clone)]
pub struct ChildSpec {
    pub(crate) name: String,
    pub(crate) start: StartFn,
    pub(crate) restart: RestartType,
    pub(crate) shutdown: Shutdown,
    /// Deadline between heartbeats for a child doing blocking work; `None` for ordinary actors.
    pub(crate) heartbeat_deadline: Option<Duration>,
    pub(crate) kind: ChildKind,
}

#[derive(Clone)]
pub(crate) enum ChildKind {
    Worker,
    Supervisor(Box<SupervisorSpec>),
}

impl ChildSpec {
    /// A child started by an arbitrary start function. The function must spawn an actor
    /// linked to `ctx.supervisor()` and return its cell; an `Err` is a failed start.
    pub fn new<F, Fut>(name: impl Into<String>, start: F) -> Self
    where
        F: Fn(StartContext) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<ActorCell, String>> + Send + 'static,
    {
        Self {
            name: name.into(),
            start: Arc::new(move |ctx| Box::pin(start(ctx))),
            restart: RestartType::Permanent,
            shutdown: Shutdown::Timeout(Duration::from_secs(5)),
            heartbeat_deadline: None,
            kind: ChildKind::Worker,
        }
    }

    /// A worker actor: `make` builds the actor and its start arguments for each instance.
    /// The kernel wraps the actor to count handled messages.
    pub fn worker<A, F>(name: impl Into<String>, make: F) -> Self
    where
        A: Actor,
        F: Fn(&StartContext) -> (A, A::Arguments) + Send + Sync + 'static,
    {
        let make = Arc::new(make);
        Self::new(name, move |ctx: StartContext| {
            let make = make.clone();
            async move {
                let (actor, args) = make(&ctx);
                let managed = Managed::new(actor, ctx.node.clone());
                Actor::spawn_linked(None, managed, args, ctx.supervisor())
                    .await
                    .map(|(actor_ref, _join)| actor_ref.get_cell())
                    .map_err(|err| spawn_error_text(&err))
            }
        })
    }

    /// A nested supervisor with its own strategy and children.
    pub fn supervisor(name: impl Into<String>, spec: SupervisorSpec) -> Self {
        let boxed = Box::new(spec.clone());
        let mut child = Self::new(name, move |ctx: StartContext| {
            let spec = spec.clone();
            async move {
                let init = SupervisorInit {
                    spec,
                    node: ctx.node.clone(),
                    kernel: ctx.kernel.clone(),
                };
                Actor::spawn_linked(None, SupervisorActor, init, ctx.supervisor())
                    .await
                    .map(|(actor_ref, _join)| actor_ref.get_cell())
                    .map_err(|err| spawn_error_text(&err))
            }
        });
        child.shutdown = Shutdown::Infinity;
        child.kind = ChildKind::Supervisor(boxed);
        child
    }

    /// Sets the restart type (default: permanent).
    pub fn restart(mut self, restart: RestartType) -> Self {
        self.restart = restart;
        self
    }

    /// Sets how the child is stopped (default: 5 s timeout, then kill; supervisors: infinity).
    pub fn shutdown(mut self, shutdown: Shutdown) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Declares that the child does blocking work and must beat its [`Heartbeat`] at least
    /// once per `deadline` while busy; a missed deadline is a failure.
    pub fn blocking(mut self, deadline: Duration) -> Self {
        self.heartbeat_deadline = Some(deadline);
        self
    }

    /// The child's name (last path segment).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn is_supervisor(&self) -> bool {
        matches!(self.kind, ChildKind::Supervisor(_))
    }
}

impl fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildSpec")
            .field("name", &self.name)
            .field("restart", &self.restart)
            .field("shutdown", &self.shutdown)
            .field("heartbeat_deadline", &self.heartbeat_deadline)
            .field("supervisor", &self.is_supervisor())
            .finish()
    }
}

/// A supervisor's policy and its initial children (in start order).
#[derive(Clone, Debug)]
pub struct SupervisorSpec {
    pub(crate) strategy: Strategy,
    pub(crate) intensity: Intensity,
    pub(crate) backoff: Backoff,
    pub(crate) children: Vec<ChildSpec>,
    pub(crate) max_children: Option<usize>,
}

impl SupervisorSpec {
    /// A supervisor with this strategy, default intensity, no backoff and no children.
    pub fn new(strategy: Strategy) -> Self {
        Self {
            strategy,
            intensity: Intensity::default(),
            backoff: Backoff::none(),
            children: Vec::new(),
            max_children: None,
        }
    }

    /// Sets the restart intensity.
    pub fn intensity(mut self, max_restarts: u32, period: Duration) -> Self {
        self.intensity = Intensity {
            max_restarts,
            period,
        };
        self
    }

    /// Sets the backoff between a failure and the restart.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Appends a child; children start in the order they are added.
    pub fn child(mut self, child: ChildSpec) -> Self {
        self.children.push(child);
        self
    }

    /// Limits the number of children (useful for dynamic supervisors as admission control).
    pub fn max_children(mut self, limit: usize) -> Self {
        self.max_children = Some(limit);
        self
    }

    /// The strategy.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }
}

pub(crate) fn spawn_error_text(err: &ractor::SpawnErr) -> String {
    match err {
        ractor::SpawnErr::StartupFailed(inner) => format!("pre_start failed: {inner}"),
        other => other.to_string(),
    }
}
