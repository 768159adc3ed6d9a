//! Heartbeats of children that do blocking work, and the fence that abandons a hung one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The instance holding this heartbeat was declared hung and replaced; whatever it still
/// computes must be discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this instance was abandoned by its supervisor after a missed heartbeat")]
pub struct Abandoned;

/// Liveness signal of one instance of a blocking child.
///
/// The child's worker thread calls [`Heartbeat::beat`] at least once per deadline while it
/// is busy, and [`Heartbeat::idle`] before it waits for work. When a deadline is missed the
/// supervisor abandons the instance: every later `beat` or [`Heartbeat::check`] returns
/// [`Abandoned`], so a thread that wakes up after its replacement started can tell that it
/// must not publish anything. Each instance gets a fresh heartbeat.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    inner: Arc<HeartbeatInner>,
}

#[derive(Debug)]
struct HeartbeatInner {
    origin: Instant,
    deadline: Duration,
    last_beat_nanos: AtomicU64,
    idle: AtomicBool,
    abandoned: AtomicBool,
}

impl Heartbeat {
    pub(crate) fn new(deadline: Duration) -> Self {
        Self {
            inner: Arc::new(HeartbeatInner {
                origin: Instant::now(),
                deadline,
                last_beat_nanos: AtomicU64::new(0),
                idle: AtomicBool::new(false),
                abandoned: AtomicBool::new(false),
            }),
        }
    }

    /// A heartbeat no supervisor watches, for running blocking work outside the tree
    /// (tools, tests). It is never abandoned.
    pub fn detached(deadline: Duration) -> Self {
        Self::new(deadline)
    }

    /// Records that the worker is alive and busy.
    pub fn beat(&self) -> Result<(), Abandoned> {
        let nanos = u64::try_from(self.inner.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.inner.last_beat_nanos.store(nanos, Ordering::Release);
        self.inner.idle.store(false, Ordering::Release);
        self.check()
    }

    /// Records that the worker is waiting for work: no deadline applies until the next beat.
    pub fn idle(&self) {
        self.inner.idle.store(true, Ordering::Release);
    }

    /// `Err(Abandoned)` once the supervisor has given up on this instance.
    pub fn check(&self) -> Result<(), Abandoned> {
        if self.inner.abandoned.load(Ordering::Acquire) {
            Err(Abandoned)
        } else {
            Ok(())
        }
    }

    /// Whether the supervisor has given up on this instance.
    pub fn is_abandoned(&self) -> bool {
        self.check().is_err()
    }

    /// The deadline between beats while busy.
    pub fn deadline(&self) -> Duration {
        self.inner.deadline
    }

    pub(crate) fn abandon(&self) {
        self.inner.abandoned.store(true, Ordering::Release);
    }

    /// How long the busy worker has been silent, or `None` when it is idle.
    pub(crate) fn silent_for(&self) -> Option<Duration> {
        if self.inner.idle.load(Ordering::Acquire) {
            return None;
        }
        let last = Duration::from_nanos(self.inner.last_beat_nanos.load(Ordering::Acquire));
        Some(self.inner.origin.elapsed().saturating_sub(last))
    }

    /// Whether the busy worker has missed its deadline.
    pub(crate) fn missed(&self) -> Option<Duration> {
        self.silent_for()
            .filter(|silent| *silent > self.inner.deadline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abandon_fences_later_beats() {
        let hb = Heartbeat::new(Duration::from_secs(1));
        assert_eq!(hb.beat(), Ok(()));
        hb.abandon();
        assert_eq!(hb.beat(), Err(Abandoned));
        assert!(hb.is_abandoned());
    }

    #[test]
    fn idle_workers_never_miss() {
        let hb = Heartbeat::new(Duration::ZERO);
        hb.idle();
        assert_eq!(hb.missed(), None);
        hb.beat().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        assert!(hb.missed().is_some());
    }
}
