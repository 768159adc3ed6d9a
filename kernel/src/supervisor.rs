//! The supervisor actor: starts children in order, applies its strategy, restart
//! intensity and backoff to their exits, watches heartbeats, stops children in reverse.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use rand_chacha::ChaCha8Rng;

use crate::backoff::Backoff;
use crate::error::KernelError;
use crate::events::KernelEvent;
use crate::heartbeat::Heartbeat;
use crate::kernel::KernelShared;
use crate::path::{validate_name, ActorPath};
use crate::registry::NodeEntry;
use crate::snapshot::NodeKind;
use crate::spec::{
    ChildKind, ChildSpec, Intensity, RestartType, Shutdown, StartContext, Strategy, SupervisorSpec,
};

/// How long a supervisor waits for a killed child to finish terminating before moving on.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// The fault point that fails child starts: `kernel.start=return` fails every start;
/// `kernel.start:PATH=return` fails only the child at PATH.
pub const START_FAULT_POINT: &str = "kernel.start";

pub(crate) struct SupervisorActor;

pub(crate) struct SupervisorInit {
    pub(crate) spec: SupervisorSpec,
    pub(crate) node: Arc<NodeEntry>,
    pub(crate) kernel: Arc<KernelShared>,
}

/// Requests a supervisor serves (from the kernel API and from its own timers).
pub(crate) enum SupervisorMsg {
    StartChild(ChildSpec, RpcReplyPort<Result<ActorPath, KernelError>>),
    TerminateChild(String, RpcReplyPort<Result<(), KernelError>>),
    RestartChild(String, RpcReplyPort<Result<(), KernelError>>),
    /// A backoff delay ran out: start the children waiting on this ticket.
    DelayedRestart(u64),
    /// Check heartbeats of blocking children.
    Watchdog,
}

/// How a child instance ended.
#[derive(Debug, Clone)]
enum Exit {
    Normal(Option<String>),
    Failed(String),
}

struct Instance {
    cell: ActorCell,
    heartbeat: Option<Heartbeat>,
}

struct ChildRecord {
    id: u64,
    spec: ChildSpec,
    node: Arc<NodeEntry>,
    instance: Option<Instance>,
    /// Ticket of the restart this child waits for (group restarts share one).
    pending_restart: Option<u64>,
    /// Restarts of this child within the intensity window: the backoff exponent.
    recent_restarts: VecDeque<Instant>,
}

pub(crate) struct SupervisorState {
    path: ActorPath,
    node: Arc<NodeEntry>,
    kernel: Arc<KernelShared>,
    strategy: Strategy,
    intensity: Intensity,
    backoff: Backoff,
    max_children: Option<usize>,
    rng: ChaCha8Rng,
    restarts: VecDeque<Instant>,
    children: Vec<ChildRecord>,
    next_id: u64,
    watchdog: Option<(Duration, tokio::task::JoinHandle<()>)>,
}

impl Actor for SupervisorActor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorInit;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        init: SupervisorInit,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let SupervisorInit { spec, node, kernel } = init;
        let mut state = SupervisorState {
            path: node.path.clone(),
            node: node.clone(),
            kernel,
            strategy: spec.strategy,
            intensity: spec.intensity,
            rng: spec.backoff.rng(),
            backoff: spec.backoff,
            max_children: spec.max_children,
            restarts: VecDeque::new(),
            children: Vec::new(),
            next_id: 0,
            watchdog: None,
        };
        let previous = node.children();
        for child in spec.children {
            state.add_record(child)?;
        }
        // Children added at run time to an earlier instance do not survive its restart.
        for old in previous {
            if !state.children.iter().any(|c| Arc::ptr_eq(&c.node, &old)) {
                state.kernel.registry.remove_subtree(&old);
                state.kernel.publish(KernelEvent::Removed {
                    path: old.path.clone(),
                });
            }
        }
        state.publish_children();
        state.ensure_watchdog(&myself);

        let myself_cell = myself.get_cell();
        let ticket = state.next_ticket();
        for rec in &mut state.children {
            rec.pending_restart = Some(ticket);
        }
        if let Err((id, reason)) = state.start_group(&myself_cell, ticket).await {
            let queue = VecDeque::from([(id, Exit::Failed(reason))]);
            if let Err(err) = state.process_exits(&myself, queue).await {
                return Err(Box::new(err));
            }
        }
        Ok(state)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let will_return = !state.kernel.is_shutting_down();
        state.stop_all(will_return).await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        message: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        state.node.count_message();
        let outcome = match message {
            SupervisorMsg::StartChild(spec, reply) => {
                let result = state.start_dynamic_child(&myself, spec).await;
                let _ = reply.send(result);
                Ok(())
            }
            SupervisorMsg::TerminateChild(name, reply) => {
                let result = state.terminate_child(&name).await;
                let _ = reply.send(result);
                Ok(())
            }
            SupervisorMsg::RestartChild(name, reply) => {
                let (result, queue) = state.restart_child(&myself, &name).await;
                let _ = reply.send(result);
                state.process_exits(&myself, queue).await
            }
            SupervisorMsg::DelayedRestart(ticket) => {
                match state.start_group(&myself.get_cell(), ticket).await {
                    Ok(()) => Ok(()),
                    Err((id, reason)) => {
                        let queue = VecDeque::from([(id, Exit::Failed(reason))]);
                        state.process_exits(&myself, queue).await
                    }
                }
            }
            SupervisorMsg::Watchdog => {
                let queue = state.check_heartbeats();
                state.process_exits(&myself, queue).await
            }
        };
        outcome.map_err(|err| Box::new(err) as ActorProcessingErr)
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (who, exit) = match event {
            SupervisionEvent::ActorFailed(who, err) => (who, Exit::Failed(err.to_string())),
            SupervisionEvent::ActorTerminated(who, _, reason) => {
                let exit = match reason.as_deref() {
                    Some("killed") => Exit::Failed("killed".into()),
                    Some("actor_task_cancelled") => Exit::Failed("task cancelled".into()),
                    _ => Exit::Normal(reason),
                };
                (who, exit)
            }
            _ => return Ok(()),
        };
        // Events of instances the supervisor already replaced or stopped are stale.
        let Some(rec) = state.children.iter_mut().find(|c| {
            c.instance
                .as_ref()
                .is_some_and(|i| i.cell.get_id() == who.get_id())
        }) else {
            return Ok(());
        };
        if let Some(instance) = rec.instance.take() {
            if let Some(heartbeat) = instance.heartbeat {
                heartbeat.abandon();
            }
        }
        let queue = VecDeque::from([(rec.id, exit)]);
        state
            .process_exits(&myself, queue)
            .await
            .map_err(|err| Box::new(err) as ActorProcessingErr)
    }
}

impl SupervisorState {
    fn next_ticket(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn index_of(&self, id: u64) -> Option<usize> {
        self.children.iter().position(|c| c.id == id)
    }

    fn index_by_name(&self, name: &str) -> Result<usize, KernelError> {
        self.children
            .iter()
            .position(|c| c.spec.name == name)
            .ok_or_else(|| KernelError::NotFound(self.path.child(name).to_string()))
    }

    fn add_record(&mut self, spec: ChildSpec) -> Result<usize, KernelError> {
        let path = self.path.child(&spec.name);
        validate_name(&spec.name).map_err(|reason| KernelError::InvalidSpec {
            path: path.to_string(),
            reason,
        })?;
        if self.children.iter().any(|c| c.spec.name == spec.name) {
            return Err(KernelError::AlreadyExists(path.to_string()));
        }
        let kind = match &spec.kind {
            ChildKind::Worker => NodeKind::Worker {
                restart: spec.restart,
            },
            ChildKind::Supervisor(sup) => NodeKind::Supervisor {
                strategy: sup.strategy,
                restart: Some(spec.restart),
            },
        };
        let node = self.kernel.registry.ensure(path, kind);
        let id = self.next_ticket();
        self.children.push(ChildRecord {
            id,
            spec,
            node,
            instance: None,
            pending_restart: None,
            recent_restarts: VecDeque::new(),
        });
        Ok(self.children.len() - 1)
    }

    fn publish_children(&self) {
        self.node
            .set_children(self.children.iter().map(|c| c.node.clone()).collect());
    }

    fn ensure_watchdog(&mut self, myself: &ActorRef<SupervisorMsg>) {
        let Some(shortest) = self
            .children
            .iter()
            .filter_map(|c| c.spec.heartbeat_deadline)
            .min()
        else {
            return;
        };
        let period = (shortest / 4).max(Duration::from_millis(1));
        if self
            .watchdog
            .as_ref()
            .is_some_and(|(current, _)| *current <= period)
        {
            return;
        }
        if let Some((_, old)) = self.watchdog.take() {
            old.abort();
        }
        let handle = myself.send_interval(period, || SupervisorMsg::Watchdog);
        self.watchdog = Some((period, handle));
    }

    /// Starts one instance of a child and publishes it; `Err` is a failed start.
    async fn start_instance(&mut self, myself: &ActorCell, idx: usize) -> Result<(), String> {
        let rec = &mut self.children[idx];
        rec.pending_restart = None;
        let heartbeat = rec.spec.heartbeat_deadline.map(Heartbeat::new);
        let ctx = StartContext {
            supervisor: myself.clone(),
            node: rec.node.clone(),
            kernel: self.kernel.clone(),
            heartbeat: heartbeat.clone(),
        };
        let path = rec.node.path.clone();
        let injected = injected_start_failure(&path);
        let started = match injected {
            Some(reason) => Err(reason),
            None => (rec.spec.start)(ctx).await,
        };
        match started {
            Ok(cell) => {
                let restarts = rec.node.on_running(cell.clone());
                rec.instance = Some(Instance { cell, heartbeat });
                self.kernel.publish(KernelEvent::Started { path, restarts });
                Ok(())
            }
            Err(reason) => {
                if let Some(heartbeat) = heartbeat {
                    heartbeat.abandon();
                }
                self.kernel.publish(KernelEvent::StartFailed {
                    path,
                    reason: reason.clone(),
                });
                Err(reason)
            }
        }
    }

    /// Starts, in order, every child waiting on `ticket`. Stops at the first failed start
    /// and returns it; the children after it keep waiting until the failure is handled.
    async fn start_group(&mut self, myself: &ActorCell, ticket: u64) -> Result<(), (u64, String)> {
        let mut idx = 0;
        while idx < self.children.len() {
            let rec = &self.children[idx];
            if rec.pending_restart == Some(ticket) && rec.instance.is_none() {
                let id = rec.id;
                self.start_instance(myself, idx)
                    .await
                    .map_err(|r| (id, r))?;
            }
            idx += 1;
        }
        Ok(())
    }

    /// Stops a child's instance (if running) within its shutdown timeout, then kills it.
    async fn stop_instance(&mut self, idx: usize, will_return: bool) {
        let rec = &mut self.children[idx];
        let Some(instance) = rec.instance.take() else {
            rec.node.on_down(will_return);
            return;
        };
        let cell = instance.cell;
        let killed = match rec.spec.shutdown {
            Shutdown::Kill => {
                cell.kill();
                let _ = cell.wait(Some(KILL_WAIT)).await;
                true
            }
            Shutdown::Timeout(limit) => {
                match cell
                    .stop_and_wait(Some("shutdown".into()), Some(limit))
                    .await
                {
                    Ok(()) => false,
                    Err(_) if is_stopped(&cell) => false,
                    Err(_) => {
                        cell.kill();
                        let _ = cell.wait(Some(KILL_WAIT)).await;
                        true
                    }
                }
            }
            Shutdown::Infinity => {
                let _ = cell.stop_and_wait(Some("shutdown".into()), None).await;
                false
            }
        };
        if let Some(heartbeat) = instance.heartbeat {
            heartbeat.abandon();
        }
        rec.node.on_down(will_return);
        self.kernel.publish(KernelEvent::Stopped {
            path: rec.node.path.clone(),
            killed,
        });
    }

    /// Stops every child in reverse start order.
    async fn stop_all(&mut self, will_return: bool) {
        for idx in (0..self.children.len()).rev() {
            self.stop_instance(idx, will_return).await;
        }
    }

    fn remove_child(&mut self, idx: usize) {
        let rec = self.children.remove(idx);
        self.kernel.registry.remove_subtree(&rec.node);
        self.publish_children();
        self.kernel.publish(KernelEvent::Removed {
            path: rec.node.path.clone(),
        });
    }

    /// Applies the restart type, intensity, strategy and backoff to each exit in turn.
    /// A failed start during a restart is queued as one more exit. `Err` means the
    /// intensity was exceeded: the children are stopped and the supervisor must fail.
    async fn process_exits(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        mut queue: VecDeque<(u64, Exit)>,
    ) -> Result<(), KernelError> {
        let myself_cell = myself.get_cell();
        while let Some((id, exit)) = queue.pop_front() {
            let Some(idx) = self.index_of(id) else {
                continue;
            };
            let child_path = self.children[idx].node.path.clone();
            let restart_type = self.children[idx].spec.restart;
            match &exit {
                Exit::Failed(reason) => {
                    self.children[idx].node.on_failure(reason);
                    self.kernel.publish(KernelEvent::Failed {
                        path: child_path.clone(),
                        reason: reason.clone(),
                    });
                }
                Exit::Normal(reason) => {
                    self.kernel.publish(KernelEvent::Exited {
                        path: child_path.clone(),
                        reason: reason.clone(),
                    });
                }
            }
            let restart = !matches!(
                (restart_type, &exit),
                (RestartType::Temporary, _) | (RestartType::Transient, Exit::Normal(_))
            );
            if !restart {
                if restart_type == RestartType::Temporary || self.strategy == Strategy::Dynamic {
                    self.remove_child(idx);
                } else {
                    self.children[idx].node.on_down(false);
                }
                self.publish_handled(&child_path);
                continue;
            }
            if matches!(exit, Exit::Normal(_)) {
                self.children[idx].node.on_down(true);
            }

            let now = Instant::now();
            if !self.record_restart(now) {
                return Err(self.escalate().await);
            }
            let consecutive = {
                let window = self.intensity.period;
                let recent = &mut self.children[idx].recent_restarts;
                recent.push_back(now);
                while recent
                    .front()
                    .is_some_and(|t| now.saturating_duration_since(*t) > window)
                {
                    recent.pop_front();
                }
                u32::try_from(recent.len().saturating_sub(1)).unwrap_or(u32::MAX)
            };

            // Stop the rest of the group in reverse order; temporary members leave for good.
            let group = self.group_of(idx);
            for &member in group.iter().rev() {
                if member == id {
                    continue;
                }
                if let Some(m) = self.index_of(member) {
                    let temporary = self.children[m].spec.restart == RestartType::Temporary;
                    self.stop_instance(m, !temporary).await;
                    if temporary {
                        self.remove_child(m);
                    }
                }
            }
            let ticket = self.next_ticket();
            for member in &group {
                if let Some(m) = self.index_of(*member) {
                    self.children[m].pending_restart = Some(ticket);
                }
            }

            let delay = self.backoff.delay(consecutive, &mut self.rng);
            if delay.is_zero() {
                if let Err((failed, reason)) = self.start_group(&myself_cell, ticket).await {
                    queue.push_back((failed, Exit::Failed(reason)));
                }
            } else {
                self.kernel.publish(KernelEvent::RestartScheduled {
                    path: child_path.clone(),
                    delay,
                });
                // The timer is detached: if this supervisor dies first, its send just fails.
                drop(myself.send_after(delay, move || SupervisorMsg::DelayedRestart(ticket)));
            }
            self.publish_handled(&child_path);
        }
        Ok(())
    }

    fn publish_handled(&self, child: &ActorPath) {
        self.kernel.publish(KernelEvent::ExitHandled {
            supervisor: self.path.clone(),
            child: child.clone(),
        });
    }

    /// Records a restart; `false` when it exceeds the intensity.
    fn record_restart(&mut self, now: Instant) -> bool {
        self.restarts.push_back(now);
        while self
            .restarts
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > self.intensity.period)
        {
            self.restarts.pop_front();
        }
        self.restarts.len() <= self.intensity.max_restarts as usize
    }

    /// Children restarted together with the child with id `failed`, in start order.
    fn group_of(&self, idx: usize) -> Vec<u64> {
        match self.strategy {
            Strategy::OneForOne | Strategy::Dynamic => vec![self.children[idx].id],
            Strategy::OneForAll => self.children.iter().map(|c| c.id).collect(),
            Strategy::RestForOne => self.children[idx..].iter().map(|c| c.id).collect(),
        }
    }

    async fn escalate(&mut self) -> KernelError {
        self.kernel.publish(KernelEvent::Escalated {
            path: self.path.clone(),
            max_restarts: self.intensity.max_restarts,
            period: self.intensity.period,
        });
        self.stop_all(true).await;
        KernelError::IntensityExceeded {
            path: self.path.to_string(),
            max_restarts: self.intensity.max_restarts,
            period: self.intensity.period,
        }
    }

    fn check_heartbeats(&mut self) -> VecDeque<(u64, Exit)> {
        let mut hung = VecDeque::new();
        for rec in &mut self.children {
            let Some(silent) = rec
                .instance
                .as_ref()
                .and_then(|i| i.heartbeat.as_ref())
                .and_then(Heartbeat::missed)
            else {
                continue;
            };
            let Some(instance) = rec.instance.take() else {
                continue;
            };
            let deadline = rec.spec.heartbeat_deadline.unwrap_or_default();
            if let Some(heartbeat) = &instance.heartbeat {
                heartbeat.abandon();
            }
            // The async side is killed; a thread stuck in blocking work is abandoned and
            // fenced off by its heartbeat.
            instance.cell.kill();
            rec.node.count_hang();
            self.kernel.publish(KernelEvent::HangDetected {
                path: rec.node.path.clone(),
                silent_for: silent,
            });
            hung.push_back((
                rec.id,
                Exit::Failed(format!(
                    "hang: no heartbeat for {silent:?} (deadline {deadline:?})"
                )),
            ));
        }
        hung
    }

    async fn start_dynamic_child(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        spec: ChildSpec,
    ) -> Result<ActorPath, KernelError> {
        if self.kernel.is_shutting_down() {
            return Err(KernelError::ShutDown);
        }
        if self.kernel.registry.contains(&self.path.child(&spec.name)) {
            return Err(KernelError::AlreadyExists(
                self.path.child(&spec.name).to_string(),
            ));
        }
        if let Some(limit) = self.max_children {
            if self.children.len() >= limit {
                return Err(KernelError::InvalidSpec {
                    path: self.path.child(&spec.name).to_string(),
                    reason: format!("supervisor `{}` is full ({limit} children)", self.path),
                });
            }
        }
        let idx = self.add_record(spec)?;
        self.publish_children();
        self.ensure_watchdog(myself);
        let path = self.children[idx].node.path.clone();
        match self.start_instance(&myself.get_cell(), idx).await {
            Ok(()) => Ok(path),
            Err(reason) => {
                // The caller gets the error; a child that never ran is not kept.
                self.remove_child(idx);
                Err(KernelError::StartFailed {
                    path: path.to_string(),
                    reason,
                })
            }
        }
    }

    async fn terminate_child(&mut self, name: &str) -> Result<(), KernelError> {
        let idx = self.index_by_name(name)?;
        self.stop_instance(idx, false).await;
        self.remove_child(idx);
        Ok(())
    }

    /// Operator restart: stop and start again, not counted as a failure. A failed start is
    /// returned for the strategy to handle like any other.
    async fn restart_child(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        name: &str,
    ) -> (Result<(), KernelError>, VecDeque<(u64, Exit)>) {
        let idx = match self.index_by_name(name) {
            Ok(idx) => idx,
            Err(err) => return (Err(err), VecDeque::new()),
        };
        self.stop_instance(idx, true).await;
        let id = self.children[idx].id;
        match self.start_instance(&myself.get_cell(), idx).await {
            Ok(()) => (Ok(()), VecDeque::new()),
            Err(reason) => (
                Err(KernelError::StartFailed {
                    path: self.children[idx].node.path.to_string(),
                    reason: reason.clone(),
                }),
                VecDeque::from([(id, Exit::Failed(reason))]),
            ),
        }
    }
}

impl Drop for SupervisorState {
    // `post_stop` does not run when a supervisor fails or is killed; this does. It may run
    // after the parent already restarted this supervisor, hence the conditional update.
    fn drop(&mut self) {
        if let Some((_, watchdog)) = self.watchdog.take() {
            watchdog.abort();
        }
        for rec in &mut self.children {
            if let Some(instance) = rec.instance.take() {
                if let Some(heartbeat) = instance.heartbeat {
                    heartbeat.abandon();
                }
                instance.cell.kill();
                rec.node.on_down_if_current(&instance.cell, true);
            }
        }
    }
}

fn is_stopped(cell: &ActorCell) -> bool {
    cell.get_status() >= ractor::ActorStatus::Stopped
}

/// Evaluates the start fault points: `kernel.start` (every child) and
/// `kernel.start:PATH` (one child). Only their `return` action is meaningful here.
fn injected_start_failure(path: &ActorPath) -> Option<String> {
    let specific = format!("{START_FAULT_POINT}:{path}");
    let injected = [START_FAULT_POINT, specific.as_str()]
        .into_iter()
        .find_map(|point| fail::eval(point, |_| format!("injected start failure ({point})")));
    injected
}
