//! Errors of the inference services.

use llmos_device::DeviceError;
use llmos_journal::JournalError;
use llmos_kernel::KernelError;
use llmos_kv::KvError;
use llmos_models::ModelError;

/// What went wrong serving a request.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// Sampling parameters out of range.
    #[error("invalid sampling parameters: {0}")]
    InvalidParams(String),
    /// The prompt does not fit the model's context.
    #[error("the prompt has {prompt} tokens; the model's context is {context} (including at least 1 generated token)")]
    PromptTooLong {
        /// Prompt tokens.
        prompt: usize,
        /// Context length.
        context: usize,
    },
    /// The prompt is empty after tokenisation.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The request can never fit: its prompt and `max_tokens` need more KV memory than
    /// any device has.
    #[error("the request needs KV memory for {needed} tokens (prompt + max_tokens); the largest device holds {capacity}")]
    TooLarge {
        /// Positions the request may need.
        needed: usize,
        /// Positions the largest healthy device's pool holds.
        capacity: usize,
    },
    /// Too many requests in flight.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// No device can take the request.
    #[error("no healthy device: {0}")]
    NoDevice(String),
    /// The request is unknown.
    #[error("unknown request {0}")]
    UnknownRequest(u64),
    /// Journaled state is inconsistent.
    #[error("corrupt state: {0}")]
    Corrupt(String),
    /// The journal refused a write after retries.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// KV memory.
    #[error(transparent)]
    Kv(#[from] KvError),
    /// Model loading or forward.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Device.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// Kernel (addresses, children).
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// A newer instance of this request's task has taken over.
    #[error("request {0}: this task instance was superseded")]
    Superseded(u64),
    /// Another process (or runtime) holds the state directory's lock.
    #[error(
        "state directory {} is in use by {holder}; stop that process or use another --state-dir",
        dir.display()
    )]
    StateDirInUse {
        /// The directory.
        dir: std::path::PathBuf,
        /// Who holds it, as its lock file says.
        holder: String,
    },
    /// A broken invariant inside the services.
    #[error("internal error: {0}")]
    Internal(String),
}
