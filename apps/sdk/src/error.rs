//! Errors of apps and of the app host, and how they look over HTTP.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use llmos_inference::InferenceError;
use serde_json::json;

/// What went wrong in an app, in its host, or in a request an app made.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A request would exceed one of the app's quotas.
    #[error("app `{app}`: quota exceeded: {what} (limit {limit}, in use {in_use}, this request needs {needed})")]
    QuotaExceeded {
        /// The app.
        app: String,
        /// Which quota: `concurrent requests` or `KV blocks`.
        what: &'static str,
        /// The limit.
        limit: usize,
        /// Already in use.
        in_use: usize,
        /// What the refused request needed.
        needed: usize,
    },
    /// The inference runtime refused or failed the request.
    #[error(transparent)]
    Inference(#[from] InferenceError),
    /// A generation ended with an error.
    #[error("request {request} failed: {error}")]
    GenerationFailed {
        /// The request id.
        request: u64,
        /// Why.
        error: String,
    },
    /// The app (or the runtime) cannot answer now: restarting for too long, stopped
    /// after repeated crashes, or shutting down.
    #[error("app `{app}` is unavailable: {reason}")]
    Unavailable {
        /// The app.
        app: String,
        /// Why.
        reason: String,
    },
    /// A checkpoint could not be written or read.
    #[error("app `{app}`: checkpoint `{key}`: {reason}")]
    Checkpoint {
        /// The app.
        app: String,
        /// The checkpoint key.
        key: String,
        /// Why.
        reason: String,
    },
    /// A checkpoint key outside the allowed alphabet.
    #[error(
        "invalid checkpoint key `{0}`: use 1 to 128 of A-Z a-z 0-9 . _ - (not starting with `.`)"
    )]
    BadKey(String),
    /// A client sent something the app cannot accept (HTTP 400).
    #[error("{0}")]
    BadRequest(String),
    /// A request field has a value out of range or of the wrong kind (HTTP 422, with the
    /// field as the error body's `param`).
    #[error("{field}: {message}")]
    InvalidField {
        /// The field, e.g. `prompts[3]`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A client asked for something that does not exist (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// App registration or configuration is wrong (refused at start-up).
    #[error("app configuration: {0}")]
    Config(String),
    /// The app's own logic failed (returned from a hook: the instance crashes and restarts).
    #[error("{0}")]
    Failed(String),
}

impl AppError {
    /// An app failure with this message.
    pub fn failed(message: impl Into<String>) -> Self {
        AppError::Failed(message.into())
    }

    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            AppError::QuotaExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            AppError::Inference(e) => match e {
                InferenceError::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
                InferenceError::PromptTooLong { .. } | InferenceError::EmptyPrompt => {
                    StatusCode::BAD_REQUEST
                }
                InferenceError::InvalidParams(_) => StatusCode::UNPROCESSABLE_ENTITY,
                InferenceError::UnknownRequest(_) => StatusCode::NOT_FOUND,
                InferenceError::NoDevice(_) => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            AppError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            AppError::BadRequest(_) | AppError::BadKey(_) => StatusCode::BAD_REQUEST,
            AppError::InvalidField { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::GenerationFailed { .. }
            | AppError::Checkpoint { .. }
            | AppError::Config(_)
            | AppError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short machine-readable code for the error body.
    pub fn code(&self) -> &'static str {
        match self {
            AppError::QuotaExceeded { .. } => "quota_exceeded",
            AppError::Inference(InferenceError::Overloaded(_)) => "overloaded",
            AppError::Inference(InferenceError::PromptTooLong { .. }) => "context_length_exceeded",
            AppError::Inference(InferenceError::InvalidParams(_)) => "invalid_parameter",
            AppError::Inference(InferenceError::EmptyPrompt) => "empty_prompt",
            AppError::Inference(InferenceError::UnknownRequest(_)) => "request_not_found",
            AppError::Inference(InferenceError::NoDevice(_)) => "no_healthy_device",
            AppError::Inference(_) => "inference_error",
            AppError::GenerationFailed { .. } => "generation_failed",
            AppError::Unavailable { .. } => "app_unavailable",
            AppError::Checkpoint { .. } => "checkpoint_failed",
            AppError::BadKey(_) | AppError::BadRequest(_) => "bad_request",
            AppError::InvalidField { .. } => "invalid_parameter",
            AppError::NotFound(_) => "not_found",
            AppError::Config(_) => "app_config",
            AppError::Failed(_) => "app_failed",
        }
    }
}

/// The error body every app route answers with, shaped like OpenAI's:
/// `{"error": {"message", "type", "code", "param": null}}`; 429 carries `Retry-After`.
impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        let kind = if status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        let param = match &self {
            AppError::InvalidField { field, .. } => Some(field.clone()),
            _ => None,
        };
        let body = json!({
            "error": { "message": self.to_string(), "type": kind, "code": self.code(), "param": param }
        });
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
