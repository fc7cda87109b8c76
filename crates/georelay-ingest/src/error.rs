//! Every error the HTTP API returns, mapped to a status and a stable code in
//! one place, always as `{"error": {"code", "message"}}`. Messages never
//! carry internals (database errors, broker addresses, keys).
//!
//! The codes are a contract (clients match on them): [`ErrorCode`] is the
//! whole set, and a test checks that docs/architecture.md lists exactly it.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use georelay_core::RecordError;
use std::time::Duration;

use crate::senders::RouteError;

/// The stable `error.code` values of the HTTP API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    MalformedJson,
    InvalidRecord,
    NotJsonObject,
    InvalidDeviceId,
    InvalidQuery,
    BadBatchSize,
    DuplicateSeq,
    BodyUnreadable,
    Unauthorized,
    BodyTimeout,
    TooLarge,
    RecordTooLarge,
    UnsupportedMediaType,
    NotFound,
    MethodNotAllowed,
    RegionUnavailable,
    FailoverDisabled,
    CoolingDown,
    NoRegion,
    Fenced,
    Overloaded,
    Deadline,
    ControlPlaneUnavailable,
    UnknownGroup,
    UnknownNamespace,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 26] = [
        Self::MalformedJson,
        Self::InvalidRecord,
        Self::NotJsonObject,
        Self::InvalidDeviceId,
        Self::InvalidQuery,
        Self::BadBatchSize,
        Self::DuplicateSeq,
        Self::BodyUnreadable,
        Self::Unauthorized,
        Self::BodyTimeout,
        Self::TooLarge,
        Self::RecordTooLarge,
        Self::UnsupportedMediaType,
        Self::NotFound,
        Self::MethodNotAllowed,
        Self::RegionUnavailable,
        Self::FailoverDisabled,
        Self::CoolingDown,
        Self::NoRegion,
        Self::Fenced,
        Self::Overloaded,
        Self::Deadline,
        Self::ControlPlaneUnavailable,
        Self::UnknownGroup,
        Self::UnknownNamespace,
        Self::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MalformedJson => "malformed_json",
            Self::InvalidRecord => "invalid_record",
            Self::NotJsonObject => "not_json_object",
            Self::InvalidDeviceId => "invalid_device_id",
            Self::InvalidQuery => "invalid_query",
            Self::BadBatchSize => "bad_batch_size",
            Self::DuplicateSeq => "duplicate_seq",
            Self::BodyUnreadable => "body_unreadable",
            Self::Unauthorized => "unauthorized",
            Self::BodyTimeout => "body_timeout",
            Self::TooLarge => "too_large",
            Self::RecordTooLarge => "record_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::RegionUnavailable => "region_unavailable",
            Self::FailoverDisabled => "failover_disabled",
            Self::CoolingDown => "cooling_down",
            Self::NoRegion => "no_region",
            Self::Fenced => "fenced",
            Self::Overloaded => "overloaded",
            Self::Deadline => "deadline",
            Self::ControlPlaneUnavailable => "control_plane_unavailable",
            Self::UnknownGroup => "unknown_group",
            Self::UnknownNamespace => "unknown_namespace",
            Self::Internal => "internal",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body or path is not what the contract says.
    #[error("{message}")]
    BadRequest { code: ErrorCode, message: String },
    /// Unknown device, disabled device, or a record that does not
    /// authenticate: one answer for all, so a caller cannot probe which.
    #[error("unknown or disabled device, or the record does not authenticate")]
    Unauthorized,
    #[error("request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// A record the regions cannot carry: set it aside, do not retry it.
    #[error("{0}")]
    RecordTooLarge(RouteError),
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
        code: ErrorCode,
        message: String,
        retry_after: Duration,
    },
}

impl ApiError {
    pub fn bad_request(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
        }
    }

    pub fn unavailable(code: ErrorCode, message: impl Into<String>, retry_after: Duration) -> Self {
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
                ErrorCode::NotJsonObject,
                format!("{place}the plaintext is not a JSON object"),
            ),
            other => Self::bad_request(ErrorCode::InvalidRecord, format!("{place}{other}")),
        }
    }

    /// The one answer for an unknown or disabled device.
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, Self::Unauthorized)
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::TooLarge { .. } | Self::RecordTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            Self::BadRequest { code, .. } | Self::Unavailable { code, .. } => *code,
            Self::Unauthorized => ErrorCode::Unauthorized,
            Self::TooLarge { .. } => ErrorCode::TooLarge,
            Self::RecordTooLarge(_) => ErrorCode::RecordTooLarge,
            Self::UnsupportedMediaType => ErrorCode::UnsupportedMediaType,
            Self::BodyTimeout(_) => ErrorCode::BodyTimeout,
            Self::NotFound => ErrorCode::NotFound,
            Self::MethodNotAllowed => ErrorCode::MethodNotAllowed,
        }
    }
}

/// Routing's errors at the HTTP edge: a record too large for the regions
/// is 413; the rest are 503 with a Retry-After.
impl From<RouteError> for ApiError {
    fn from(e: RouteError) -> Self {
        let second = Duration::from_secs(1);
        let (code, retry_after) = match &e {
            RouteError::RecordTooLarge { .. } => return Self::RecordTooLarge(e),
            RouteError::Fenced => (ErrorCode::Fenced, second),
            RouteError::UnknownGroup => (ErrorCode::UnknownGroup, second),
            RouteError::UnknownNamespace => (ErrorCode::UnknownNamespace, second),
            RouteError::RegionUnavailable => (ErrorCode::RegionUnavailable, second),
            RouteError::FailoverDisabled => (ErrorCode::FailoverDisabled, Duration::from_secs(5)),
            RouteError::CoolingDown { retry_after } => (ErrorCode::CoolingDown, *retry_after),
            RouteError::NoRegion => (ErrorCode::NoRegion, Duration::from_secs(5)),
            RouteError::ControlPlaneUnavailable | RouteError::EpochUnrecorded => {
                (ErrorCode::ControlPlaneUnavailable, second)
            }
        };
        Self::unavailable(code, format!("{e}; retry later"), retry_after)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": {"code": self.code().as_str(), "message": self.to_string()}
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The codes docs/architecture.md lists in its "### HTTP error codes"
    /// table (first column, in backticks).
    fn documented_codes() -> BTreeSet<String> {
        let doc = include_str!("../../../docs/architecture.md");
        let section = doc
            .split("### HTTP error codes")
            .nth(1)
            .expect("docs/architecture.md has a '### HTTP error codes' section");
        section
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .filter_map(|l| {
                let cell = l.trim_start_matches('|').split('|').next()?.trim();
                let code = cell.strip_prefix('`')?.strip_suffix('`')?;
                Some(code.to_owned())
            })
            .collect()
    }

    #[test]
    fn the_docs_list_exactly_the_codes_the_api_has() {
        let ours: BTreeSet<String> = ErrorCode::ALL
            .iter()
            .map(|c| c.as_str().to_owned())
            .collect();
        assert_eq!(ours.len(), ErrorCode::ALL.len(), "a code is listed twice");
        assert_eq!(documented_codes(), ours);
    }

    #[test]
    fn routing_errors_are_503_with_retry_after() {
        let r = ApiError::from(RouteError::CoolingDown {
            retry_after: Duration::from_millis(2500),
        })
        .into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
        assert_eq!(ApiError::from(RouteError::Fenced).code(), ErrorCode::Fenced);
    }
}
