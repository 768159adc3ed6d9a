//! `llmos serve`: boots the inference tree, resumes the requests a previous process left
//! unfinished in the state directory, starts the enabled apps under `apps` (the OpenAI
//! gateway among them, module `apps`) and serves their HTTP routes until SIGINT/SIGTERM.
//! Options come from flags, then `--config FILE` (module `config`), then defaults.
//!
//! Without a model a tiny random-weight model is synthesised into the state directory,
//! so the command works on a fresh machine with no download (its text is gibberish; pass
//! `--model FILE.gguf` or `--model HF_DIR` for a real one).
//!
//! Shutdown: the kernel's signal handler (`Kernel::shutdown_on_signal`) owns SIGINT and
//! SIGTERM; the listener stops accepting the moment the tree's shutdown starts, open
//! streams get a short grace period, then the process exits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use llmos_app::AppHost;
use llmos_device::parse_device_list;
use llmos_gateway::{GatewayConfig, Metrics};
use llmos_inference::{KvDtype, Runtime, RuntimeConfig};
use llmos_journal::FlushPolicy;
use llmos_kernel::{KernelEvent, TreeExit};
use llmos_models::synth::{self, Preset};
use llmos_models::GgmlDType;

use crate::config::FileConfig;
use crate::generate::parse_flush;

/// How long open connections (e.g. streams) may take to end once the tree has stopped.
const GRACE: Duration = Duration::from_secs(2);

/// `llmos serve`. Every option can also come from `--config FILE`; a flag wins.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration: the options below, plus apps, quotas, flush policy, logging
    /// (README.md, "Configuration"). Flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model: a GGUF file or a Hugging Face directory. Omitted: a tiny synthetic model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080] (loopback; port 0 picks a free port).
    #[arg(long)]
    addr: Option<SocketAddr>,
    /// State directory [default: llmos-state] (journal, KV pool, app checkpoints, control
    /// socket): requests and apps resume from it after a crash, and `llmos repl`/`llmos
    /// ctl` attach through it (same default).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Devices in preference order [default: cpu:0], e.g. `cpu:0,cpu:1`.
    #[arg(long)]
    devices: Option<String>,
    /// Require `Authorization: Bearer KEY` (also from env LLMOS_API_KEY).
    #[arg(long)]
    api_key: Option<String>,
    /// Requests admitted at once [default: 256] (running, or waiting in an engine for KV
    /// memory); more wait in the admission queue.
    #[arg(long)]
    max_active: Option<usize>,
    /// Admissions that may wait for a slot [default: 1024]; more get 429.
    #[arg(long)]
    max_queued: Option<usize>,
    /// Token rows per engine step [default: 512]: bounds a step's work (long prompts
    /// are chunked).
    #[arg(long)]
    max_batch_tokens: Option<usize>,
    /// While requests decode, a step that also prefills may take this many times a
    /// decode-only step [default: 2.0]: bounds the inter-token stall a new prompt causes.
    #[arg(long)]
    prefill_stall: Option<f64>,
    /// KV-cache memory per device, MiB [default: 256].
    #[arg(long)]
    kv_budget_mb: Option<usize>,
    /// How the KV cache stores keys and values [default: f32]: `f32` (exact) or `f16`
    /// (half the memory and bandwidth, as llama.cpp does by default).
    #[arg(long)]
    kv_dtype: Option<KvDtype>,
    /// When journal records reach the OS [default: every-token]: `every-token`,
    /// `interval:MS` or `off`.
    #[arg(long, value_parser = parse_flush)]
    flush: Option<FlushPolicy>,
    /// Apps to run, replacing the configuration's `enabled` settings, e.g.
    /// `openai,chat,batch` (built in: see `GET /apps`).
    #[arg(long, value_delimiter = ',')]
    apps: Option<Vec<String>>,
}

impl ServeArgs {
    /// The configuration file's contents (empty without `--config`).
    pub fn file_config(&self) -> anyhow::Result<FileConfig> {
        match &self.config {
            Some(path) => Ok(FileConfig::load(path)?),
            None => Ok(FileConfig::default()),
        }
    }
}

/// Runs the server until a signal or the tree's failure.
pub async fn run(args: ServeArgs, file: FileConfig) -> anyhow::Result<()> {
    let state_dir = args
        .state_dir
        .clone()
        .or(file.state_dir.clone())
        .unwrap_or_else(|| PathBuf::from("llmos-state"));
    let addr = args
        .addr
        .or(file.addr)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
    let devices = args
        .devices
        .clone()
        .or(file.devices.clone())
        .unwrap_or_else(|| "cpu:0".into());
    let flush = match (args.flush, &file.flush) {
        (Some(flush), _) => flush,
        (None, Some(text)) => parse_flush(text).map_err(anyhow::Error::msg)?,
        (None, None) => FlushPolicy::EveryRecord,
    };
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("cannot create {}", state_dir.display()))?;
    let model = match args.model.clone().or(file.model.clone()) {
        Some(model) => model,
        None => synthesize(&state_dir)?,
    };
    let mut config = RuntimeConfig::new(&model, &state_dir);
    config.devices = parse_device_list(&devices)?;
    config.max_active = args.max_active.or(file.max_active).unwrap_or(256).max(1);
    config.max_queued = args.max_queued.or(file.max_queued).unwrap_or(1024);
    config.max_batch_tokens = args
        .max_batch_tokens
        .or(file.max_batch_tokens)
        .unwrap_or(512)
        .max(1);
    config.max_batch_seqs = config.max_batch_seqs.min(config.max_batch_tokens);
    let stall = args.prefill_stall.or(file.prefill_stall).unwrap_or(2.0);
    if !(stall.is_finite() && stall >= 1.0) {
        anyhow::bail!("--prefill-stall must be a number ≥ 1, got {stall}");
    }
    config.prefill_stall = stall;
    config.kv_budget_bytes = args
        .kv_budget_mb
        .or(file.kv_budget_mb)
        .unwrap_or(256)
        .saturating_mul(1 << 20);
    config.flush = flush;
    config.kv_dtype = match (args.kv_dtype, &file.kv_dtype) {
        (Some(dtype), _) => dtype,
        (None, Some(text)) => text.parse().map_err(anyhow::Error::msg)?,
        (None, None) => KvDtype::F32,
    };
    config.load_progress = Some(crate::progress::model_load_progress());
    tracing::info!(model = %model.display(), %devices, "loading the model");
    // A second server on the same state directory would fight over the journal and the
    // control socket: refuse clearly before booting anything.
    llmos_control::check_socket_free(&state_dir)?;
    let runtime = Runtime::boot_with(config, |services| {
        vec![llmos_control::control_spec(services.clone())]
    })
    .await?;
    match serve(&runtime, &args, &file, addr).await {
        Ok(exit) => exit,
        Err(e) => {
            runtime.shutdown("start-up failed").await;
            Err(e)
        }
    }
}

/// Resumes unfinished requests, starts the apps and serves HTTP on a booted runtime.
/// The outer `Result` is a start-up failure (the caller stops the tree); the inner one is
/// how serving ended.
async fn serve(
    runtime: &Runtime,
    args: &ServeArgs,
    file: &FileConfig,
    addr: SocketAddr,
) -> anyhow::Result<anyhow::Result<()>> {
    // Unfinished requests of an earlier process continue now, before the apps start, so
    // apps re-attach to running requests; clients reattach through
    // /v1/requests/{id}/events, so the streams returned here are not read.
    let resumed = runtime.resume_unfinished().await?;
    if !resumed.is_empty() {
        tracing::info!(count = resumed.len(), "resumed unfinished requests");
    }
    drop(resumed);

    let metrics = Arc::new(Metrics::default());
    let registry = crate::apps::registry(metrics.clone());
    let host = AppHost::new(runtime, &registry, &file.apps, args.apps.as_deref())?;
    host.start().await?;
    tracing::info!(apps = ?host.names(), "apps started");
    let app_routes = host.router()?;

    let api_key = args
        .api_key
        .clone()
        .or_else(|| std::env::var("LLMOS_API_KEY").ok())
        .or(file.api_key.clone())
        .filter(|k| !k.is_empty());
    let router = llmos_gateway::front(
        runtime,
        metrics,
        Some(host),
        app_routes,
        GatewayConfig { api_key },
    );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;

    let kernel = runtime.kernel().clone();
    let mut events = kernel.subscribe();
    let mut tree_exit = tokio::spawn(kernel.shutdown_on_signal()?);
    let stop_listening = async move {
        while let Some(event) = events.next().await {
            if matches!(
                event,
                KernelEvent::ShutdownStarted { .. } | KernelEvent::RootFailed { .. }
            ) {
                break;
            }
        }
        tracing::info!("no longer accepting connections");
    };
    // stdout carries the one line a script needs: where to connect.
    println!("listening on http://{local}");
    tracing::info!(%local, "serving the OpenAI-compatible API and the apps");
    let server = llmos_gateway::serve(listener, router, stop_listening);
    let exit = tokio::select! {
        served = server => {
            if let Err(e) = served {
                return Ok(Err(anyhow::Error::new(e).context("the HTTP server failed")));
            }
            // Every connection closed: stop the tree if the signal path has not.
            runtime.shutdown("server stopped").await;
            tree_exit.await.unwrap_or(TreeExit::Shutdown)
        }
        exit = &mut tree_exit => {
            // Streams of a stopped tree never end on their own: give them a moment.
            tokio::time::sleep(GRACE).await;
            exit.unwrap_or(TreeExit::Shutdown)
        }
    };
    Ok(match exit {
        TreeExit::Shutdown => {
            tracing::info!("shut down");
            Ok(())
        }
        TreeExit::RootFailed(reason) => {
            Err(anyhow::anyhow!("the supervision tree failed: {reason}"))
        }
    })
}

/// Writes the tiny synthetic model into `dir` once and returns its path.
fn synthesize(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("synth-tiny.gguf");
    if !path.exists() {
        synth::write_gguf(&path, &Preset::TINY, GgmlDType::F32, 0)
            .context("cannot write the synthetic model")?;
    }
    tracing::warn!(
        model = %path.display(),
        "no --model: serving a tiny synthetic model (random weights, gibberish text); \
         pass --model FILE.gguf or --model HF_DIR (config.json, *.safetensors, tokenizer.json) \
         for a real one"
    );
    Ok(path)
}
