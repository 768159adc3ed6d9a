//! Helpers shared by the control tests: a runtime on the real stories260K model with the
//! control actor as an extra root child, a blocking client driven off the async runtime,
//! and reading a request's stream.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use llmos_control::{control_spec, socket_path, Client};
use llmos_device::DeviceId;
use llmos_inference::{Runtime, RuntimeConfig, SamplingParams, StreamEvent};

/// The real tiny Llama shipped beside the project.
pub fn stories260k() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/models/stories260K/stories260K-f32.gguf")
}

/// A config for stories260K on one CPU device in `dir`, with a short engine heartbeat so
/// hangs show quickly.
pub fn config(dir: &Path) -> RuntimeConfig {
    llmos_device::init_cpu_threads(2);
    let mut config = RuntimeConfig::new(stories260k(), dir);
    config.devices = vec![DeviceId::cpu(0)];
    config.kv_budget_bytes = 8 << 20;
    config.engine_heartbeat = Duration::from_millis(500);
    config
}

/// Boots the inference tree with the control actor under the root.
pub async fn boot(dir: &Path) -> Runtime {
    Runtime::boot_with(config(dir), |services| vec![control_spec(services.clone())])
        .await
        .expect("boot")
}

/// Runs one command on a fresh connection (the blocking client runs off the async
/// threads): `Ok(text)` or the server's `Err(error)`.
pub async fn ctl(dir: &Path, cmd: &str, args: &[&str]) -> Result<String, String> {
    let path = socket_path(dir);
    let cmd = cmd.to_string();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let mut client = Client::connect(&path).expect("connect");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        client.command(&cmd, &args).expect("an answer")
    })
    .await
    .expect("client thread")
}

/// Greedy sampling of up to `max_tokens`.
pub fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens,
        seed: 1234,
        ..SamplingParams::default()
    }
}

/// The next event of a stream, bounded by a hang guard.
pub async fn next_event(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<StreamEvent>,
) -> StreamEvent {
    tokio::time::timeout(Duration::from_secs(60), events.recv())
        .await
        .expect("an event within the hang guard")
        .expect("the stream ends with Finished or Failed")
}

/// Reads a stream to its end: the visible text, or the failure.
pub async fn finish(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<StreamEvent>,
    mut text: String,
) -> Result<String, String> {
    loop {
        match next_event(events).await {
            StreamEvent::Token { text: piece, .. } => text.push_str(&piece),
            StreamEvent::Finished { .. } => return Ok(text),
            StreamEvent::Failed { error } => return Err(error),
        }
    }
}

/// Runs one request to its end.
pub async fn generate(runtime: &Runtime, prompt: &str, params: SamplingParams) -> String {
    let mut stream = runtime.submit(prompt, params).await.expect("submit");
    finish(&mut stream.events, String::new())
        .await
        .expect("completes")
}
