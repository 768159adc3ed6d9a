//! `llmos serve --config FILE`: a TOML file for everything the flags set, plus apps, their
//! quotas and restart policies, the journal's flush policy and logging. Flags override
//! the file; the file overrides the defaults. Relative paths in the file are relative to
//! the file's own directory, so a configuration can travel with its model.
//!
//! ```toml
//! model = "models/stories260K.gguf"   # GGUF file or Hugging Face directory
//! addr = "127.0.0.1:8080"
//! state_dir = "llmos-state"
//! devices = "cpu:0,cpu:1"
//! api_key = "secret"                   # or env LLMOS_API_KEY
//! max_active = 256                     # requests admitted at once; more queue
//! max_queued = 1024                    # admissions waiting for a slot; more get 429
//! max_batch_tokens = 512               # token rows per engine step
//! prefill_stall = 2.0                  # a step with prefill takes ≤ 2× a decode step
//! kv_budget_mb = 256                   # KV memory per device
//! kv_dtype = "f16"                     # K/V stored as f32 (default) or f16
//! flush = "every-token"                # or "interval:5", "off"
//! log_format = "json"                  # or "text"
//! log_filter = "info,llmos::apps=debug" # RUST_LOG wins when set
//!
//! [apps.chat]
//! enabled = true
//! max_concurrent_requests = 2
//! max_kv_blocks = 256
//! restart = "permanent"                # transient, temporary
//! max_restarts = 5
//! period_secs = 10
//! [apps.chat.settings]                 # handed to the app
//! max_turns = 50
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use llmos_app::AppConfig;
use serde::Deserialize;

/// A configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read the configuration {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape (the message names the key and
    /// the line).
    #[error("configuration {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        message: String,
    },
}

/// How log records are written.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The configuration file. Every key is optional.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// GGUF file or Hugging Face directory.
    pub model: Option<PathBuf>,
    /// Address to listen on.
    pub addr: Option<SocketAddr>,
    /// State directory.
    pub state_dir: Option<PathBuf>,
    /// Devices in preference order, e.g. `cpu:0,cpu:1`.
    pub devices: Option<String>,
    /// Required bearer key.
    pub api_key: Option<String>,
    /// Requests admitted at once (running, or waiting in an engine for KV memory).
    pub max_active: Option<usize>,
    /// Admissions that may wait for a slot.
    pub max_queued: Option<usize>,
    /// Token rows per engine step.
    pub max_batch_tokens: Option<usize>,
    /// While requests decode, a step that also prefills may take this many times a
    /// decode-only step.
    pub prefill_stall: Option<f64>,
    /// KV memory per device, MiB.
    pub kv_budget_mb: Option<usize>,
    /// K/V element type: `f32` or `f16`.
    pub kv_dtype: Option<String>,
    /// Journal flush policy: `every-token`, `interval:MS`, `off`.
    pub flush: Option<String>,
    /// Log format.
    pub log_format: Option<LogFormat>,
    /// Log filter (`RUST_LOG` syntax); the environment variable wins when set.
    pub log_filter: Option<String>,
    /// `[apps.NAME]` tables.
    #[serde(default)]
    pub apps: BTreeMap<String, AppConfig>,
}

impl FileConfig {
    /// Reads and checks `path`; relative paths in it become relative to its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut config.model, &mut config.state_dir]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(config)
    }

    /// Parses TOML text; the error names the key and the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let config: FileConfig = toml::from_str(text).map_err(|e| one_line(text, &e))?;
        if let Some(flush) = &config.flush {
            crate::generate::parse_flush(flush).map_err(|e| format!("flush = {flush:?}: {e}"))?;
        }
        if let Some(devices) = &config.devices {
            llmos_device::parse_device_list(devices)
                .map_err(|e| format!("devices = {devices:?}: {e}"))?;
        }
        Ok(config)
    }
}

/// A TOML error as one line, ``line L, column C (`SOURCE LINE`): MESSAGE`` (toml's own
/// rendering spans several lines with a snippet; ours print one `error:` line).
fn one_line(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim().replace('\n', " ");
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            let column = before.len() - line_start + 1;
            let source = text[line_start..].lines().next().unwrap_or("").trim();
            format!("line {line}, column {column} (`{source}`): {message}")
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses() {
        let config = FileConfig::parse(
            r#"
            model = "m.gguf"
            addr = "127.0.0.1:9000"
            devices = "cpu:0,cpu:1"
            max_active = 8
            kv_budget_mb = 64
            flush = "interval:5"
            log_format = "json"
            [apps.chat]
            enabled = true
            max_concurrent_requests = 2
            restart = "transient"
            [apps.chat.settings]
            max_turns = 3
            "#,
        )
        .unwrap();
        assert_eq!(config.max_active, Some(8));
        assert_eq!(config.log_format, Some(LogFormat::Json));
        let chat = &config.apps["chat"];
        assert_eq!(chat.enabled, Some(true));
        assert_eq!(chat.max_concurrent_requests, Some(2));
        assert_eq!(chat.settings["max_turns"], 3);
    }

    #[test]
    fn mistakes_are_named_with_their_line() {
        for (text, expect) in [
            ("modle = \"x\"", "unknown field `modle`"),
            ("max_active = \"many\"", "max_active"),
            ("[apps.chat]\nenabeld = true", "unknown field `enabeld`"),
            ("[apps.chat]\nrestart = \"sometimes\"", "sometimes"),
            ("flush = \"sometimes\"", "flush"),
            ("devices = \"tpu:0\"", "devices"),
            ("addr = \"not an address\"", "addr"),
            ("model = ", "line 1"),
        ] {
            let err = FileConfig::parse(text).unwrap_err();
            assert!(err.contains(expect), "{text:?}: {err}");
        }
    }
}
