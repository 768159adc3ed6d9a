//! The registry of tree nodes: stable address slots, live state and reliability counters,
//! shared between supervisors (writers) and callers, tools and snapshots (readers).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime};

use ractor::ActorCell;
use tokio::sync::watch;

use crate::path::ActorPath;
use crate::snapshot::{NodeKind, NodeSnapshot, NodeState, Reliability};

/// Where a node's current instance can be reached.
#[derive(Clone, Debug)]
pub(crate) enum Slot {
    /// Not started yet, or being restarted: a caller may wait for the next instance.
    Pending,
    /// A live instance.
    Running(ActorCell),
    /// Stopped for good (removed, not restarted, or the kernel shut down).
    Stopped,
}

/// One node of the tree: its address slot, counters and children (for supervisors).
pub(crate) struct NodeEntry {
    pub(crate) path: ActorPath,
    pub(crate) kind: NodeKind,
    slot: watch::Sender<Slot>,
    messages: AtomicU64,
    hangs: AtomicU64,
    stats: Mutex<NodeStats>,
    children: Mutex<Vec<Arc<NodeEntry>>>,
}

#[derive(Debug)]
struct NodeStats {
    state: NodeState,
    starts: u64,
    failures: u64,
    last_failure: Option<(String, SystemTime)>,
    up_since: Option<Instant>,
    up_total: Duration,
    down_since: Option<Instant>,
    repairs: u64,
    repair_total: Duration,
}

impl NodeEntry {
    fn new(path: ActorPath, kind: NodeKind) -> Self {
        Self {
            path,
            kind,
            slot: watch::Sender::new(Slot::Pending),
            messages: AtomicU64::new(0),
            hangs: AtomicU64::new(0),
            stats: Mutex::new(NodeStats {
                state: NodeState::Starting,
                starts: 0,
                failures: 0,
                last_failure: None,
                up_since: None,
                up_total: Duration::ZERO,
                down_since: None,
                repairs: 0,
                repair_total: Duration::ZERO,
            }),
            children: Mutex::new(Vec::new()),
        }
    }

    fn stats(&self) -> MutexGuard<'_, NodeStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn count_message(&self) {
        self.messages.fetch_add(1, Ordering::Relaxed);
    }

    /// Its supervisor declared an instance hung (a missed heartbeat).
    pub(crate) fn count_hang(&self) {
        self.hangs.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn subscribe_slot(&self) -> watch::Receiver<Slot> {
        self.slot.subscribe()
    }

    pub(crate) fn current(&self) -> Slot {
        self.slot.borrow().clone()
    }

    /// A new instance is live; returns the node's restart count (starts after the first).
    pub(crate) fn on_running(&self, cell: ActorCell) -> u64 {
        let now = Instant::now();
        let restarts = {
            let mut stats = self.stats();
            stats.starts += 1;
            if let Some(down) = stats.down_since.take() {
                stats.repairs += 1;
                stats.repair_total += now.saturating_duration_since(down);
            }
            stats.state = NodeState::Running;
            stats.up_since = Some(now);
            stats.starts - 1
        };
        self.slot.send_replace(Slot::Running(cell));
        restarts
    }

    /// The instance exited abnormally; the fault is detected now.
    pub(crate) fn on_failure(&self, reason: &str) {
        let now = Instant::now();
        {
            let mut stats = self.stats();
            stats.failures += 1;
            stats.last_failure = Some((reason.to_string(), SystemTime::now()));
            if let Some(up) = stats.up_since.take() {
                stats.up_total += now.saturating_duration_since(up);
            }
            if stats.down_since.is_none() {
                stats.down_since = Some(now);
            }
            stats.state = NodeState::Restarting;
        }
        self.slot.send_replace(Slot::Pending);
    }

    /// The instance is gone without a fault (normal exit or stopped by its supervisor);
    /// `will_return` says whether a new instance is expected.
    pub(crate) fn on_down(&self, will_return: bool) {
        let now = Instant::now();
        {
            let mut stats = self.stats();
            if let Some(up) = stats.up_since.take() {
                stats.up_total += now.saturating_duration_since(up);
            }
            stats.state = if will_return {
                NodeState::Restarting
            } else {
                stats.down_since = None;
                NodeState::Stopped
            };
        }
        self.slot.send_replace(if will_return {
            Slot::Pending
        } else {
            Slot::Stopped
        });
    }

    /// Like [`NodeEntry::on_down`], but only while the slot still holds the instance `cell`:
    /// cleanup of a dead supervisor may run after its replacement has started new
    /// instances, and must not mark those down.
    pub(crate) fn on_down_if_current(&self, cell: &ActorCell, will_return: bool) {
        let current =
            matches!(&*self.slot.borrow(), Slot::Running(c) if c.get_id() == cell.get_id());
        if current {
            self.on_down(will_return);
        }
    }

    /// The node failed for good (its supervisor gave up and escalated past it).
    pub(crate) fn on_abandoned(&self) {
        let mut stats = self.stats();
        if let Some(up) = stats.up_since.take() {
            stats.up_total += Instant::now().saturating_duration_since(up);
        }
        stats.state = NodeState::Failed;
    }

    pub(crate) fn set_children(&self, children: Vec<Arc<NodeEntry>>) {
        *self.children.lock().unwrap_or_else(|e| e.into_inner()) = children;
    }

    pub(crate) fn children(&self) -> Vec<Arc<NodeEntry>> {
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn snapshot(&self, now: Instant) -> NodeSnapshot {
        let (state, restarts, last_failure, uptime, reliability) = {
            let stats = self.stats();
            let current_up = stats
                .up_since
                .map(|up| now.saturating_duration_since(up))
                .unwrap_or_default();
            let current_down = stats
                .down_since
                .map(|down| now.saturating_duration_since(down));
            (
                stats.state,
                stats.starts.saturating_sub(1),
                stats.last_failure.clone(),
                current_up,
                Reliability::compute(
                    stats.up_total + current_up,
                    stats.failures,
                    stats.repair_total,
                    stats.repairs,
                    current_down,
                ),
            )
        };
        NodeSnapshot {
            path: self.path.clone(),
            name: self.path.name().to_string(),
            kind: self.kind.clone(),
            state,
            restarts,
            last_failure: last_failure.map(|(reason, at)| crate::snapshot::FailureRecord {
                reason,
                at_unix_ms: at
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
            }),
            uptime_secs: uptime.as_secs_f64(),
            messages_handled: self.messages.load(Ordering::Relaxed),
            hangs: self.hangs.load(Ordering::Relaxed),
            reliability,
            children: self
                .children()
                .iter()
                .map(|child| child.snapshot(now))
                .collect(),
        }
    }
}

/// All nodes by path. Entries survive restarts of their actors (and of their supervisor),
/// so counters and addresses are stable; they are removed only with their child spec.
#[derive(Default)]
pub(crate) struct Registry {
    nodes: RwLock<HashMap<ActorPath, Arc<NodeEntry>>>,
}

impl Registry {
    /// The entry for `path`, created with `kind` if it does not exist yet.
    pub(crate) fn ensure(&self, path: ActorPath, kind: NodeKind) -> Arc<NodeEntry> {
        let mut nodes = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        nodes
            .entry(path.clone())
            .or_insert_with(|| Arc::new(NodeEntry::new(path, kind)))
            .clone()
    }

    pub(crate) fn get(&self, path: &ActorPath) -> Option<Arc<NodeEntry>> {
        self.nodes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(path)
            .cloned()
    }

    pub(crate) fn contains(&self, path: &ActorPath) -> bool {
        self.get(path).is_some()
    }

    /// Removes a node and its whole subtree; their slots become `Stopped`.
    pub(crate) fn remove_subtree(&self, node: &Arc<NodeEntry>) {
        let mut pending = vec![node.clone()];
        let mut nodes = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        while let Some(entry) = pending.pop() {
            entry.on_down(false);
            nodes.remove(&entry.path);
            pending.extend(entry.children());
        }
    }

    /// Marks every node stopped (after a shutdown or a root failure).
    pub(crate) fn stop_all(&self, failed: bool) {
        let nodes = self.nodes.read().unwrap_or_else(|e| e.into_inner());
        for entry in nodes.values() {
            if failed {
                entry.on_abandoned();
                entry.slot.send_replace(Slot::Stopped);
            } else {
                entry.on_down(false);
            }
        }
    }
}
