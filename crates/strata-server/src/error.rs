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

/// The API's answer to a replication error (its one mapping to `ErrorCode`): a full
/// disk is `NoSpace`; anything else is `Unavailable`, to retry (another owner, a copy
/// back, the metadata service reachable again).
impl From<strata_replica::error::ReplicaError> for ApiError {
    fn from(e: strata_replica::error::ReplicaError) -> ApiError {
        let code = match e {
            strata_replica::error::ReplicaError::NoSpace => ErrorCode::NoSpace,
            _ => ErrorCode::Unavailable,
        };
        ApiError::new(code, e.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;
    use strata_replica::error::ReplicaError;

    #[test]
    fn a_replication_error_is_no_space_when_a_disk_is_full_else_unavailable_with_its_words() {
        let e = ApiError::from(ReplicaError::NoSpace);
        assert_eq!(e.code, ErrorCode::NoSpace);
        let e = ApiError::from(ReplicaError::Deposed { newer: Some(7) });
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert_eq!(e.message, "this node no longer owns the volume (a copy has seen epoch 7)");
        let e = ApiError::from(ReplicaError::Record { why: "no quorum".into() });
        assert_eq!(
            (e.code, e.message.as_str()),
            (ErrorCode::Unavailable, "the volume's record: no quorum")
        );
    }
}
