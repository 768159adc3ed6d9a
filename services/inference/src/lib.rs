//! Inference as supervised services: per-device engines with heartbeats, one task actor per
//! request with its sampler, a scheduler that admits, places and fails over, and a journal
//! that makes every token durable before its client sees it — so any crash resumes exactly.

mod config;
mod engine;
mod error;
mod journal_actor;
mod kvpool;
mod models_actor;
mod runtime;
mod sampler;
mod scheduler;
mod services;
mod sink;
mod task;
mod text;

pub use config::RuntimeConfig;
pub use engine::{EngineMsg, ENGINE_HANG_POINT, ENGINE_STEP_POINT};
pub use error::InferenceError;
pub use models_actor::ModelsMsg;
pub use runtime::{PoolMsg, RequestStream, Runtime};
pub use sampler::{sample, SamplerRng, SamplingParams};
pub use scheduler::{engine_path, SCHEDULER_PATH};
pub use services::{DeviceRuntime, KvSourceStats, LoadedModel, Services};
pub use sink::{FinishReason, StreamEvent};
pub use task::{REQUESTS_PATH, TASK_STEP_POINT};
