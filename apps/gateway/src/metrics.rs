//! `/health` and `/metrics`: what the supervision tree, the devices and the journal say,
//! plus the gateway's own counters.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use llmos_app::AppHost;
use llmos_inference::Runtime;
use llmos_kernel::{NodeKind, NodeSnapshot, NodeState, RestartType};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
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

/// Whether a node's normal exit is the end of its job (transient or temporary), not an
/// outage.
fn ends_by_design(kind: &NodeKind) -> bool {
    let restart = match kind {
        NodeKind::Worker { restart } => Some(*restart),
        NodeKind::Supervisor { restart, .. } => *restart,
    };
    matches!(
        restart,
        Some(RestartType::Transient) | Some(RestartType::Temporary)
    )
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
            // A transient or temporary child that stopped ended by design (a finished
            // request task on its way out of the tree: a snapshot can catch it between
            // its normal exit and its removal); it failed only if it is `Failed`.
            NodeState::Stopped if ends_by_design(&node.kind) => {}
            NodeState::Failed | NodeState::Restarting | NodeState::Stopped => {
                // A stopped permanent node that is still listed is one that is not
                // coming back.
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

    /// The OpenMetrics text exposition (`prometheus-client`): the gateway's counters, the
    /// engines' histograms and counters, and what the journal, the devices, the tree and
    /// the apps say at the moment of the scrape.
    pub(crate) fn render(&self, runtime: &Runtime, apps: Option<&AppHost>) -> String {
        let mut registry = Registry::default();
        let uptime = self.started.elapsed().as_secs_f64();
        let tokens = self.tokens.load(Ordering::Relaxed);
        let http = counters();
        for ((route, status), n) in self.http.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            http.get_or_create(&vec![
                ("route".to_string(), route.clone()),
                ("status".to_string(), status.to_string()),
            ])
            .inc_by(*n as f64);
        }
        registry.register(
            "llmos_http_requests",
            "HTTP requests by route and status",
            http,
        );
        registry.register(
            "llmos_requests",
            "Generation requests admitted by the gateway",
            counter(self.requests.load(Ordering::Relaxed) as f64),
        );
        registry.register(
            "llmos_tokens",
            "Tokens streamed or returned to clients",
            counter(tokens as f64),
        );
        registry.register(
            "llmos_tokens_per_second",
            "Mean tokens per second since the gateway started (use rate(llmos_tokens_total) for a window)",
            gauge(if uptime > 0.0 { tokens as f64 / uptime } else { 0.0 }),
        );
        let journal = runtime.services().journal_health();
        registry.register(
            "llmos_journal_append_failures",
            "Journal appends that failed (each retry counts; refused records do not)",
            counter(journal.failures_total as f64),
        );
        registry.register(
            "llmos_journal_failing",
            "1 while the most recent journal append failed",
            gauge(f64::from(u8::from(journal.failing))),
        );
        registry.register(
            "llmos_queue_depth",
            "Requests admitted and not yet finished",
            gauge(runtime.active_requests() as f64),
        );
        let kv = gauges();
        let healthy = gauges();
        for device in &runtime.services().devices {
            let id = device.device.id().to_string();
            let stats = device.pool.stats();
            for (state, n) in [
                ("used", stats.used),
                ("free", stats.free),
                ("restorable", stats.restorable),
                ("total", stats.total),
            ] {
                kv.get_or_create(&vec![
                    ("device".to_string(), id.clone()),
                    ("state".to_string(), state.to_string()),
                ])
                .set(n as f64);
            }
            healthy
                .get_or_create(&vec![("device".to_string(), id)])
                .set(f64::from(u8::from(device.device.is_healthy())));
        }
        registry.register("llmos_kv_blocks", "KV cache blocks per device by state", kv);
        registry.register(
            "llmos_device_healthy",
            "1 when the device is healthy",
            healthy,
        );
        let by_state = gauges();
        for status in runtime.services().request_status().values() {
            by_state
                .get_or_create(&vec![
                    ("device".to_string(), status.device.clone()),
                    ("state".to_string(), status.state.name().to_string()),
                ])
                .inc();
        }
        registry.register(
            "llmos_engine_requests",
            "Requests held by each engine, by state (queued, prefill, decode, preempted)",
            by_state,
        );
        runtime.services().metrics.register(&mut registry);

        let snapshot = runtime.kernel().snapshot();
        let nodes: Vec<&NodeSnapshot> = snapshot.nodes();
        let actor = |n: &NodeSnapshot| vec![("actor".to_string(), n.path.to_string())];
        let (restarts, failures, messages) = (counters(), counters(), counters());
        let (mtbf, mttr, availability) = (gauges(), gauges(), gauges());
        let mut hangs = 0u64;
        for n in &nodes {
            restarts.get_or_create(&actor(n)).inc_by(n.restarts as f64);
            failures
                .get_or_create(&actor(n))
                .inc_by(n.reliability.failures as f64);
            messages
                .get_or_create(&actor(n))
                .inc_by(n.messages_handled as f64);
            if let Some(v) = n.reliability.mtbf_secs {
                mtbf.get_or_create(&actor(n)).set(v);
            }
            if let Some(v) = n.reliability.mttr_secs {
                mttr.get_or_create(&actor(n)).set(v);
            }
            availability
                .get_or_create(&actor(n))
                .set(n.reliability.availability);
            hangs += n.hangs;
        }
        registry.register("llmos_actor_restarts", "Restarts per actor", restarts);
        registry.register("llmos_actor_failures", "Failures per actor", failures);
        registry.register_with_unit(
            "llmos_actor_mtbf",
            "Mean time between failures per actor (only actors that failed)",
            Unit::Seconds,
            mtbf,
        );
        registry.register_with_unit(
            "llmos_actor_mttr",
            "Mean time to repair per actor",
            Unit::Seconds,
            mttr,
        );
        registry.register(
            "llmos_actor_availability",
            "MTBF / (MTBF + MTTR) per actor",
            availability,
        );
        registry.register(
            "llmos_actor_messages",
            "Messages handled per actor",
            messages,
        );
        registry.register(
            "llmos_hang_detections",
            "Missed heartbeats of blocking children (engines) since boot",
            counter(hangs as f64),
        );

        let apps = apps.map(AppHost::status).unwrap_or_default();
        let app = |a: &llmos_app::AppStatus| vec![("app".to_string(), a.name.clone())];
        let (up, in_flight, kv_reserved) = (gauges(), gauges(), gauges());
        let (app_restarts, refusals) = (counters(), counters());
        for a in &apps {
            up.get_or_create(&app(a))
                .set(f64::from(u8::from(a.state == "running")));
            app_restarts
                .get_or_create(&app(a))
                .inc_by(a.restarts as f64);
            in_flight
                .get_or_create(&app(a))
                .set(a.usage.requests as f64);
            kv_reserved
                .get_or_create(&app(a))
                .set(a.usage.kv_blocks as f64);
            refusals
                .get_or_create(&app(a))
                .inc_by(a.usage.refused as f64);
        }
        registry.register(
            "llmos_app_up",
            "1 while the app's actor is running (0 restarting, given up or stopped)",
            up,
        );
        registry.register(
            "llmos_app_restarts",
            "Restarts of each app's actor",
            app_restarts,
        );
        registry.register(
            "llmos_app_requests_in_flight",
            "Requests each app has generating now (counted against its quota)",
            in_flight,
        );
        registry.register(
            "llmos_app_kv_blocks_reserved",
            "KV blocks each app's running requests may need at most (counted for apps with a KV quota)",
            kv_reserved,
        );
        registry.register(
            "llmos_app_quota_refusals",
            "Requests each app's quotas refused",
            refusals,
        );
        let mut out = String::new();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            tracing::error!(error = %err, "cannot encode metrics");
        }
        out
    }
}

/// Label pairs, in order.
type Labels = Vec<(String, String)>;

fn counters() -> Family<Labels, Counter<f64, AtomicU64>> {
    Family::default()
}

fn gauges() -> Family<Labels, Gauge<f64, AtomicU64>> {
    Family::default()
}

/// A counter holding `value` (the scrape reads totals kept elsewhere).
fn counter(value: f64) -> Counter<f64, AtomicU64> {
    let c = Counter::<f64, AtomicU64>::default();
    c.inc_by(value);
    c
}

fn gauge(value: f64) -> Gauge<f64, AtomicU64> {
    let g = Gauge::<f64, AtomicU64>::default();
    g.set(value);
    g
}
