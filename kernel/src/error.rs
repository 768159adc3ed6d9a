//! Errors of the kernel: every failure a caller of the kernel API can see, with context.

use std::time::Duration;

/// What went wrong in a kernel operation.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// No node is registered under this path.
    #[error("no actor at path `{0}`")]
    NotFound(String),
    /// A node with this path already exists.
    #[error("an actor named `{0}` already exists")]
    AlreadyExists(String),
    /// The path names a worker where a supervisor was required.
    #[error("`{0}` is not a supervisor")]
    NotASupervisor(String),
    /// The actor's message type differs from the one the caller asked for.
    #[error("actor `{path}` does not accept messages of type `{expected}`")]
    WrongMessageType {
        /// Path of the actor.
        path: String,
        /// Type name the caller used.
        expected: &'static str,
    },
    /// The actor is stopped or was removed; it will not come back.
    #[error("actor `{0}` is stopped")]
    Stopped(String),
    /// The actor stayed unavailable (restarting) for longer than the caller waits.
    #[error("actor `{path}` was unavailable for {waited:?} (restarting)")]
    Unavailable {
        /// Path of the actor.
        path: String,
        /// How long the caller waited for a live instance.
        waited: Duration,
    },
    /// The instance that received a call died before answering.
    #[error("actor `{0}` died before replying")]
    DiedBeforeReply(String),
    /// A call was not answered in time.
    #[error("call to `{path}` timed out after {timeout:?}")]
    CallTimeout {
        /// Path of the actor.
        path: String,
        /// The caller's timeout.
        timeout: Duration,
    },
    /// A child could not be started.
    #[error("starting `{path}` failed: {reason}")]
    StartFailed {
        /// Path of the child.
        path: String,
        /// Why the start function failed.
        reason: String,
    },
    /// A supervisor exceeded its restart intensity and gave up.
    #[error("supervisor `{path}` exceeded {max_restarts} restarts in {period:?}; escalating")]
    IntensityExceeded {
        /// Path of the supervisor.
        path: String,
        /// Restarts allowed in the period.
        max_restarts: u32,
        /// The period.
        period: Duration,
    },
    /// The kernel's tree has stopped; nothing can be started or addressed.
    #[error("the kernel is shut down")]
    ShutDown,
    /// A fault-point specification could not be parsed or applied.
    #[error("bad fault point spec `{spec}`: {reason}")]
    BadFaultSpec {
        /// The offending specification.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A signal handler could not be installed.
    #[error("cannot install the signal handler: {0}")]
    Signal(String),
    /// An invalid supervisor or child specification.
    #[error("invalid specification for `{path}`: {reason}")]
    InvalidSpec {
        /// Path of the node.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// Result with [`KernelError`].
pub type Result<T, E = KernelError> = std::result::Result<T, E>;
