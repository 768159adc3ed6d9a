//! `llmos serve`: boots the inference tree, resumes the requests a previous process left
//! unfinished in the state directory, and serves the OpenAI-compatible HTTP gateway
//! (`llmos-gateway`) until SIGINT/SIGTERM.
//!
//! Without `--model` a tiny random-weight model is synthesised into the state directory,
//! so the command works on a fresh machine with no download (its text is gibberish; pass
//! `--model FILE.gguf` or `--model HF_DIR` for a real one). Without `--state-dir` a
//! temporary directory is used and removed at exit: requests then do not survive a crash.
//!
//! Shutdown: the kernel's signal handler (`Kernel::shutdown_on_signal`) owns SIGINT and
//! SIGTERM; the listener stops accepting the moment the tree's shutdown starts, open
//! streams get a short grace period, then the process exits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use llmos_device::parse_device_list;
use llmos_gateway::GatewayConfig;
use llmos_inference::{Runtime, RuntimeConfig};
use llmos_kernel::{KernelEvent, TreeExit};
use llmos_models::synth::{self, Preset};
use llmos_models::GgmlDType;

/// How long open connections (e.g. streams) may take to end once the tree has stopped.
const GRACE: Duration = Duration::from_secs(2);

/// `llmos serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Model: a GGUF file or a Hugging Face directory. Omitted: a tiny synthetic model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Address to listen on (loopback by default; port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// State directory (journal, KV pool, control socket): requests resume from it after a
    /// crash, and `llmos repl`/`llmos ctl` attach through it (same default).
    #[arg(long, default_value = "llmos-state")]
    state_dir: PathBuf,
    /// Devices in preference order, e.g. `cpu:0,cpu:1`.
    #[arg(long, default_value = "cpu:0")]
    devices: String,
    /// Require `Authorization: Bearer KEY` (also from env LLMOS_API_KEY).
    #[arg(long)]
    api_key: Option<String>,
    /// Requests generating at once; more get 429.
    #[arg(long, default_value_t = 64)]
    max_active: usize,
    /// KV-cache memory per device, MiB.
    #[arg(long, default_value_t = 256)]
    kv_budget_mb: usize,
}

/// Runs the server until a signal or the tree's failure.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let state_dir = args.state_dir.clone();
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("cannot create {}", state_dir.display()))?;
    let model = match &args.model {
        Some(model) => model.clone(),
        None => synthesize(&state_dir)?,
    };
    let mut config = RuntimeConfig::new(&model, &state_dir);
    config.devices = parse_device_list(&args.devices)?;
    config.max_active = args.max_active.max(1);
    config.kv_budget_bytes = args.kv_budget_mb.saturating_mul(1 << 20);
    tracing::info!(model = %model.display(), devices = %args.devices, "loading the model");
    // A second server on the same state directory would fight over the journal and the
    // control socket: refuse clearly before booting anything.
    llmos_control::check_socket_free(&state_dir)?;
    let runtime = Runtime::boot_with(config, |services| {
        vec![llmos_control::control_spec(services.clone())]
    })
    .await?;
    // Unfinished requests of an earlier process continue now; their clients reattach
    // through /v1/requests/{id}/events, so the streams returned here are not read.
    let resumed = runtime.resume_unfinished().await?;
    if !resumed.is_empty() {
        tracing::info!(count = resumed.len(), "resumed unfinished requests");
    }
    drop(resumed);

    let api_key = args
        .api_key
        .clone()
        .or_else(|| std::env::var("LLMOS_API_KEY").ok())
        .filter(|k| !k.is_empty());
    let router = llmos_gateway::router(runtime.clone(), GatewayConfig { api_key })
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.addr))?;
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
    tracing::info!(%local, "serving the OpenAI-compatible API");
    let server = llmos_gateway::serve(listener, router, stop_listening);
    let exit = tokio::select! {
        served = server => {
            served.context("the HTTP server failed")?;
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
    match exit {
        TreeExit::Shutdown => {
            tracing::info!("shut down");
            Ok(())
        }
        TreeExit::RootFailed(reason) => anyhow::bail!("the supervision tree failed: {reason}"),
    }
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
