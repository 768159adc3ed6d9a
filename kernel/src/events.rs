//! Kernel events: every start, failure, restart, escalation and shutdown, as values that
//! tests and tools subscribe to, and as structured `tracing` records.

use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::path::ActorPath;

/// One thing that happened in the supervision tree.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum KernelEvent {
    /// An instance of a child started (initial start or restart).
    Started {
        /// The child.
        path: ActorPath,
        /// How many times this child has been restarted so far.
        restarts: u64,
    },
    /// A start function failed (including a failed `pre_start`); counted as a failure.
    StartFailed {
        /// The child.
        path: ActorPath,
        /// The start error.
        reason: String,
    },
    /// A child exited abnormally: panic, error, kill, hang or failed start.
    Failed {
        /// The child.
        path: ActorPath,
        /// Why.
        reason: String,
    },
    /// A child stopped by itself, normally.
    Exited {
        /// The child.
        path: ActorPath,
        /// The stop reason it gave, if any.
        reason: Option<String>,
    },
    /// A blocking child missed its heartbeat deadline and was abandoned.
    HangDetected {
        /// The child.
        path: ActorPath,
        /// How long it had been silent.
        silent_for: Duration,
    },
    /// A restart was scheduled after a backoff delay.
    RestartScheduled {
        /// The child.
        path: ActorPath,
        /// The delay.
        delay: Duration,
    },
    /// A child was stopped by its supervisor (group restart, removal or shutdown).
    Stopped {
        /// The child.
        path: ActorPath,
        /// Whether it had to be killed after its shutdown timeout.
        killed: bool,
    },
    /// A child was removed from its supervisor (temporary exit, dynamic removal).
    Removed {
        /// The child.
        path: ActorPath,
    },
    /// A supervisor exceeded its restart intensity: it stopped its children and fails upward.
    Escalated {
        /// The supervisor.
        path: ActorPath,
        /// Restarts allowed within the period.
        max_restarts: u32,
        /// The period.
        period: Duration,
    },
    /// A supervisor finished handling the exit of one of its children (restarts done or
    /// scheduled). Tests synchronise on it.
    ExitHandled {
        /// The supervisor.
        supervisor: ActorPath,
        /// The child whose exit was handled.
        child: ActorPath,
    },
    /// The whole tree began an orderly shutdown.
    ShutdownStarted {
        /// Why (signal, API call).
        reason: String,
    },
    /// The whole tree has stopped.
    ShutdownComplete,
    /// The root supervisor failed (escalation reached the top).
    RootFailed {
        /// Why.
        reason: String,
    },
}

impl KernelEvent {
    /// The path the event is about (the supervisor's for `ExitHandled`).
    pub fn path(&self) -> Option<&ActorPath> {
        match self {
            KernelEvent::Started { path, .. }
            | KernelEvent::StartFailed { path, .. }
            | KernelEvent::Failed { path, .. }
            | KernelEvent::Exited { path, .. }
            | KernelEvent::HangDetected { path, .. }
            | KernelEvent::RestartScheduled { path, .. }
            | KernelEvent::Stopped { path, .. }
            | KernelEvent::Removed { path }
            | KernelEvent::Escalated { path, .. } => Some(path),
            KernelEvent::ExitHandled { supervisor, .. } => Some(supervisor),
            KernelEvent::ShutdownStarted { .. }
            | KernelEvent::ShutdownComplete
            | KernelEvent::RootFailed { .. } => None,
        }
    }

    fn trace(&self) {
        match self {
            KernelEvent::Started { path, restarts } => {
                tracing::info!(target: "llmos::kernel", %path, restarts, "started")
            }
            KernelEvent::StartFailed { path, reason } => {
                tracing::warn!(target: "llmos::kernel", %path, %reason, "start failed")
            }
            KernelEvent::Failed { path, reason } => {
                tracing::warn!(target: "llmos::kernel", %path, %reason, "failed")
            }
            KernelEvent::Exited { path, reason } => {
                tracing::info!(target: "llmos::kernel", %path, ?reason, "exited")
            }
            KernelEvent::HangDetected { path, silent_for } => {
                tracing::error!(target: "llmos::kernel", %path, ?silent_for, "hang detected")
            }
            KernelEvent::RestartScheduled { path, delay } => {
                tracing::info!(target: "llmos::kernel", %path, ?delay, "restart scheduled")
            }
            KernelEvent::Stopped { path, killed } => {
                tracing::info!(target: "llmos::kernel", %path, killed, "stopped")
            }
            KernelEvent::Removed { path } => {
                tracing::info!(target: "llmos::kernel", %path, "removed")
            }
            KernelEvent::Escalated {
                path,
                max_restarts,
                period,
            } => tracing::error!(
                target: "llmos::kernel", %path, max_restarts, ?period,
                "restart intensity exceeded, escalating"
            ),
            KernelEvent::ExitHandled { supervisor, child } => {
                tracing::debug!(target: "llmos::kernel", %supervisor, %child, "exit handled")
            }
            KernelEvent::ShutdownStarted { reason } => {
                tracing::info!(target: "llmos::kernel", %reason, "shutdown started")
            }
            KernelEvent::ShutdownComplete => {
                tracing::info!(target: "llmos::kernel", "shutdown complete")
            }
            KernelEvent::RootFailed { reason } => {
                tracing::error!(target: "llmos::kernel", %reason, "root supervisor failed")
            }
        }
    }
}

/// Fans events out to every live subscriber; no subscriber misses an event (unbounded).
#[derive(Default)]
pub(crate) struct EventBus {
    subscribers: Mutex<Vec<mpsc::UnboundedSender<KernelEvent>>>,
}

impl EventBus {
    pub(crate) fn publish(&self, event: KernelEvent) {
        event.trace();
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subscribers.retain(|tx| tx.send(event.clone()).is_ok());
    }

    pub(crate) fn subscribe(&self) -> EventStream {
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tx);
        EventStream { rx }
    }
}

/// A subscription to kernel events, in the order they happened.
pub struct EventStream {
    rx: mpsc::UnboundedReceiver<KernelEvent>,
}

/// The wait for an event ended without it.
#[derive(Debug, thiserror::Error)]
#[error("no matching kernel event within {0:?}")]
pub struct EventTimeout(pub Duration);

impl EventStream {
    /// The next event, or `None` once the kernel is gone.
    pub async fn next(&mut self) -> Option<KernelEvent> {
        self.rx.recv().await
    }

    /// An event already delivered, without waiting.
    pub fn try_next(&mut self) -> Option<KernelEvent> {
        self.rx.try_recv().ok()
    }

    /// Waits for the first event matching `pred`, skipping others; `limit` bounds a wait
    /// that should never take that long (it is a failure guard, not a synchronisation).
    pub async fn wait_for(
        &mut self,
        limit: Duration,
        mut pred: impl FnMut(&KernelEvent) -> bool,
    ) -> Result<KernelEvent, EventTimeout> {
        let search = async {
            while let Some(event) = self.rx.recv().await {
                if pred(&event) {
                    return Some(event);
                }
            }
            None
        };
        match tokio::time::timeout(limit, search).await {
            Ok(Some(event)) => Ok(event),
            _ => Err(EventTimeout(limit)),
        }
    }

    /// Collects events until (and including) the first that matches `pred`.
    pub async fn collect_until(
        &mut self,
        limit: Duration,
        mut pred: impl FnMut(&KernelEvent) -> bool,
    ) -> Result<Vec<KernelEvent>, EventTimeout> {
        let mut seen = Vec::new();
        let search = async {
            while let Some(event) = self.rx.recv().await {
                let done = pred(&event);
                seen.push(event);
                if done {
                    return true;
                }
            }
            false
        };
        match tokio::time::timeout(limit, search).await {
            Ok(true) => Ok(seen),
            _ => Err(EventTimeout(limit)),
        }
    }
}
