//! The kernel handle: boots a supervision tree, addresses its actors by path, changes it at
//! run time, snapshots it, and shuts it down in order (on request or on SIGINT/SIGTERM).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, Message, SupervisionEvent};
use tokio::sync::{broadcast, watch};

use crate::addr::Addr;
use crate::error::{KernelError, Result};
use crate::events::{EventBus, EventStream, KernelEvent};
use crate::path::{validate_name, ActorPath};
use crate::registry::{NodeEntry, Registry, Slot};
use crate::snapshot::{NodeKind, TreeSnapshot};
use crate::spec::{ChildSpec, SupervisorSpec};
use crate::supervisor::{SupervisorActor, SupervisorInit, SupervisorMsg};

/// State shared by the kernel handle and every supervisor of one tree.
pub(crate) struct KernelShared {
    pub(crate) registry: Registry,
    events: EventBus,
    shutting_down: AtomicBool,
    exit: watch::Sender<Option<TreeExit>>,
}

impl KernelShared {
    pub(crate) fn publish(&self, event: KernelEvent) {
        self.events.publish(event);
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    pub(crate) fn addr<M: Message>(&self, path: &str) -> Result<Addr<M>> {
        let node = self
            .registry
            .get(&ActorPath::from(path))
            .ok_or_else(|| KernelError::NotFound(path.to_string()))?;
        if let Slot::Running(cell) = node.current() {
            if cell.is_message_type_of::<M>() == Some(false) {
                return Err(KernelError::WrongMessageType {
                    path: path.to_string(),
                    expected: std::any::type_name::<M>(),
                });
            }
        }
        Ok(Addr::new(node))
    }
}

/// How the tree ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TreeExit {
    /// Orderly shutdown completed.
    Shutdown,
    /// The root supervisor failed: restart intensity exceeded at the top, or it crashed.
    RootFailed(String),
}

/// A running supervision tree. Cheap to clone; every clone controls the same tree.
#[derive(Clone)]
pub struct Kernel {
    shared: Arc<KernelShared>,
    root: ActorCell,
    root_path: ActorPath,
}

/// The actor above the root supervisor: turns the root's exit into a [`TreeExit`].
struct Guardian;

impl Actor for Guardian {
    type Msg = ();
    type State = Arc<KernelShared>;
    type Arguments = Arc<KernelShared>;

    async fn pre_start(
        &self,
        _myself: ActorRef<()>,
        shared: Arc<KernelShared>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(shared)
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<()>,
        event: SupervisionEvent,
        shared: &mut Arc<KernelShared>,
    ) -> Result<(), ActorProcessingErr> {
        let exit = match event {
            SupervisionEvent::ActorFailed(_, err) => TreeExit::RootFailed(err.to_string()),
            SupervisionEvent::ActorTerminated(_, _, Some(reason))
                if reason == "killed" || reason == "actor_task_cancelled" =>
            {
                TreeExit::RootFailed(reason)
            }
            SupervisionEvent::ActorTerminated(..) => TreeExit::Shutdown,
            _ => return Ok(()),
        };
        if let TreeExit::RootFailed(reason) = &exit {
            shared.registry.stop_all(true);
            shared.publish(KernelEvent::RootFailed {
                reason: reason.clone(),
            });
        }
        shared.exit.send_replace(Some(exit));
        myself.stop(None);
        Ok(())
    }
}

impl Kernel {
    /// Boots a tree whose root supervisor is named `root_name` and follows `spec`; returns
    /// once every child has started (in order). Applies `LLMOS_FAILPOINTS` first.
    pub async fn boot(root_name: &str, spec: SupervisorSpec) -> Result<Kernel> {
        validate_name(root_name).map_err(|reason| KernelError::InvalidSpec {
            path: root_name.to_string(),
            reason,
        })?;
        crate::faults::configure_from_env()?;
        let shared = Arc::new(KernelShared {
            registry: Registry::default(),
            events: EventBus::default(),
            shutting_down: AtomicBool::new(false),
            exit: watch::Sender::new(None),
        });
        let root_path = ActorPath::root(root_name);
        let node = shared.registry.ensure(
            root_path.clone(),
            NodeKind::Supervisor {
                strategy: spec.strategy,
                restart: None,
            },
        );
        let (guardian, _) = Actor::spawn(None, Guardian, shared.clone())
            .await
            .map_err(|err| KernelError::StartFailed {
                path: "guardian".into(),
                reason: err.to_string(),
            })?;
        let init = SupervisorInit {
            spec,
            node: node.clone(),
            kernel: shared.clone(),
        };
        let (root, _) = Actor::spawn_linked(None, SupervisorActor, init, guardian.get_cell())
            .await
            .map_err(|err| {
                guardian.stop(None);
                KernelError::StartFailed {
                    path: root_path.to_string(),
                    reason: crate::spec::spawn_error_text(&err),
                }
            })?;
        let restarts = node.on_running(root.get_cell());
        shared.publish(KernelEvent::Started {
            path: root_path.clone(),
            restarts,
        });
        Ok(Kernel {
            shared,
            root: root.get_cell(),
            root_path,
        })
    }

    /// Whether an orderly shutdown has begun (no child starts from then on).
    pub fn is_shutting_down(&self) -> bool {
        self.shared.is_shutting_down()
    }

    /// The root supervisor's path.
    pub fn root_path(&self) -> &ActorPath {
        &self.root_path
    }

    fn node(&self, path: &str) -> Result<Arc<NodeEntry>> {
        self.shared
            .registry
            .get(&ActorPath::from(path))
            .ok_or_else(|| KernelError::NotFound(path.to_string()))
    }

    /// A stable, typed address of the actor at `path` (valid across its restarts).
    pub fn addr<M: Message>(&self, path: &str) -> Result<Addr<M>> {
        self.shared.addr(path)
    }

    fn supervisor(&self, path: &str) -> Result<Addr<SupervisorMsg>> {
        let node = self.node(path)?;
        if !matches!(node.kind, NodeKind::Supervisor { .. }) {
            return Err(KernelError::NotASupervisor(path.to_string()));
        }
        Ok(Addr::new(node))
    }

    fn parent_of(&self, path: &str) -> Result<(Addr<SupervisorMsg>, String)> {
        let node = self.node(path)?;
        let parent = node.path.parent().ok_or_else(|| KernelError::InvalidSpec {
            path: path.to_string(),
            reason: "the root has no supervisor to act on it".into(),
        })?;
        Ok((
            self.supervisor(parent.as_str())?,
            node.path.name().to_string(),
        ))
    }

    /// Adds a child to the supervisor at `supervisor` and starts it; returns its path. A
    /// failed start is returned as [`KernelError::StartFailed`] and the child is not kept.
    pub async fn start_child(&self, supervisor: &str, spec: ChildSpec) -> Result<ActorPath> {
        self.supervisor(supervisor)?
            .call(|reply| SupervisorMsg::StartChild(spec, reply), None)
            .await?
    }

    /// Stops the child at `path` (within its shutdown timeout) and removes it.
    pub async fn terminate_child(&self, path: &str) -> Result<()> {
        let (parent, name) = self.parent_of(path)?;
        parent
            .call(|reply| SupervisorMsg::TerminateChild(name, reply), None)
            .await?
    }

    /// Stops and starts the child at `path` again (an operator restart, not a failure).
    pub async fn restart_child(&self, path: &str) -> Result<()> {
        let (parent, name) = self.parent_of(path)?;
        parent
            .call(|reply| SupervisorMsg::RestartChild(name, reply), None)
            .await?
    }

    /// Kills the current instance at `path` as a crash would: its supervisor sees an
    /// abnormal exit and applies its strategy.
    pub fn kill(&self, path: &str) -> Result<()> {
        match self.node(path)?.current() {
            Slot::Running(cell) => {
                cell.kill();
                Ok(())
            }
            Slot::Pending => Err(KernelError::Unavailable {
                path: path.to_string(),
                waited: Duration::ZERO,
            }),
            Slot::Stopped => Err(KernelError::Stopped(path.to_string())),
        }
    }

    /// A snapshot of the whole live tree.
    pub fn snapshot(&self) -> TreeSnapshot {
        let root = self
            .shared
            .registry
            .get(&self.root_path)
            .map(|node| node.snapshot(std::time::Instant::now()));
        TreeSnapshot {
            root: root.unwrap_or_else(|| {
                // The root entry lives as long as the kernel; this only runs if it was removed.
                crate::snapshot::NodeSnapshot {
                    path: self.root_path.clone(),
                    name: self.root_path.name().to_string(),
                    kind: NodeKind::Supervisor {
                        strategy: crate::spec::Strategy::OneForOne,
                        restart: None,
                    },
                    state: crate::snapshot::NodeState::Stopped,
                    restarts: 0,
                    last_failure: None,
                    uptime_secs: 0.0,
                    messages_handled: 0,
                    hangs: 0,
                    reliability: crate::snapshot::Reliability::compute(
                        Duration::ZERO,
                        0,
                        Duration::ZERO,
                        0,
                        None,
                    ),
                    children: Vec::new(),
                }
            }),
        }
    }

    /// Subscribes to every kernel event from now on.
    pub fn subscribe(&self) -> EventStream {
        self.shared.events.subscribe()
    }

    /// Stops the whole tree: children in reverse start order, each within its shutdown
    /// timeout, recursively. Idempotent.
    pub async fn shutdown(&self, reason: &str) -> TreeExit {
        if !self.shared.shutting_down.swap(true, Ordering::AcqRel) {
            self.shared.publish(KernelEvent::ShutdownStarted {
                reason: reason.to_string(),
            });
            let _ = self
                .root
                .stop_and_wait(Some(format!("shutdown: {reason}")), None)
                .await;
            let exit = self.wait().await;
            self.shared.registry.stop_all(false);
            self.shared.publish(KernelEvent::ShutdownComplete);
            return exit;
        }
        self.wait().await
    }

    /// Waits until the tree has ended (shutdown or root failure).
    pub async fn wait(&self) -> TreeExit {
        let mut exit = self.shared.exit.subscribe();
        loop {
            if let Some(done) = exit.borrow_and_update().clone() {
                return done;
            }
            if exit.changed().await.is_err() {
                return TreeExit::Shutdown;
            }
        }
    }

    /// Installs the SIGINT/SIGTERM handler now and returns a future that, on the first
    /// signal, shuts the tree down in order (or ends early if the root fails first).
    /// Subscribing happens before this returns, so a signal raised right after is not missed.
    pub fn shutdown_on_signal(
        &self,
    ) -> Result<impl std::future::Future<Output = TreeExit> + Send + 'static> {
        let mut signals = signal_receiver()?;
        let kernel = self.clone();
        Ok(async move {
            tokio::select! {
                _ = signals.recv() => kernel.shutdown("signal").await,
                exit = kernel.wait() => exit,
            }
        })
    }

    /// Runs until SIGINT/SIGTERM (then shuts down in order) or until the root fails.
    pub async fn run_until_signal(&self) -> Result<TreeExit> {
        Ok(self.shutdown_on_signal()?.await)
    }
}

/// One process-wide SIGINT/SIGTERM handler (ctrlc allows only one), fanned out.
fn signal_receiver() -> Result<broadcast::Receiver<()>> {
    static SIGNALS: OnceLock<std::result::Result<broadcast::Sender<()>, String>> = OnceLock::new();
    let sender = SIGNALS.get_or_init(|| {
        let (tx, _) = broadcast::channel(4);
        let handler_tx = tx.clone();
        ctrlc::set_handler(move || {
            let _ = handler_tx.send(());
        })
        .map(|()| tx)
        .map_err(|err| err.to_string())
    });
    match sender {
        Ok(tx) => Ok(tx.subscribe()),
        Err(reason) => Err(KernelError::Signal(reason.clone())),
    }
}
