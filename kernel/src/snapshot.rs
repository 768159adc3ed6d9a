//! Serialisable snapshots of the live tree and per-node reliability counters.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::path::ActorPath;
use crate::spec::{RestartType, Strategy};

/// What a node is.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NodeKind {
    /// A supervisor with its strategy (and its own restart type, `None` for the root).
    Supervisor {
        /// Its restart strategy.
        strategy: Strategy,
        /// How its parent restarts it (`None` for the root).
        restart: Option<RestartType>,
    },
    /// A worker with its restart type.
    Worker {
        /// How its supervisor restarts it.
        restart: RestartType,
    },
}

/// Life-cycle state of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Being started for the first time.
    Starting,
    /// A live instance answers.
    Running,
    /// Between an exit and the replacement being ready (including backoff).
    Restarting,
    /// Stopped and not coming back.
    Stopped,
    /// Given up on: its supervisor escalated past it.
    Failed,
}

/// The most recent failure of a node.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FailureRecord {
    /// Panic message, error, "killed", "hang: …", or the failed start's error.
    pub reason: String,
    /// Wall-clock time of detection, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

/// MTBF, MTTR and availability from a node's own history.
///
/// MTBF is operating time divided by failures; MTTR is the mean time from a fault being
/// detected to the replacement being ready; availability is MTBF / (MTBF + MTTR). A node
/// that never failed has no MTBF and availability 1. While a node is down and never yet
/// repaired, its current downtime stands in for MTTR.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Reliability {
    /// Failures observed.
    pub failures: u64,
    /// Mean time between failures, seconds (`None`: no failure yet).
    pub mtbf_secs: Option<f64>,
    /// Mean time to repair, seconds (`None`: nothing repaired or pending).
    pub mttr_secs: Option<f64>,
    /// MTBF / (MTBF + MTTR), in `[0, 1]`.
    pub availability: f64,
}

impl Reliability {
    pub(crate) fn compute(
        uptime: Duration,
        failures: u64,
        repair_total: Duration,
        repairs: u64,
        current_down: Option<Duration>,
    ) -> Self {
        let mtbf = (failures > 0).then(|| uptime.as_secs_f64() / failures as f64);
        let mttr = if repairs > 0 {
            Some(repair_total.as_secs_f64() / repairs as f64)
        } else {
            current_down.map(|down| down.as_secs_f64())
        };
        let availability = match (mtbf, mttr) {
            (Some(mtbf), Some(mttr)) if mtbf + mttr > 0.0 => mtbf / (mtbf + mttr),
            (Some(_), Some(_)) => 0.0,
            _ => 1.0,
        };
        Self {
            failures,
            mtbf_secs: mtbf,
            mttr_secs: mttr,
            availability,
        }
    }
}

/// One node of a [`TreeSnapshot`], with its children in start order.
#[derive(Clone, Debug, Serialize)]
pub struct NodeSnapshot {
    /// Full path.
    pub path: ActorPath,
    /// Last path segment.
    pub name: String,
    /// Supervisor (with strategy) or worker (with restart type).
    #[serde(flatten)]
    pub kind: NodeKind,
    /// Current state.
    pub state: NodeState,
    /// Times a new instance was started after the first.
    pub restarts: u64,
    /// Most recent failure.
    pub last_failure: Option<FailureRecord>,
    /// Time since the current instance started (0 when not running).
    pub uptime_secs: f64,
    /// Messages handled by all instances.
    pub messages_handled: u64,
    /// Instances declared hung (missed heartbeat) since boot.
    pub hangs: u64,
    /// MTBF, MTTR, availability.
    pub reliability: Reliability,
    /// Children in start order.
    pub children: Vec<NodeSnapshot>,
}

/// The whole live tree at one moment.
#[derive(Clone, Debug, Serialize)]
pub struct TreeSnapshot {
    /// The root supervisor.
    pub root: NodeSnapshot,
}

impl TreeSnapshot {
    /// Finds a node by path.
    pub fn find(&self, path: &str) -> Option<&NodeSnapshot> {
        let mut pending = vec![&self.root];
        while let Some(node) = pending.pop() {
            if node.path.as_str() == path {
                return Some(node);
            }
            pending.extend(node.children.iter());
        }
        None
    }

    /// Every node, depth first in start order.
    pub fn nodes(&self) -> Vec<&NodeSnapshot> {
        let mut out = Vec::new();
        let mut pending = vec![&self.root];
        while let Some(node) = pending.pop() {
            out.push(node);
            pending.extend(node.children.iter().rev());
        }
        out
    }

    /// A human-readable rendering, one node per line, as the REPL's `tree` prints it.
    pub fn render(&self) -> String {
        let mut out = String::new();
        render_node(&self.root, "", true, true, &mut out);
        out
    }
}

fn render_node(node: &NodeSnapshot, prefix: &str, last: bool, root: bool, out: &mut String) {
    let branch = if root {
        ""
    } else if last {
        "└─ "
    } else {
        "├─ "
    };
    let kind = match &node.kind {
        NodeKind::Supervisor { strategy, .. } => format!("{strategy:?}"),
        NodeKind::Worker { restart } => format!("{restart:?}"),
    };
    let mtbf = node
        .reliability
        .mtbf_secs
        .map(|s| format!("{s:.3}s"))
        .unwrap_or_else(|| "-".into());
    let mttr = node
        .reliability
        .mttr_secs
        .map(|s| format!("{:.1}µs", s * 1e6))
        .unwrap_or_else(|| "-".into());
    let label = format!("{prefix}{branch}{}", node.name);
    let _ = write!(
        out,
        "{label:<28} {kind:<11} {state:<10} restarts={restarts} up={up:.2}s msgs={msgs} mtbf={mtbf} mttr={mttr} avail={avail:.6}",
        state = format!("{:?}", node.state).to_lowercase(),
        restarts = node.restarts,
        up = node.uptime_secs,
        msgs = node.messages_handled,
        avail = node.reliability.availability,
    );
    if let Some(failure) = &node.last_failure {
        let _ = write!(out, " last_failure=\"{}\"", failure.reason);
    }
    out.push('\n');
    let child_prefix = if root {
        String::new()
    } else if last {
        format!("{prefix}   ")
    } else {
        format!("{prefix}│  ")
    };
    for (i, child) in node.children.iter().enumerate() {
        render_node(
            child,
            &child_prefix,
            i + 1 == node.children.len(),
            false,
            out,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn availability_is_mtbf_over_mtbf_plus_mttr() {
        let r = Reliability::compute(Duration::from_secs(90), 3, Duration::from_secs(3), 3, None);
        assert_eq!(r.mtbf_secs, Some(30.0));
        assert_eq!(r.mttr_secs, Some(1.0));
        assert!((r.availability - 30.0 / 31.0).abs() < 1e-12);
    }

    #[test]
    fn never_failed_is_fully_available() {
        let r = Reliability::compute(Duration::from_secs(5), 0, Duration::ZERO, 0, None);
        assert_eq!(r.mtbf_secs, None);
        assert_eq!(r.availability, 1.0);
    }

    #[test]
    fn down_and_unrepaired_uses_current_downtime() {
        let r = Reliability::compute(
            Duration::from_secs(10),
            1,
            Duration::ZERO,
            0,
            Some(Duration::from_secs(10)),
        );
        assert_eq!(r.availability, 0.5);
    }
}
