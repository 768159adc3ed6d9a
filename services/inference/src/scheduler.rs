//! The scheduler: admits requests (or answers "overloaded"), places sequences on healthy
//! devices, and moves them when their engine fails, hangs or their device is lost.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use llmos_device::DeviceId;
use llmos_kernel::ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use llmos_kernel::{Addr, KernelEvent};

use crate::engine::EngineMsg;
use crate::error::InferenceError;
use crate::services::Services;
use crate::task::{task_name, TaskMsg, REQUESTS_PATH};

/// Where the scheduler lives.
pub const SCHEDULER_PATH: &str = "llmos/scheduler";

/// The path of the engine of `device`.
pub fn engine_path(device: DeviceId) -> String {
    format!("llmos/devices/{device}/engine")
}

/// Requests to the scheduler.
pub enum SchedulerMsg {
    /// May one more request start? Answers at once when a slot is free (reserving it),
    /// later when one frees up if the admission queue has room, else "overloaded".
    Admit {
        /// Tokens the request may need (prompt + max new tokens): it must fit a device's
        /// KV memory on its own.
        tokens: usize,
        /// Take a slot even above the limit (a request resumed from the journal: it was
        /// admitted by an earlier process).
        resumed: bool,
        /// The answer.
        reply: RpcReplyPort<Result<(), InferenceError>>,
    },
    /// Where should this request's sequence run? Keeps the current device while it is
    /// healthy; otherwise the healthy device with the fewest sequences.
    Place {
        /// The request.
        request: u64,
        /// The device and its engine's address.
        reply: RpcReplyPort<Result<(DeviceId, Addr<EngineMsg>), InferenceError>>,
    },
    /// The request ended: free its slot.
    Release {
        /// The request.
        request: u64,
    },
    /// A kernel event (engine failures and hangs matter).
    Kernel(KernelEvent),
    /// Start watching kernel events (sent once the kernel is booted).
    Watch,
}

/// The scheduler actor.
pub struct SchedulerActor {
    /// Shared services.
    pub services: Arc<Services>,
}

/// Scheduler state: admitted requests and their placement.
pub struct SchedulerState {
    active: usize,
    /// Admissions waiting for a slot, oldest first.
    queue: VecDeque<RpcReplyPort<Result<(), InferenceError>>>,
    placement: HashMap<u64, DeviceId>,
    watching: bool,
}

impl Actor for SchedulerActor {
    type Msg = SchedulerMsg;
    type State = SchedulerState;
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ActorRef<SchedulerMsg>,
        _args: (),
    ) -> Result<SchedulerState, ActorProcessingErr> {
        Ok(SchedulerState {
            active: 0,
            queue: VecDeque::new(),
            placement: HashMap::new(),
            watching: false,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<SchedulerMsg>,
        state: &mut SchedulerState,
    ) -> Result<(), ActorProcessingErr> {
        // Tasks that survived a scheduler restart are counted again from the tree. At first
        // boot the kernel handle does not exist yet; the runtime sends `Watch` after boot.
        if let Ok(kernel) = self.services.kernel() {
            if let Some(requests) = kernel.snapshot().find(REQUESTS_PATH) {
                state.active = requests.children.len();
            }
            self.watch(&myself, state);
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<SchedulerMsg>,
        message: SchedulerMsg,
        state: &mut SchedulerState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SchedulerMsg::Admit {
                tokens,
                resumed,
                reply,
            } => self.admit(state, tokens, resumed, reply),
            SchedulerMsg::Place { request, reply } => {
                let placed = self.place(state, request);
                let _ = reply.send(placed);
            }
            SchedulerMsg::Release { request } => {
                state.placement.remove(&request);
                state.active = state.active.saturating_sub(1);
                self.admit_queued(state);
            }
            SchedulerMsg::Kernel(event) => self.on_kernel_event(state, event),
            SchedulerMsg::Watch => self.watch(&myself, state),
        }
        Ok(())
    }
}

impl SchedulerActor {
    fn respawn_unfinished(&self, state: &mut SchedulerState) {
        let (Ok(kernel), Ok(journal)) = (self.services.kernel(), self.services.journal()) else {
            return;
        };
        let unfinished: Vec<u64> = journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unfinished()
            .map(|(id, _)| id)
            .collect();
        tracing::warn!(
            count = unfinished.len(),
            "requests supervisor restarted; restarting unfinished requests"
        );
        state.placement.clear();
        let (kernel, services) = (kernel.clone(), self.services.clone());
        // Not awaited here: a task's start asks this scheduler for a placement.
        tokio::spawn(async move {
            for request in unfinished {
                let spec = crate::task::task_spec(services.clone(), request);
                if let Err(err) = kernel.start_child(REQUESTS_PATH, spec).await {
                    tracing::error!(request, error = %err, "could not restart a request");
                }
            }
        });
    }

    /// Forwards engine failures and hangs from the kernel's event stream (once).
    fn watch(&self, myself: &ActorRef<SchedulerMsg>, state: &mut SchedulerState) {
        if state.watching {
            return;
        }
        let Ok(kernel) = self.services.kernel() else {
            return;
        };
        state.watching = true;
        let mut events = kernel.subscribe();
        let myself = myself.clone();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                let relevant = match &event {
                    KernelEvent::Failed { .. } | KernelEvent::HangDetected { .. } => true,
                    KernelEvent::Started { path, restarts } => {
                        *restarts > 0 && path.as_str() == REQUESTS_PATH
                    }
                    _ => false,
                };
                if relevant && myself.send_message(SchedulerMsg::Kernel(event)).is_err() {
                    return;
                }
            }
        });
    }

    fn admit(
        &self,
        state: &mut SchedulerState,
        tokens: usize,
        resumed: bool,
        reply: RpcReplyPort<Result<(), InferenceError>>,
    ) {
        let healthy: Vec<_> = self
            .services
            .devices
            .iter()
            .filter(|d| d.device.is_healthy())
            .collect();
        if healthy.is_empty() {
            let _ = reply.send(Err(InferenceError::NoDevice("every device is lost".into())));
            return;
        }
        let capacity = healthy
            .iter()
            .map(|d| d.pool.capacity_positions())
            .max()
            .unwrap_or(0);
        if tokens > capacity {
            let _ = reply.send(Err(InferenceError::TooLarge {
                needed: tokens,
                capacity,
            }));
            return;
        }
        let limit = self.services.config.max_active;
        if resumed || state.active < limit {
            // A caller that went away while asking takes no slot.
            if reply.send(Ok(())).is_ok() {
                state.active += 1;
            }
            return;
        }
        let max_queued = self.services.config.max_queued;
        state.queue.retain(|waiting| !waiting.is_closed());
        if state.queue.len() < max_queued {
            state.queue.push_back(reply);
        } else {
            let _ = reply.send(Err(InferenceError::Overloaded(format!(
                "{} requests in flight (limit {limit}) and {} waiting (limit {max_queued})",
                state.active,
                state.queue.len()
            ))));
        }
        self.services
            .metrics
            .admission_queue
            .set(state.queue.len() as i64);
    }

    /// Hands free slots to queued admissions, oldest first; callers that went away are
    /// skipped and take nothing.
    fn admit_queued(&self, state: &mut SchedulerState) {
        while state.active < self.services.config.max_active {
            let Some(waiting) = state.queue.pop_front() else {
                break;
            };
            if waiting.send(Ok(())).is_ok() {
                state.active += 1;
            }
        }
        self.services
            .metrics
            .admission_queue
            .set(state.queue.len() as i64);
    }

    fn place(
        &self,
        state: &mut SchedulerState,
        request: u64,
    ) -> Result<(DeviceId, Addr<EngineMsg>), InferenceError> {
        let current = state.placement.get(&request).copied();
        let healthy = |id: DeviceId| {
            self.services
                .devices
                .iter()
                .any(|d| d.device.id() == id && d.device.is_healthy())
        };
        let chosen = match current {
            Some(id) if healthy(id) => id,
            _ => {
                let mut load: HashMap<DeviceId, usize> = HashMap::new();
                for device in state.placement.values() {
                    *load.entry(*device).or_default() += 1;
                }
                self.services
                    .devices
                    .iter()
                    .filter(|d| d.device.is_healthy())
                    .map(|d| d.device.id())
                    .min_by_key(|id| load.get(id).copied().unwrap_or(0))
                    .ok_or_else(|| InferenceError::NoDevice("every device is lost".into()))?
            }
        };
        if current.is_some_and(|c| c != chosen) {
            tracing::warn!(request, from = %current.unwrap_or(chosen), to = %chosen, "moving sequence to another device");
        }
        state.placement.insert(request, chosen);
        let engine = self
            .services
            .kernel()?
            .addr::<EngineMsg>(&engine_path(chosen))?;
        Ok((chosen, engine))
    }

    /// An engine failed or hung: tell each task placed on its device to attach again. The
    /// `requests` supervisor restarted (its dynamic children are gone): start the tasks of
    /// every unfinished request again.
    fn on_kernel_event(&self, state: &mut SchedulerState, event: KernelEvent) {
        if let KernelEvent::Started { .. } = event {
            self.respawn_unfinished(state);
            return;
        }
        let path = match &event {
            KernelEvent::Failed { path, .. } | KernelEvent::HangDetected { path, .. } => path,
            _ => return,
        };
        let Some(device) = self
            .services
            .devices
            .iter()
            .map(|d| d.device.id())
            .find(|id| {
                path.as_str() == engine_path(*id) || path.as_str() == format!("llmos/devices/{id}")
            })
        else {
            return;
        };
        let Ok(kernel) = self.services.kernel() else {
            return;
        };
        for (request, placed) in &state.placement {
            if *placed != device {
                continue;
            }
            let path = format!("{REQUESTS_PATH}/{}", task_name(*request));
            if let Ok(task) = kernel.addr::<TaskMsg>(&path) {
                tokio::spawn(async move {
                    let _ = task.cast(TaskMsg::EngineLost { device }).await;
                });
            }
        }
    }
}
