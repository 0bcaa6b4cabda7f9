//! The one place that turns an [`ErrorKind`] into a protocol's answer: a gRPC code, or an HTTP status with
//! a JSON body `{"error": "..."}`. Every adapter and layer answers failures through here.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use tonic::{Code, Status};

use crate::error::{ErrorKind, ServiceError};

/// The gRPC code of each kind of failure.
pub fn code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::Invalid => Code::InvalidArgument,
        ErrorKind::Overloaded => Code::ResourceExhausted,
        ErrorKind::Deadline => Code::DeadlineExceeded,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Internal => Code::Internal,
        ErrorKind::Unauthenticated => Code::Unauthenticated,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::NotFound => Code::NotFound,
        // As tonic itself answers a gRPC message over its limit.
        ErrorKind::TooLarge => Code::OutOfRange,
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        Status::new(code(e.kind), e.message)
    }
}

/// The HTTP status of each kind of failure.
pub fn http_status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::Invalid => StatusCode::BAD_REQUEST,
        ErrorKind::Overloaded => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::Deadline => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorKind::FailedPrecondition => StatusCode::CONFLICT,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
    }
}

/// A failure as an HTTP answer, `{"error": "..."}` with the status of its kind; the kind rides along in the
/// response's extensions for the call metrics.
pub fn http_response(e: ServiceError) -> Response {
    let mut response = (http_status(e.kind), Json(serde_json::json!({ "error": &e.message }))).into_response();
    response.extensions_mut().insert(e.kind);
    response.extensions_mut().insert(ErrorMessage(e.message));
    response
}

/// What a REST failure told its caller, riding along in the response's extensions so that the call's log line
/// says why it failed, not only its HTTP status.
#[derive(Debug, Clone)]
pub struct ErrorMessage(pub String);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{QueueError, RequestError};

    #[test]
    fn each_kind_of_failure_has_its_grpc_code() {
        let status = |e: ServiceError| Status::from(e).code();
        assert_eq!(status(RequestError::NoImages { max: 64 }.into()), Code::InvalidArgument);
        assert_eq!(
            status(
                QueueError::Full {
                    model: "cnn".into(),
                    queued: 1,
                    limit: 1,
                    waited_ms: 0
                }
                .into()
            ),
            Code::ResourceExhausted
        );
        assert_eq!(status(QueueError::DeadlineExceeded.into()), Code::DeadlineExceeded);
        assert_eq!(status(QueueError::ShuttingDown.into()), Code::Unavailable);
        assert_eq!(status(ServiceError::loading()), Code::Unavailable);
        assert_eq!(status(ServiceError::internal("x")), Code::Internal);
    }

    #[test]
    fn each_kind_of_failure_has_its_http_status() {
        assert_eq!(http_status(ErrorKind::Invalid), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(ErrorKind::Overloaded), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(http_status(ErrorKind::Deadline), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(http_status(ErrorKind::Unavailable), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(http_status(ErrorKind::Internal), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(http_status(ErrorKind::Unauthenticated), StatusCode::UNAUTHORIZED);
        assert_eq!(http_status(ErrorKind::PermissionDenied), StatusCode::FORBIDDEN);
        assert_eq!(http_status(ErrorKind::FailedPrecondition), StatusCode::CONFLICT);
        assert_eq!(http_status(ErrorKind::TooLarge), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
