//! `llmos`: the single binary of LLMasOS. Each subcommand lives in its own module; this file
//! parses the command line, sets up logging and the async runtime, and is the only place
//! where errors become `anyhow` errors and an exit status.

mod apps;
mod config;
mod control;
mod demo;
mod generate;
mod logging;
mod model;
mod output;
mod progress;
mod serve;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::output::{Format, Output};

/// LLMasOS: an Erlang/OTP-style supervision tree that hosts LLM apps.
#[derive(Debug, Parser)]
#[command(name = "llmos", version, about, propagate_version = true)]
struct Cli {
    /// Machine-readable output: JSON log lines on stderr, one JSON object per line on stdout.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

/// The subcommands; each has a module of the same name.
#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a small tree of real actors, crash one through a fault point, watch the kernel
    /// restart it, then shut down in order.
    Demo(demo::DemoArgs),
    /// Generate a continuation of a prompt, streamed to stdout as it is produced.
    Run(generate::RunArgs),
    /// Continue the unfinished request of an interrupted `run --state-dir DIR`.
    Resume(generate::ResumeArgs),
    /// Model tools.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Interactive console of a running server: tree, ps, top, kill, inject… (module control).
    Repl(control::ReplArgs),
    /// Run one console command against a running server and exit (module control).
    Ctl(control::CtlArgs),
    /// Serve the OpenAI-compatible HTTP API (synthesises a tiny model without --model).
    Serve(serve::ServeArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // One clear line (with its causes), never a backtrace: this is the user's error.
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let format = if cli.json {
        Format::Json
    } else {
        Format::Human
    };
    // `serve --config` may set up logging, so it is read first.
    let serve_config = match &cli.command {
        Command::Serve(args) => Some(args.file_config()?),
        _ => None,
    };
    let log_json = cli.json
        || serve_config
            .as_ref()
            .and_then(|c| c.log_format)
            .is_some_and(|f| f == config::LogFormat::Json);
    let log_filter = serve_config.as_ref().and_then(|c| c.log_filter.clone());
    logging::init(log_json, log_filter.as_deref()).context("cannot set up logging")?;
    // Before any thread reads the environment (see llmos_device::init_cpu_threads).
    llmos_device::init_cpu_threads(
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("llmos")
        .build()
        .context("cannot start the async runtime")?;
    let output = Output::stdout(format);
    match cli.command {
        Command::Demo(args) => runtime.block_on(demo::run(args, output))?,
        Command::Run(args) => runtime.block_on(generate::run(args))?,
        Command::Resume(args) => runtime.block_on(generate::resume(args))?,
        Command::Model(command) => model::run(command)?,
        Command::Repl(args) => control::repl(args)?,
        Command::Ctl(args) => control::ctl(args, format)?,
        Command::Serve(args) => {
            let file = serve_config.unwrap_or_default();
            runtime.block_on(serve::run(args, file))?
        }
    }
    Ok(())
}
