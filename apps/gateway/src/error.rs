//! OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP
//! status a client library expects, built from the runtime's errors in one place.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use llmos_inference::InferenceError;
use serde_json::json;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// OpenAI's `type`.
    pub kind: &'static str,
    /// Human-readable message.
    pub message: String,
    /// The offending request field, if one.
    pub param: Option<String>,
    /// A stable machine-readable code.
    pub code: &'static str,
    /// Seconds a client should wait (429 only).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// A 400/404/422-class error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind: if status.is_server_error() {
                "server_error"
            } else {
                "invalid_request_error"
            },
            message: message.into(),
            param: None,
            code,
            retry_after: None,
        }
    }

    /// The error names the request field that caused it.
    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// Invalid parameter: 422 (see the crate docs for why not 400).
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_parameter",
            message,
        )
        .param(param)
    }
}

impl From<InferenceError> for ApiError {
    fn from(err: InferenceError) -> Self {
        let message = err.to_string();
        match err {
            InferenceError::InvalidParams(_) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_parameter",
                message,
            ),
            InferenceError::PromptTooLong { .. } => {
                Self::new(StatusCode::BAD_REQUEST, "context_length_exceeded", message)
                    .param("prompt")
            }
            InferenceError::EmptyPrompt => {
                Self::new(StatusCode::BAD_REQUEST, "empty_prompt", message).param("prompt")
            }
            InferenceError::TooLarge { .. } => {
                Self::new(StatusCode::BAD_REQUEST, "kv_memory_exceeded", message)
                    .param("max_tokens")
            }
            InferenceError::Overloaded(_) => {
                let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", message);
                e.kind = "rate_limit_error";
                e.retry_after = Some(1);
                e
            }
            InferenceError::NoDevice(_) => {
                let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "no_device", message);
                e.retry_after = Some(5);
                e
            }
            InferenceError::UnknownRequest(_) => {
                Self::new(StatusCode::NOT_FOUND, "request_not_found", message)
            }
            _ => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message),
        }
    }
}

impl From<llmos_app::AppError> for ApiError {
    fn from(err: llmos_app::AppError) -> Self {
        match err {
            llmos_app::AppError::Inference(e) => Self::from(e),
            other => {
                let mut e = Self::new(other.status(), other.code(), other.to_string());
                if e.status == StatusCode::TOO_MANY_REQUESTS {
                    e.kind = "rate_limit_error";
                    e.retry_after = Some(1);
                }
                e
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        });
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
