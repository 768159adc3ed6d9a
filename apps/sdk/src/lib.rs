//! The app SDK of LLMasOS. An app is an actor the kernel supervises: implement [`App`]
//! (lifecycle hooks, message handling, optional HTTP routes), register it in the binary's
//! [`AppRegistry`], enable it in the configuration, and the [`AppHost`] runs it under the
//! `apps` supervisor with the restart policy and quotas its [`AppManifest`] declares.
//!
//! Inside, an app generates through [`Completions`] (submit, stream, re-attach by request
//! id; quotas enforced), keeps what must survive crashes in its [`AppStore`] (atomic,
//! checksummed checkpoints), and runs background work with [`AppContext::spawn`] (tied to
//! the instance: aborted when it dies, and a failed task crashes it). README.md, "Writing
//! an app", walks through one from start to finish.

mod app;
mod completions;
mod error;
mod host;
mod manifest;
mod store;

pub use app::{handle_fault_point, App, AppApi, AppContext, AppHandle, Reply};
pub use completions::{Completion, Completions, Generation, ModelInfo, QuotaUsage};
pub use error::AppError;
pub use host::{AppHost, AppRegistry, AppStatus, APPS};
pub use manifest::{AppConfig, AppManifest, Quotas, RestartName, RestartPolicy};
pub use store::{checkpoint_fault_point, AppStore, CHECKPOINT_FAULT_POINT};

/// The crates an app is written against, re-exported so apps build with the same versions.
pub use axum;
pub use llmos_inference::{ChatMessage, FinishReason, SamplingParams, StreamEvent};
pub use llmos_kernel::RestartType;
