//! Error types of each layer, and the one place that decides which gRPC status each becomes.
//!
//! A problem with a single image is not here: it is data in that image's result (see `preprocess::Rejection`).

use std::path::PathBuf;

use tonic::{Code, Status};

/// Loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(
        "ONNX Runtime library not found at {path}: run `make ort` (fetches onnxruntime 1.31.1 from PyPI into .ort/) \
         or point --ort-dylib / ORT_DYLIB_PATH at libonnxruntime.so.1.31.1"
    )]
    RuntimeMissing { path: PathBuf },
    #[error("cannot load ONNX Runtime from {path}: {source}")]
    RuntimeLoad {
        path: PathBuf,
        source: ort::LoadDynamicError,
    },
    #[error("ONNX Runtime environment: {0}")]
    Environment(String),
    #[error("model file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("model metadata {path}: {reason}")]
    Metadata { path: PathBuf, reason: String },
    #[error("model {path} does not match what the server expects: {reason}")]
    Signature { path: PathBuf, reason: String },
    #[error("inference failed: {0}")]
    Inference(String),
}

/// Why a request as a whole cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("request has no images: send 1 to {max} images in `images`")]
    NoImages { max: usize },
    #[error("request has {got} images; at most {max} per request: split it into several calls")]
    TooManyImages { got: usize, max: usize },
    #[error("unknown model {name:?}: loaded models are {loaded}")]
    UnknownModel { name: String, loaded: String },
    #[error("{field} must be between {min} and {max}, got {got}")]
    OutOfRange {
        field: &'static str,
        got: f32,
        min: f32,
        max: f32,
    },
}

/// Why queued work did not run.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("server busy: {queued} images queued for model {model} (limit {limit}); retry with backoff")]
    Full { model: String, queued: usize, limit: usize },
    #[error("deadline exceeded before inference; the images were not run")]
    DeadlineExceeded,
    #[error("server is shutting down; retry on another replica")]
    ShuttingDown,
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl From<RequestError> for Status {
    fn from(e: RequestError) -> Self {
        Status::new(Code::InvalidArgument, e.to_string())
    }
}

impl From<QueueError> for Status {
    fn from(e: QueueError) -> Self {
        let code = match &e {
            QueueError::Full { .. } => Code::ResourceExhausted,
            QueueError::DeadlineExceeded => Code::DeadlineExceeded,
            QueueError::ShuttingDown => Code::Unavailable,
            QueueError::Model(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}
