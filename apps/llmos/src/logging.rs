//! Process-wide logging: `tracing` records on stderr (stdout carries each command's own
//! output), filtered by `RUST_LOG` (else the configuration's filter, else `info`), as
//! text or JSON lines.

use std::io::IsTerminal as _;

use tracing_subscriber::filter::{EnvFilter, FromEnvError, LevelFilter};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::{SubscriberInitExt as _, TryInitError};

/// Logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// `RUST_LOG` holds directives the filter cannot parse. Not a `#[source]`: its chain
    /// repeats the same message at every level.
    #[error("invalid RUST_LOG: {0}")]
    Filter(FromEnvError),
    /// The configuration's `log_filter` cannot be parsed.
    #[error("invalid log_filter {0:?}: {1}")]
    ConfigFilter(String, String),
    /// Another global subscriber was installed first.
    #[error("a global logger is already installed")]
    Init(#[from] TryInitError),
}

/// Installs the global subscriber, and a panic hook that logs through it.
pub fn init(json: bool, configured_filter: Option<&str>) -> Result<(), LoggingError> {
    let from_env = std::env::var("RUST_LOG").is_ok_and(|v| !v.is_empty());
    let builder = EnvFilter::builder().with_default_directive(LevelFilter::INFO.into());
    let filter = match configured_filter {
        Some(directives) if !from_env => builder
            .parse(directives)
            .map_err(|e| LoggingError::ConfigFilter(directives.to_string(), e.to_string()))?,
        _ => builder.from_env().map_err(LoggingError::Filter)?,
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry.with(layer.json()).try_init()?;
    } else {
        registry.with(layer).try_init()?;
    }
    log_panics();
    Ok(())
}

/// Actor panics are caught and handled by the kernel, yet the default hook would still write
/// them raw to stderr, in the middle of (JSON) log lines; log them as records instead.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(panic payload is not a string)");
        let location = info.location().map(ToString::to_string).unwrap_or_default();
        let thread = std::thread::current();
        tracing::error!(
            target: "llmos::panic",
            thread = thread.name().unwrap_or("<unnamed>"),
            %location,
            "panicked: {message}"
        );
    }));
}
