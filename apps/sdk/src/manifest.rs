//! What an app declares about itself (restart policy, quotas, where its routes mount) and
//! how the operator's configuration (`[apps.NAME]` in the TOML file) overrides it.

use std::time::Duration;

use llmos_kernel::{Backoff, RestartType};
use serde::{Deserialize, Serialize};

use crate::AppError;

/// How the `apps` supervisor treats an app that crashes.
#[derive(Clone, Debug, PartialEq)]
pub struct RestartPolicy {
    /// Permanent: always restarted; transient: restarted after a crash, not after a normal
    /// stop; temporary: never restarted.
    pub restart: RestartType,
    /// More than this many restarts within `period` and the app is given up: stopped and
    /// reported failed (`/health`, `GET /apps`), while everything else keeps running.
    pub max_restarts: u32,
    /// The window of `max_restarts`.
    pub period: Duration,
    /// First restart delay, doubled per recent restart up to `max_backoff`.
    pub min_backoff: Duration,
    /// The cap of the restart delay.
    pub max_backoff: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            restart: RestartType::Permanent,
            max_restarts: 5,
            period: Duration::from_secs(10),
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
        }
    }
}

impl RestartPolicy {
    /// The kernel backoff this policy asks for.
    pub(crate) fn backoff(&self) -> Backoff {
        if self.max_backoff.is_zero() {
            Backoff::none()
        } else {
            Backoff::exponential(self.min_backoff, self.max_backoff)
        }
    }
}

/// Limits on what one app may hold at once, checked before each request is submitted.
/// `None` is unlimited (the runtime's own admission still applies).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Quotas {
    /// Requests generating at once for this app.
    pub max_concurrent_requests: Option<usize>,
    /// KV-cache blocks its running requests may need at most (a request needs
    /// `ceil(min(prompt + max_tokens, context) / block_tokens)`).
    pub max_kv_blocks: Option<usize>,
}

/// What an app declares: the defaults the operator's configuration may override.
#[derive(Clone, Debug, PartialEq)]
pub struct AppManifest {
    /// One line for `GET /apps` and `llmos apps`.
    pub description: String,
    /// Restart policy.
    pub policy: RestartPolicy,
    /// Quotas.
    pub quotas: Quotas,
    /// Also serve the app's routes at `/` (beside `/apps/NAME/`). The OpenAI gateway does,
    /// so clients find `/v1/...` where they expect it; at most one enabled app may.
    pub mount_root: bool,
}

impl AppManifest {
    /// A manifest with defaults: permanent, 5 restarts in 10 s, no quotas, not at `/`.
    pub fn new(description: impl Into<String>) -> Self {
        Self {
            description: description.into(),
            policy: RestartPolicy::default(),
            quotas: Quotas::default(),
            mount_root: false,
        }
    }

    /// Sets the restart policy.
    pub fn policy(mut self, policy: RestartPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets the quotas.
    pub fn quotas(mut self, quotas: Quotas) -> Self {
        self.quotas = quotas;
        self
    }

    /// Serves the routes at `/` too.
    pub fn mount_root(mut self, yes: bool) -> Self {
        self.mount_root = yes;
        self
    }

    /// This manifest with the operator's overrides applied, checked.
    pub fn with_config(mut self, app: &str, config: &AppConfig) -> Result<Self, AppError> {
        let bad = |what: &str| Err(AppError::Config(format!("[apps.{app}] {what}")));
        if let Some(restart) = config.restart {
            self.policy.restart = match restart {
                RestartName::Permanent => RestartType::Permanent,
                RestartName::Transient => RestartType::Transient,
                RestartName::Temporary => RestartType::Temporary,
            };
        }
        if let Some(n) = config.max_restarts {
            self.policy.max_restarts = n;
        }
        if let Some(secs) = config.period_secs {
            if !(secs.is_finite() && secs > 0.0 && secs <= 86_400.0) {
                return bad("period_secs must be in (0, 86400]");
            }
            self.policy.period = Duration::from_secs_f64(secs);
        }
        if let Some(ms) = config.max_backoff_ms {
            self.policy.max_backoff = Duration::from_millis(ms);
            self.policy.min_backoff = self.policy.min_backoff.min(self.policy.max_backoff);
        }
        if let Some(n) = config.max_concurrent_requests {
            if n == 0 {
                return bad("max_concurrent_requests must be at least 1");
            }
            self.quotas.max_concurrent_requests = Some(n);
        }
        if let Some(n) = config.max_kv_blocks {
            if n == 0 {
                return bad("max_kv_blocks must be at least 1");
            }
            self.quotas.max_kv_blocks = Some(n);
        }
        if let Some(root) = config.mount_root {
            self.mount_root = root;
        }
        Ok(self)
    }
}

/// Restart type names in the configuration file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartName {
    /// Always restarted.
    Permanent,
    /// Restarted after a crash only.
    Transient,
    /// Never restarted.
    Temporary,
}

/// One `[apps.NAME]` table of the configuration file. Every field is optional: what is
/// missing comes from the app's manifest. `settings` is handed to the app's constructor.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// Run the app (default: what the registration says).
    pub enabled: Option<bool>,
    /// `permanent`, `transient` or `temporary`.
    pub restart: Option<RestartName>,
    /// Restarts allowed within `period_secs` before the app is given up.
    pub max_restarts: Option<u32>,
    /// The restart-intensity window, seconds.
    pub period_secs: Option<f64>,
    /// Cap of the restart backoff, milliseconds (0: restart at once).
    pub max_backoff_ms: Option<u64>,
    /// Quota: requests generating at once.
    pub max_concurrent_requests: Option<usize>,
    /// Quota: KV blocks of running requests.
    pub max_kv_blocks: Option<usize>,
    /// Also serve the routes at `/`.
    pub mount_root: Option<bool>,
    /// App-specific settings.
    #[serde(default)]
    pub settings: serde_json::Value,
}
