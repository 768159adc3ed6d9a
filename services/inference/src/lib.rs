//! Inference as supervised services: per-device engines with heartbeats, one task actor per
//! request with its sampler, a scheduler that admits, places and fails over, and a journal
//! that makes every token durable before its client sees it — so any crash resumes exactly.

mod batcher;
mod config;
mod engine;
mod error;
mod journal_actor;
mod kvpool;
mod metrics;
mod models_actor;
mod quarantine;
mod runtime;
mod sampler;
mod scheduler;
mod services;
mod sink;
mod state_lock;
mod task;
mod text;

pub use batcher::{CostModel, StepBudget};
pub use config::{LoadProgressHook, RuntimeConfig};
pub use engine::{
    engine_hang_point_for, engine_step_point_for, Attach, EngineMsg, ENGINE_HANG_POINT,
    ENGINE_LAYER_POINT, ENGINE_STEP_POINT,
};
pub use error::InferenceError;
/// The KV element type of [`RuntimeConfig::kv_dtype`].
pub use llmos_kv::KvDtype;
/// Chat messages and templates of the loaded model (see [`LoadedModel::chat_prompt`]);
/// load progress for [`RuntimeConfig::load_progress`].
pub use llmos_models::{ChatMessage, ChatTemplate, LoadProgress};
pub use metrics::EngineMetrics;
pub use models_actor::ModelsMsg;
pub use runtime::{PoolMsg, RequestStream, RequestSummary, Runtime};
pub use sampler::{sample, sample_reference, SamplerRng, SamplingParams};
pub use scheduler::{engine_path, SCHEDULER_PATH};
pub use services::{
    DeviceRuntime, JournalHealthReport, KvSourceStats, LoadedModel, RequestState, RequestStatus,
    Services,
};
pub use sink::{Delivered, FinishReason, StreamEvent};
pub use state_lock::LOCK_FILE;
pub use task::{task_step_point_for, MAX_STALLED_STARTS, REQUESTS_PATH, TASK_STEP_POINT};
pub use text::TextStream;
