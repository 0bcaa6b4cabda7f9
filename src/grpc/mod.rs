//! The gRPC side of the service: one adapter per protocol (`fashion_mnist.v1`, and the Open Inference
//! Protocol's `inference`), the layers every
//! call goes through, and the one place that turns an [`ErrorKind`] into a gRPC code.

pub mod fashion_mnist;
pub mod inference;
pub mod layers;

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
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        Status::new(code(e.kind), e.message)
    }
}

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
}
