//! `/health` and `/metrics`: what the supervision tree, the devices and the journal say,
//! plus the gateway's own counters.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use llmos_app::AppHost;
use llmos_inference::Runtime;
use llmos_kernel::{NodeSnapshot, NodeState};
use serde_json::{json, Value};

/// The HTTP front door's counters (requests admitted, tokens sent, HTTP answers by route
/// and status), shared by the OpenAI app and `/metrics`.
pub struct Metrics {
    started: Instant,
    requests: AtomicU64,
    tokens: AtomicU64,
    http: Mutex<BTreeMap<(String, u16), u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            requests: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
            http: Mutex::new(BTreeMap::new()),
        }
    }
}

/// The `/health` answer.
pub(crate) struct Health {
    pub ok: bool,
    pub body: Value,
}

/// Healthy means: no node of the tree failed or restarting, every device healthy, the
/// journal open and its most recent append successful. Anything else is listed in
/// `reasons` and answers 503.
pub(crate) fn health(runtime: &Runtime, apps: Option<&AppHost>) -> Health {
    let mut reasons = Vec::new();
    let snapshot = runtime.kernel().snapshot();
    for node in snapshot.nodes() {
        match node.state {
            NodeState::Failed | NodeState::Restarting | NodeState::Stopped => {
                // Finished request tasks are removed from the tree; a stopped node that is
                // still listed is one that is not coming back.
                reasons.push(format!("{}: {:?}", node.path, node.state).to_lowercase());
            }
            NodeState::Starting | NodeState::Running => {}
        }
    }
    let services = runtime.services();
    let mut devices = Vec::new();
    for device in &services.devices {
        let healthy = device.device.is_healthy();
        if !healthy {
            reasons.push(format!("device {} lost", device.device.id()));
        }
        devices.push(json!({ "id": device.device.id().to_string(), "healthy": healthy }));
    }
    let journal_open = services.journal().is_ok();
    if !journal_open {
        reasons.push("journal not open".into());
    }
    let appends = services.journal_health();
    if appends.failing {
        reasons.push(format!(
            "journal failing: {}",
            appends.last_error.as_deref().unwrap_or("append failed")
        ));
    }
    let journal_state = match (journal_open, appends.failing) {
        (false, _) => "closed",
        (true, true) => "failing",
        (true, false) => "open",
    };
    let last_failure_unix_ms = appends.last_failure_at.map(|at| {
        at.duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    });
    let failure_age_secs = appends.last_failure_at.map(|at| {
        SystemTime::now()
            .duration_since(at)
            .map_or(0.0, |d| d.as_secs_f64())
    });
    let apps_status = apps.map(AppHost::status).unwrap_or_default();
    if let Some(apps) = apps {
        reasons.extend(apps.health_reasons());
    }
    let ok = reasons.is_empty();
    Health {
        ok,
        body: json!({
            "status": if ok { "ok" } else { "unhealthy" },
            "reasons": reasons,
            "devices": devices,
            "journal": {
                "state": journal_state,
                "consecutive_failures": appends.consecutive_failures,
                "failures_total": appends.failures_total,
                "last_error": appends.last_error,
                "last_failure_unix_ms": last_failure_unix_ms,
                "last_failure_age_seconds": failure_age_secs,
            },
            "active_requests": runtime.active_requests(),
            "apps": apps_status
                .iter()
                .map(|a| json!({"name": a.name, "state": a.state, "restarts": a.restarts}))
                .collect::<Vec<_>>(),
        }),
    }
}

impl Metrics {
    pub(crate) fn admitted(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn token(&self) {
        self.tokens.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_http(&self, path: &str, status: u16) {
        // Bounded label set: known routes by name, everything else as "other".
        let route = match path {
            "/v1/completions" | "/v1/chat/completions" | "/v1/models" | "/health" | "/metrics" => {
                path
            }
            p if p.starts_with("/v1/requests/") => "/v1/requests/{id}/events",
            // One label per app name would let a client mint labels: apps share one.
            p if p == "/apps" || p.starts_with("/apps/") => "/apps",
            _ => "other",
        };
        *self
            .http
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((route.to_string(), status))
            .or_insert(0) += 1;
    }

    /// The counters as JSON (`GET /apps/openai/stats`).
    pub(crate) fn counters(&self) -> Value {
        json!({
            "requests": self.requests.load(Ordering::Relaxed),
            "tokens": self.tokens.load(Ordering::Relaxed),
            "uptime_seconds": self.started.elapsed().as_secs_f64(),
        })
    }

    /// Prometheus text exposition.
    pub(crate) fn render(&self, runtime: &Runtime, apps: Option<&AppHost>) -> String {
        let mut out = String::new();
        let uptime = self.started.elapsed().as_secs_f64();
        let tokens = self.tokens.load(Ordering::Relaxed);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let http: Vec<(String, f64)> = self
            .http
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|((route, status), n)| {
                (
                    format!("{{route=\"{route}\",status=\"{status}\"}}"),
                    *n as f64,
                )
            })
            .collect();
        metric(
            "llmos_http_requests_total",
            "counter",
            "HTTP requests by route and status.",
            &http,
        );
        metric(
            "llmos_requests_total",
            "counter",
            "Generation requests admitted by the gateway.",
            &[(String::new(), self.requests.load(Ordering::Relaxed) as f64)],
        );
        metric(
            "llmos_tokens_total",
            "counter",
            "Tokens streamed or returned to clients.",
            &[(String::new(), tokens as f64)],
        );
        metric(
            "llmos_tokens_per_second",
            "gauge",
            "Mean tokens per second since the gateway started (use rate(llmos_tokens_total) for a window).",
            &[(String::new(), if uptime > 0.0 { tokens as f64 / uptime } else { 0.0 })],
        );
        let journal = runtime.services().journal_health();
        metric(
            "llmos_journal_append_failures_total",
            "counter",
            "Journal appends that failed (each retry counts; refused records do not).",
            &[(String::new(), journal.failures_total as f64)],
        );
        metric(
            "llmos_journal_failing",
            "gauge",
            "1 while the most recent journal append failed.",
            &[(String::new(), f64::from(u8::from(journal.failing)))],
        );
        metric(
            "llmos_queue_depth",
            "gauge",
            "Requests admitted and not yet finished.",
            &[(String::new(), runtime.active_requests() as f64)],
        );
        let mut kv = Vec::new();
        let mut healthy = Vec::new();
        for device in &runtime.services().devices {
            let id = device.device.id().to_string();
            let stats = device.pool.stats();
            for (state, n) in [
                ("used", stats.used),
                ("free", stats.free),
                ("restorable", stats.restorable),
                ("total", stats.total),
            ] {
                kv.push((format!("{{device=\"{id}\",state=\"{state}\"}}"), n as f64));
            }
            healthy.push((
                format!("{{device=\"{id}\"}}"),
                f64::from(u8::from(device.device.is_healthy())),
            ));
        }
        metric(
            "llmos_kv_blocks",
            "gauge",
            "KV cache blocks per device by state.",
            &kv,
        );
        metric(
            "llmos_device_healthy",
            "gauge",
            "1 when the device is healthy.",
            &healthy,
        );
        let snapshot = runtime.kernel().snapshot();
        let nodes: Vec<&NodeSnapshot> = snapshot.nodes();
        let per = |f: &dyn Fn(&NodeSnapshot) -> Option<f64>| -> Vec<(String, f64)> {
            nodes
                .iter()
                .filter_map(|n| f(n).map(|v| (format!("{{actor=\"{}\"}}", n.path), v)))
                .collect()
        };
        metric(
            "llmos_actor_restarts_total",
            "counter",
            "Restarts per actor.",
            &per(&|n| Some(n.restarts as f64)),
        );
        metric(
            "llmos_actor_failures_total",
            "counter",
            "Failures per actor.",
            &per(&|n| Some(n.reliability.failures as f64)),
        );
        metric(
            "llmos_actor_mtbf_seconds",
            "gauge",
            "Mean time between failures per actor (only actors that failed).",
            &per(&|n| n.reliability.mtbf_secs),
        );
        metric(
            "llmos_actor_mttr_seconds",
            "gauge",
            "Mean time to repair per actor.",
            &per(&|n| n.reliability.mttr_secs),
        );
        metric(
            "llmos_actor_availability",
            "gauge",
            "MTBF / (MTBF + MTTR) per actor.",
            &per(&|n| Some(n.reliability.availability)),
        );
        metric(
            "llmos_actor_messages_total",
            "counter",
            "Messages handled per actor.",
            &per(&|n| Some(n.messages_handled as f64)),
        );
        let apps = apps.map(AppHost::status).unwrap_or_default();
        let per_app = |f: &dyn Fn(&llmos_app::AppStatus) -> f64| -> Vec<(String, f64)> {
            apps.iter()
                .map(|a| (format!("{{app=\"{}\"}}", a.name), f(a)))
                .collect()
        };
        metric(
            "llmos_app_up",
            "gauge",
            "1 while the app's actor is running (0 restarting, given up or stopped).",
            &per_app(&|a| f64::from(u8::from(a.state == "running"))),
        );
        metric(
            "llmos_app_restarts_total",
            "counter",
            "Restarts of each app's actor.",
            &per_app(&|a| a.restarts as f64),
        );
        metric(
            "llmos_app_requests_in_flight",
            "gauge",
            "Requests each app has generating now (counted against its quota).",
            &per_app(&|a| a.usage.requests as f64),
        );
        metric(
            "llmos_app_kv_blocks_reserved",
            "gauge",
            "KV blocks each app's running requests may need at most (counted for apps with a KV quota).",
            &per_app(&|a| a.usage.kv_blocks as f64),
        );
        metric(
            "llmos_app_quota_refusals_total",
            "counter",
            "Requests each app's quotas refused.",
            &per_app(&|a| a.usage.refused as f64),
        );
        out
    }
}
