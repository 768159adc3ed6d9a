//! The LLMasOS kernel: an Erlang/OTP-style supervision runtime on ractor.
//!
//! ractor provides actors, panic capture and supervision *events*; this crate adds the
//! *policy*: child specifications with restart types and shutdown timeouts, one_for_one /
//! one_for_all / rest_for_one / dynamic strategies, restart intensity with escalation,
//! backoff with seeded jitter, heartbeats for blocking children, stable addresses by path,
//! a serialisable snapshot with MTBF/MTTR/availability, named fault points and structured
//! events. It knows nothing of LLMs, devices or IO formats.

mod addr;
mod backoff;
mod error;
mod events;
pub mod faults;
mod heartbeat;
mod kernel;
mod managed;
mod path;
mod registry;
mod snapshot;
mod spec;
mod supervisor;

pub use addr::{Addr, Undelivered, DEFAULT_RESOLVE_WAIT};
pub use backoff::Backoff;
pub use error::{KernelError, Result};
pub use events::{EventStream, EventTimeout, KernelEvent};
pub use heartbeat::{Abandoned, Heartbeat};
pub use kernel::{Kernel, TreeExit};
pub use path::ActorPath;
pub use snapshot::{FailureRecord, NodeKind, NodeSnapshot, NodeState, Reliability, TreeSnapshot};
pub use spec::{
    ChildSpec, Intensity, RestartType, Shutdown, StartContext, Strategy, SupervisorSpec,
};
pub use supervisor::START_FAULT_POINT;

/// Re-exports for macros; not part of the API.
#[doc(hidden)]
pub use fail as __fail;
/// ractor, re-exported so users build actors against the same version.
pub use ractor;
