//! API errors: a stable code and a message, rendered as `{"code": "...", "message": "..."}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use strata_types::ErrorCode;

/// An error the API returns.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The stable code.
    pub code: ErrorCode,
    /// A message for humans.
    pub message: String,
}

/// Results of node and API operations.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// Makes an error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError { code, message: message.into() }
    }

    /// An invalid-argument error.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::InvalidArgument, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::json!({ "code": self.code.as_str(), "message": self.message });
        (status, axum::Json(body)).into_response()
    }
}
