//! Every error the HTTP API returns, mapped to a status and a stable code in
//! one place, always as `{"error": {"code", "message"}}`. Messages never
//! carry internals (database errors, broker addresses, keys).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use georelay_core::RecordError;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body or path is not what the contract says.
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// Unknown device, disabled device, or a record that does not
    /// authenticate: one answer for all, so a caller cannot probe which.
    #[error("unknown or disabled device, or the record does not authenticate")]
    Unauthorized,
    #[error("request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(Duration),
    #[error("no such route")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The record cannot be queued now; the client should retry after
    /// `retry_after` (the plug computers buffer meanwhile).
    #[error("{message}")]
    Unavailable {
        code: &'static str,
        message: String,
        retry_after: Duration,
    },
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
        }
    }

    pub fn unavailable(
        code: &'static str,
        message: impl Into<String>,
        retry_after: Duration,
    ) -> Self {
        Self::Unavailable {
            code,
            message: message.into(),
            retry_after,
        }
    }

    /// A record that fails verification, as the contract maps it.
    pub fn from_record(e: RecordError, at: Option<usize>) -> Self {
        let place = at.map(|i| format!("records[{i}]: ")).unwrap_or_default();
        match e {
            RecordError::Authentication => Self::Unauthorized,
            RecordError::NotJsonObject => Self::bad_request(
                "not_json_object",
                format!("{place}the plaintext is not a JSON object"),
            ),
            other => Self::bad_request("invalid_record", format!("{place}{other}")),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { code, .. } | Self::Unavailable { code, .. } => code,
            Self::Unauthorized => "unauthorized",
            Self::TooLarge { .. } => "too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::BodyTimeout(_) => "body_timeout",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": {"code": self.code(), "message": self.to_string()}
        });
        let mut response = (self.status(), axum::Json(body)).into_response();
        // The body may be left unread: the connection cannot be reused.
        if matches!(self, Self::TooLarge { .. } | Self::BodyTimeout(_)) {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Self::Unavailable { retry_after, .. } = &self {
            // Whole seconds, at least one.
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}
