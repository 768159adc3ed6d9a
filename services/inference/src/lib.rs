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

pub use config::{LoadProgressHook, RuntimeConfig};
pub use engine::{EngineMsg, ENGINE_HANG_POINT, ENGINE_STEP_POINT};
pub use error::InferenceError;
/// Chat messages and templates of the loaded model (see [`LoadedModel::chat_prompt`]);
/// load progress for [`RuntimeConfig::load_progress`].
pub use llmos_models::{ChatMessage, ChatTemplate, LoadProgress};
pub use models_actor::ModelsMsg;
pub use runtime::{PoolMsg, RequestStream, RequestSummary, Runtime};
pub use sampler::{sample, SamplerRng, SamplingParams};
pub use scheduler::{engine_path, SCHEDULER_PATH};
pub use services::{DeviceRuntime, JournalHealthReport, KvSourceStats, LoadedModel, Services};
pub use sink::{FinishReason, StreamEvent};
pub use task::{REQUESTS_PATH, TASK_STEP_POINT};
