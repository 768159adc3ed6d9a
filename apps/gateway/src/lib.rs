//! The HTTP front door of LLMasOS (axum on tokio). [`OpenAiApp`] is the OpenAI-compatible
//! API as an app on the app SDK (`llmos-app`): `POST /v1/completions`,
//! `POST /v1/chat/completions`, `GET /v1/models`, `GET /v1/requests/{id}/events` (resume a
//! stream after `Last-Event-ID` / `?after=N`). [`front`] wraps every app's routes with the
//! API key, a JSON 404, request counting, `GET /health` (the tree's truth: 503 with
//! `reasons` while a node is failed or restarting, a device is lost, the journal is closed
//! or its latest append failed, or an app was given up) and `GET /metrics` (Prometheus).
//!
//! Choices a client may rely on:
//! - Request ids are the runtime's: `cmpl-N` (completions) or `chatcmpl-N` (chat), in the
//!   `x-request-id` header and the body. The prefix also picks the chunk format when the
//!   stream is resumed through `/v1/requests/{id}/events`.
//! - In a stream every event's SSE `id:` is the index of the last token it carries (the
//!   final chunk repeats the last index); `data: [DONE]` ends it. Each chunk carries the
//!   extension `"llmos": {"index", "token"}`.
//! - Status codes: malformed JSON 400, prompt over the context 400, unknown model or
//!   request 404, invalid or unsupported parameters 422 (the split; OpenAI itself
//!   answers 400), overload 429 with `Retry-After`, missing/wrong API key 401, no healthy
//!   device 503. Parameters: see [`openai`].
//! - Chat renders `messages` with the model's own chat template (GGUF
//!   `tokenizer.chat_template`, or `chat_template` in a Hugging Face
//!   `tokenizer_config.json`), or, for a model without one, the documented default: one
//!   `ROLE: CONTENT` line per message, then `assistant:` (see [`openai::chat_prompt`]). A
//!   template that refuses the messages answers 400 `chat_template_error`.
//! - `/health` and `/metrics` need no API key (probes and scrapers).
//! - A client that disconnects does not cancel its request: it runs to the end and stays
//!   resumable until the journal compacts it away.

pub mod error;
mod metrics;
pub mod openai;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use llmos_app::{
    App, AppApi, AppContext, AppError, AppHandle, AppHost, AppManifest, Completions, Generation,
    Quotas, Reply,
};
use llmos_inference::{FinishReason, Runtime, StreamEvent};
use serde_json::{json, Value};

use crate::error::ApiError;
pub use crate::metrics::Metrics;
use crate::openai::Kind;

/// How the HTTP front door is set up.
#[derive(Clone, Debug, Default)]
pub struct GatewayConfig {
    /// Requests must carry `Authorization: Bearer KEY` when set (every route but
    /// `/health` and `/metrics`, which probes and scrapers reach without one).
    pub api_key: Option<String>,
}

/// The name the OpenAI gateway is registered under.
pub const OPENAI_APP: &str = "openai";

/// The OpenAI-compatible API as an app on the app SDK: its routes generate through the
/// app's [`Completions`]; its actor answers `GET /apps/openai/stats`. Served at `/` as
/// well as `/apps/openai/`, so clients find `/v1/...` where they expect it.
pub struct OpenAiApp {
    metrics: Arc<Metrics>,
}

impl OpenAiApp {
    /// The gateway app, counting into `metrics` (shared with `/metrics`).
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

/// Messages of the gateway's actor.
pub enum OpenAiMsg {
    /// The gateway's counters.
    Stats(Reply<Value>),
}

impl App for OpenAiApp {
    type Msg = OpenAiMsg;
    type State = ();

    fn manifest(&self) -> AppManifest {
        AppManifest::new(
            "OpenAI-compatible API: /v1/completions, /v1/chat/completions, /v1/models, /v1/requests/{id}/events",
        )
        .mount_root(true)
    }

    async fn start(&self, _ctx: &AppContext<OpenAiMsg>) -> Result<(), AppError> {
        Ok(())
    }

    async fn handle(
        &self,
        _ctx: &AppContext<OpenAiMsg>,
        message: OpenAiMsg,
        _state: &mut (),
    ) -> Result<(), AppError> {
        match message {
            OpenAiMsg::Stats(reply) => {
                let _ = reply.send(self.metrics.counters());
            }
        }
        Ok(())
    }

    fn routes(&self, api: AppApi<OpenAiMsg>) -> Router {
        match Gateway::new(api.completions, self.metrics.clone(), Some(api.handle)) {
            Ok(gateway) => openai_routes(gateway),
            Err(e) => {
                tracing::error!(error = %e.message, "the OpenAI routes cannot start");
                Router::new()
            }
        }
    }
}

struct Gateway {
    completions: Completions,
    handle: Option<AppHandle<OpenAiMsg>>,
    model_id: String,
    context: usize,
    metrics: Arc<Metrics>,
}

impl Gateway {
    fn new(
        completions: Completions,
        metrics: Arc<Metrics>,
        handle: Option<AppHandle<OpenAiMsg>>,
    ) -> Result<Shared, ApiError> {
        let model = completions.model().map_err(ApiError::from)?;
        Ok(Arc::new(Gateway {
            model_id: model.name,
            context: model.context,
            completions,
            handle,
            metrics,
        }))
    }
}

type Shared = Arc<Gateway>;

fn openai_routes(gateway: Shared) -> Router {
    let mut routes = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/requests/{id}/events", get(events));
    if gateway.handle.is_some() {
        routes = routes.route("/stats", get(stats));
    }
    routes.with_state(gateway)
}

/// The whole HTTP surface around the apps' routes: `/health` and `/metrics` (no key),
/// `app_routes` behind the API key, a JSON 404 for anything else, and request counting.
pub fn front(
    runtime: &Runtime,
    metrics: Arc<Metrics>,
    apps: Option<AppHost>,
    app_routes: Router,
    config: GatewayConfig,
) -> Router {
    let system = Arc::new(System {
        runtime: runtime.clone(),
        metrics: metrics.clone(),
        apps,
    });
    let protected = app_routes.layer(middleware::from_fn_with_state(Arc::new(config), authorize));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .with_state(system)
        .merge(protected)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(metrics, count))
}

/// The OpenAI routes and `/health`, `/metrics` over `runtime` without the app host (no
/// quotas, no actor): for embedding the gateway alone and for in-process tests.
pub fn router(runtime: Runtime, config: GatewayConfig) -> Result<Router, ApiError> {
    let metrics = Arc::new(Metrics::default());
    let completions = Completions::new(OPENAI_APP, runtime.clone(), Quotas::default());
    let gateway = Gateway::new(completions, metrics.clone(), None)?;
    Ok(front(
        &runtime,
        metrics,
        None,
        openai_routes(gateway),
        config,
    ))
}

struct System {
    runtime: Runtime,
    metrics: Arc<Metrics>,
    apps: Option<AppHost>,
}

/// Serves `router` on `listener` until `shutdown` resolves; then stops accepting and
/// lets open connections finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn count(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    metrics.count_http(&path, response.status().as_u16());
    response
}

async fn authorize(
    State(config): State<Arc<GatewayConfig>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(key) = &config.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), key.as_bytes()) {
            let mut e = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "missing or wrong API key (send `Authorization: Bearer KEY`)",
            );
            e.kind = "authentication_error";
            return e.into_response();
        }
    }
    next.run(request).await
}

/// Compares without an early exit, so timing does not reveal how much of a key matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0));
    }
    diff == 0
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn models(State(gw): State<Shared>) -> Json<serde_json::Value> {
    Json(json!({
        "object": "list",
        "data": [{ "id": gw.model_id, "object": "model", "created": 0, "owned_by": "llmos" }],
    }))
}

async fn completions(State(gw): State<Shared>, body: Bytes) -> Response {
    generate(gw, Kind::Completion, body).await
}

async fn chat_completions(State(gw): State<Shared>, body: Bytes) -> Response {
    generate(gw, Kind::Chat, body).await
}

async fn generate(gw: Shared, kind: Kind, body: Bytes) -> Response {
    let model = match gw.completions.runtime().services().model() {
        Ok(model) => model,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let parsed = match openai::parse(kind, &body, &gw.model_id, gw.context, &model) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let stream = match gw.completions.submit(&parsed.prompt, parsed.params).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "request refused");
            return ApiError::from(e).into_response();
        }
    };
    gw.metrics.admitted();
    let id = kind.public_id(stream.id);
    let mut response = if parsed.stream {
        sse(gw.clone(), kind, id.clone(), stream).into_response()
    } else {
        whole(&gw, kind, &id, stream).await
    };
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

/// Collects a request's tokens into one answer.
async fn whole(gw: &Gateway, kind: Kind, id: &str, mut stream: Generation) -> Response {
    let mut text = String::new();
    let mut tokens = Vec::new();
    while let Some(event) = stream.next().await {
        match event {
            StreamEvent::Token { token, text: t, .. } => {
                gw.metrics.token();
                tokens.push(token);
                text.push_str(&t);
            }
            StreamEvent::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                let head = openai::Head {
                    kind,
                    id,
                    created: now(),
                    model: &gw.model_id,
                };
                let body = openai::complete(
                    head,
                    &text,
                    finish_reason(reason),
                    &tokens,
                    openai::usage(prompt_tokens, completion_tokens),
                );
                return Json(body).into_response();
            }
            StreamEvent::Failed { error } => {
                return ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "generation_failed",
                    error,
                )
                .into_response()
            }
        }
    }
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting_down",
        "the request ended without finishing (server shutting down?)",
    )
    .into_response()
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Error => "error",
    }
}

/// A request's events as SSE: one chunk per token (`id:` = its index), a final chunk with
/// `finish_reason` and `usage`, then `[DONE]`.
fn sse(
    gw: Shared,
    kind: Kind,
    id: String,
    stream: Generation,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let created = now();
    let events = futures::stream::unfold((stream, false), move |(mut stream, done)| {
        let (gw, id) = (gw.clone(), id.clone());
        async move {
            if done {
                return None;
            }
            let event = match stream.next().await {
                Some(StreamEvent::Token { index, token, text }) => {
                    gw.metrics.token();
                    let head = openai::Head {
                        kind,
                        id: &id,
                        created,
                        model: &gw.model_id,
                    };
                    let body = openai::chunk(head, &text, Some((index, token)), None, None);
                    Event::default()
                        .id(index.to_string())
                        .data(body.to_string())
                }
                Some(StreamEvent::Finished {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    let head = openai::Head {
                        kind,
                        id: &id,
                        created,
                        model: &gw.model_id,
                    };
                    let body = openai::chunk(
                        head,
                        "",
                        None,
                        Some(finish_reason(reason)),
                        Some(openai::usage(prompt_tokens, completion_tokens)),
                    );
                    let last_index = completion_tokens.saturating_sub(1).to_string();
                    let event = Event::default().id(last_index).data(body.to_string());
                    return Some((
                        futures::stream::iter(vec![Ok(event), Ok(Event::default().data("[DONE]"))]),
                        (stream, true),
                    ));
                }
                Some(StreamEvent::Failed { error }) => {
                    let body = json!({"error": {"message": error, "type": "server_error", "param": null, "code": "generation_failed"}});
                    return Some((
                        futures::stream::iter(vec![
                            Ok(Event::default().data(body.to_string())),
                            Ok(Event::default().data("[DONE]")),
                        ]),
                        (stream, true),
                    ));
                }
                // The runtime went away (shutdown): end without [DONE], so the client
                // knows to resume rather than take a truncated answer as complete.
                None => return None,
            };
            Some((futures::stream::iter(vec![Ok(event)]), (stream, false)))
        }
    });
    Sse::new(futures::StreamExt::flatten(events))
}

async fn events(
    State(gw): State<Shared>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let Some((kind, n)) = Kind::parse_id(&id) else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "request_not_found",
            format!("no request `{id}`"),
        )
        .into_response();
    };
    let header_after = match headers
        .get("last-event-id")
        .map(|v| v.to_str().map(str::trim))
    {
        None => None,
        Some(Ok(v)) => match v.parse::<u32>() {
            Ok(n) => Some(n),
            Err(_) => {
                return ApiError::invalid("Last-Event-ID", "Last-Event-ID must be a token index")
                    .into_response()
            }
        },
        Some(Err(_)) => {
            return ApiError::invalid("Last-Event-ID", "Last-Event-ID must be a token index")
                .into_response()
        }
    };
    let query_after = query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("after="));
    let query_after = match query_after.map(str::parse::<u32>) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => {
            return ApiError::invalid("after", "after must be a token index").into_response()
        }
    };
    let after = header_after.or(query_after);
    match gw.completions.attach(n, after).await {
        Ok(stream) => {
            let mut response = sse(gw.clone(), kind, kind.public_id(n), stream).into_response();
            if let Ok(value) = HeaderValue::from_str(&kind.public_id(n)) {
                response.headers_mut().insert("x-request-id", value);
            }
            response
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn stats(State(gw): State<Shared>) -> Response {
    let Some(handle) = &gw.handle else {
        return not_found().await.into_response();
    };
    match handle
        .call(OpenAiMsg::Stats, Some(std::time::Duration::from_secs(5)))
        .await
    {
        Ok(stats) => Json(stats).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn health(State(system): State<Arc<System>>) -> Response {
    let report = metrics::health(&system.runtime, system.apps.as_ref());
    let status = if report.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report.body)).into_response()
}

async fn metrics_text(State(system): State<Arc<System>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        system.metrics.render(&system.runtime, system.apps.as_ref()),
    )
        .into_response()
}
