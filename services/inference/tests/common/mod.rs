//! Helpers shared by the inference integration tests: the real stories260K model, a
//! runtime in a fresh state directory, and collecting a request's stream.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use llmos_device::DeviceId;
use llmos_inference::{
    FinishReason, RequestStream, Runtime, RuntimeConfig, SamplingParams, StreamEvent,
};

/// The real tiny Llama shipped beside the project.
pub fn stories260k() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/models/stories260K/stories260K-f32.gguf")
}

/// The greedy continuation the model's README documents for "Once upon a time".
pub const KNOWN_CONTINUATION: &str = ", there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball. She wanted to play with it, but it was too high.";

/// A runtime config for stories260K in `dir` on `devices`, with a short engine heartbeat
/// deadline so hangs are detected quickly.
pub fn config(dir: &std::path::Path, devices: &[DeviceId]) -> RuntimeConfig {
    llmos_device::init_cpu_threads(2);
    let mut config = RuntimeConfig::new(stories260k(), dir);
    config.devices = devices.to_vec();
    config.kv_budget_bytes = 8 << 20;
    config.engine_heartbeat = Duration::from_millis(500);
    config
}

/// What a request produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// Generated tokens.
    pub tokens: Vec<u32>,
    /// Visible text.
    pub text: String,
    /// Why it ended.
    pub finish: Option<FinishReason>,
    /// The failure, if it failed.
    pub error: Option<String>,
}

/// Reads a stream to its end (bounded by a hang guard).
pub async fn collect(stream: RequestStream) -> Output {
    collect_within(stream, Duration::from_secs(60)).await
}

/// Reads a stream to its end within `guard` (a hang guard, not a timing).
pub async fn collect_within(mut stream: RequestStream, guard: Duration) -> Output {
    let mut out = Output {
        tokens: Vec::new(),
        text: String::new(),
        finish: None,
        error: None,
    };
    let read = async {
        while let Some(event) = stream.events.recv().await {
            match event {
                StreamEvent::Token { token, text, .. } => {
                    out.tokens.push(token);
                    out.text.push_str(&text);
                }
                StreamEvent::Finished { reason, .. } => {
                    out.finish = Some(reason);
                    return;
                }
                StreamEvent::Failed { error } => {
                    out.error = Some(error);
                    return;
                }
            }
        }
    };
    tokio::time::timeout(guard, read)
        .await
        .expect("the request finished within the hang guard");
    out
}

/// Sampling parameters: greedy (temperature 0) or seeded sampling at `temperature`.
pub fn params(temperature: f32, max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature,
        max_tokens,
        seed: 1234,
        ..SamplingParams::default()
    }
}

/// Boots a runtime, runs one request, shuts down.
pub async fn generate_once(config: RuntimeConfig, prompt: &str, params: SamplingParams) -> Output {
    let runtime = Runtime::boot(config).await.expect("boot");
    let stream = runtime.submit(prompt, params).await.expect("submit");
    let out = collect(stream).await;
    runtime.shutdown("test").await;
    out
}
