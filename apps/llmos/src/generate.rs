//! `llmos run` and `llmos resume`: boot the inference tree, stream one request's
//! continuation to stdout as it is produced (logs go to stderr), and resume an unfinished
//! request from a state directory after a crash.
//!
//! How a rerun resumes: `llmos run --state-dir DIR` records the model and devices in
//! `DIR/run.json`; every token is journaled before it is printed, and so is the delivery
//! cursor (right before the text is written). `llmos resume --state-dir DIR` continues every
//! unfinished request after the last token printed, so the two outputs joined equal an
//! uninterrupted run.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use llmos_device::parse_device_list;
use llmos_inference::{
    KvDtype, RequestStream, Runtime, RuntimeConfig, SamplingParams, StreamEvent,
};
use llmos_journal::FlushPolicy;
use serde::{Deserialize, Serialize};

/// Errors of `run` and `resume`.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The inference runtime refused or failed.
    #[error(transparent)]
    Inference(#[from] llmos_inference::InferenceError),
    /// A device list did not parse.
    #[error(transparent)]
    Device(#[from] llmos_device::DeviceError),
    /// The state directory has no `run.json` to resume from.
    #[error("{0} holds no run to resume (no run.json): start one with `llmos run --state-dir`")]
    NothingToResume(PathBuf),
    /// Files in the state directory.
    #[error("{path}: {reason}")]
    State {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Writing to stdout failed.
    #[error("writing the output: {0}")]
    Stdout(#[from] std::io::Error),
    /// The request failed while generating.
    #[error("generation failed: {0}")]
    Failed(String),
}

/// `llmos run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Model: a GGUF file or a Hugging Face directory (config.json, *.safetensors,
    /// tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Penalty for repeated tokens (1: none).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Stop before this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Devices in preference order, e.g. `cpu:0,cpu:1` or `cuda:0,cpu:0`.
    #[arg(long, default_value = "cpu:0")]
    devices: String,
    /// State directory (journal, KV pool); needed to resume after a crash. Without it a
    /// temporary directory is used and removed at exit.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// KV-cache memory per device, MiB (the pool file in the state directory).
    #[arg(long, default_value_t = 256)]
    kv_budget_mb: usize,
    /// How the KV cache stores keys and values: `f32` (exact) or `f16` (half the memory
    /// and bandwidth, as llama.cpp does by default).
    #[arg(long, default_value = "f32")]
    kv_dtype: KvDtype,
    /// When journal records reach the OS: `every-token` (survives SIGKILL; the default),
    /// `interval:MS`, or `off` (only at the end).
    #[arg(long, default_value = "every-token", value_parser = parse_flush)]
    flush: FlushPolicy,
}

pub(crate) fn parse_flush(text: &str) -> Result<FlushPolicy, String> {
    match text {
        "every-token" => Ok(FlushPolicy::EveryRecord),
        "off" => Ok(FlushPolicy::Off),
        _ => text
            .strip_prefix("interval:")
            .and_then(|ms| ms.parse::<u64>().ok())
            .map(FlushPolicy::IntervalMs)
            .ok_or_else(|| "expected every-token, interval:MS or off".to_string()),
    }
}

/// `llmos resume`.
#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// The state directory of an interrupted `llmos run`.
    #[arg(long)]
    state_dir: PathBuf,
    /// Use this model instead of the one recorded (it must be the same model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Use these devices instead of the recorded ones.
    #[arg(long)]
    devices: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct RunRecord {
    model: PathBuf,
    devices: String,
    #[serde(default = "default_kv_budget_mb")]
    kv_budget_mb: usize,
    #[serde(default)]
    kv_dtype: String,
}

fn default_kv_budget_mb() -> usize {
    256
}

const RUN_RECORD: &str = "run.json";

/// Runs one request to completion, printing the continuation as it is produced.
pub async fn run(args: RunArgs) -> Result<(), GenerateError> {
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        max_tokens: args.max_tokens,
        stop: args.stop.clone(),
        seed: args.seed,
    };
    params.validate()?;
    let temporary;
    let state_dir = match &args.state_dir {
        Some(dir) => dir.clone(),
        None => {
            temporary = tempfile::tempdir().map_err(|e| GenerateError::State {
                path: std::env::temp_dir(),
                reason: e.to_string(),
            })?;
            temporary.path().to_path_buf()
        }
    };
    let mut config = config(&args.model, &args.devices, &state_dir, args.kv_budget_mb)?;
    config.flush = args.flush;
    config.kv_dtype = args.kv_dtype;
    // Booting takes the state directory's lock: nothing is written there before it.
    let runtime = Runtime::boot(config).await?;
    if let Err(e) = write_record(
        &state_dir,
        &RunRecord {
            model: absolute(&args.model),
            devices: args.devices.clone(),
            kv_budget_mb: args.kv_budget_mb,
            kv_dtype: format!("{:?}", args.kv_dtype).to_lowercase(),
        },
    ) {
        runtime.shutdown("run record not written").await;
        return Err(e);
    }
    let outcome = match runtime.submit(&args.prompt, params).await {
        Ok(stream) => print_stream(&runtime, stream).await,
        Err(err) => Err(err.into()),
    };
    runtime.shutdown("run finished").await;
    outcome
}

/// Resumes the unfinished requests of a state directory.
pub async fn resume(args: ResumeArgs) -> Result<(), GenerateError> {
    let record_path = args.state_dir.join(RUN_RECORD);
    let text = std::fs::read_to_string(&record_path)
        .map_err(|_| GenerateError::NothingToResume(args.state_dir.clone()))?;
    let record: RunRecord = serde_json::from_str(&text).map_err(|e| GenerateError::State {
        path: record_path.clone(),
        reason: e.to_string(),
    })?;
    let model = args.model.unwrap_or(record.model);
    let devices = args.devices.unwrap_or(record.devices);
    let mut config = config(&model, &devices, &args.state_dir, record.kv_budget_mb)?;
    // Records of older builds have no type: their pools were f32.
    if !record.kv_dtype.is_empty() {
        config.kv_dtype = record
            .kv_dtype
            .parse()
            .map_err(|reason| GenerateError::State {
                path: record_path.clone(),
                reason,
            })?;
    }
    let runtime = Runtime::boot(config).await?;
    let mut outcome = Ok(());
    match runtime.resume_unfinished().await {
        Ok(streams) => {
            for stream in streams {
                if let Err(err) = print_stream(&runtime, stream).await {
                    outcome = Err(err);
                    break;
                }
            }
        }
        Err(err) => outcome = Err(err.into()),
    }
    runtime.shutdown("resume finished").await;
    outcome
}

fn config(
    model: &Path,
    devices: &str,
    state_dir: &Path,
    kv_budget_mb: usize,
) -> Result<RuntimeConfig, GenerateError> {
    let mut config = RuntimeConfig::new(model, state_dir);
    config.load_progress = Some(crate::progress::model_load_progress());
    config.devices = parse_device_list(devices)?;
    config.kv_budget_bytes = kv_budget_mb.saturating_mul(1 << 20);
    Ok(config)
}

fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

fn write_record(dir: &Path, record: &RunRecord) -> Result<(), GenerateError> {
    std::fs::create_dir_all(dir).map_err(|e| GenerateError::State {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let path = dir.join(RUN_RECORD);
    let json = serde_json::to_string_pretty(record).map_err(|e| GenerateError::State {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    std::fs::write(&path, json).map_err(|e| GenerateError::State {
        path,
        reason: e.to_string(),
    })
}

/// Prints each token's text as it arrives. The delivery cursor is journaled just before
/// the text is written: whatever a reader of stdout has seen is then always recorded, so
/// a resume never repeats it. (A pipe and a file cannot be written atomically together:
/// a SIGKILL in the microseconds between the record and the write would drop that one
/// token's text from the joined output; recording after the write would repeat it instead,
/// and its window would open exactly when a reader wakes up on the new bytes.)
async fn print_stream(runtime: &Runtime, mut stream: RequestStream) -> Result<(), GenerateError> {
    let mut stdout = std::io::stdout();
    while let Some(event) = stream.events.recv().await {
        match event {
            StreamEvent::Token { index, text, .. } => {
                runtime.record_delivered(stream.id, index + 1)?;
                stdout.write_all(text.as_bytes())?;
                stdout.flush()?;
            }
            StreamEvent::Finished { .. } => {
                stdout.write_all(b"\n")?;
                stdout.flush()?;
                return Ok(());
            }
            StreamEvent::Failed { error } => return Err(GenerateError::Failed(error)),
        }
    }
    Err(GenerateError::Failed(
        "the request ended without finishing".into(),
    ))
}
