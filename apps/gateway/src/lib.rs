//! The OpenAI-compatible HTTP gateway of LLMasOS (axum on tokio) over a booted
//! [`Runtime`]: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`,
//! `GET /v1/requests/{id}/events` (resume a stream after `Last-Event-ID` / `?after=N`),
//! `GET /health` (the tree's truth) and `GET /metrics` (Prometheus text).
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
//! - Chat uses one default template for every model (see [`openai::chat_prompt`]).
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
use llmos_inference::{FinishReason, RequestStream, Runtime, StreamEvent};
use serde_json::json;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::openai::Kind;

/// How the gateway is set up.
#[derive(Clone, Debug, Default)]
pub struct GatewayConfig {
    /// Requests must carry `Authorization: Bearer KEY` when set.
    pub api_key: Option<String>,
}

struct Gateway {
    runtime: Runtime,
    config: GatewayConfig,
    model_id: String,
    context: usize,
    metrics: Metrics,
}

type Shared = Arc<Gateway>;

/// The gateway's routes over `runtime`.
pub fn router(runtime: Runtime, config: GatewayConfig) -> Result<Router, ApiError> {
    let model = runtime.services().model()?;
    let gateway = Arc::new(Gateway {
        model_id: model.name.clone(),
        context: model.context,
        runtime,
        config,
        metrics: Metrics::default(),
    });
    let api = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/requests/{id}/events", get(events))
        .route_layer(middleware::from_fn_with_state(gateway.clone(), authorize));
    Ok(Router::new()
        .merge(api)
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(gateway.clone(), count))
        .with_state(gateway))
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

async fn count(State(gw): State<Shared>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    gw.metrics.count_http(&path, response.status().as_u16());
    response
}

async fn authorize(State(gw): State<Shared>, request: Request, next: Next) -> Response {
    if let Some(key) = &gw.config.api_key {
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
    let parsed = match openai::parse(kind, &body, &gw.model_id, gw.context) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let stream = match gw.runtime.submit(&parsed.prompt, parsed.params).await {
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
async fn whole(gw: &Gateway, kind: Kind, id: &str, mut stream: RequestStream) -> Response {
    let mut text = String::new();
    let mut tokens = Vec::new();
    while let Some(event) = stream.events.recv().await {
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
    stream: RequestStream,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let created = now();
    let events = futures::stream::unfold((stream, false), move |(mut stream, done)| {
        let (gw, id) = (gw.clone(), id.clone());
        async move {
            if done {
                return None;
            }
            let event = match stream.events.recv().await {
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
    match gw.runtime.attach(n, after) {
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

async fn health(State(gw): State<Shared>) -> Response {
    let report = metrics::health(&gw.runtime);
    let status = if report.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report.body)).into_response()
}

async fn metrics_text(State(gw): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        gw.metrics.render(&gw.runtime),
    )
        .into_response()
}
