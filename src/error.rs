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
    /// `name` is the client's string, clipped ([`clip`]) so it cannot blow up a log line or a header.
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
    #[error(
        "this connection has more than its share of images queued for model {model}, and the spare room is \
         taken: wait for its calls to finish, or spread calls over more connections"
    )]
    NoSpareRoom { model: String },
    #[error("deadline exceeded before inference; the images were not run")]
    DeadlineExceeded,
    #[error("server is shutting down; retry on another replica")]
    ShuttingDown,
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Why a call was refused before any work: a bound of the server or of the caller's connection is reached.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error("this connection has its share of calls in progress: wait for one to finish, or open another connection")]
    ConnectionCalls,
    #[error("this connection has its share of request bytes in flight: retry when its calls finish")]
    ConnectionRequestBytes,
    #[error("server busy: too many request bytes in flight; retry with backoff")]
    RequestBytes,
}

/// The longest client-supplied string quoted back in a status message or a log line.
pub const MAX_ECHOED_CHARS: usize = 64;

/// A client's string as it may be echoed: at most [`MAX_ECHOED_CHARS`] characters, marked when cut.
pub fn clip(s: &str) -> String {
    match s.char_indices().nth(MAX_ECHOED_CHARS) {
        None => s.to_string(),
        Some((end, _)) => format!("{}…({} bytes)", &s[..end], s.len()),
    }
}

impl From<AdmissionError> for Status {
    fn from(e: AdmissionError) -> Self {
        Status::new(Code::ResourceExhausted, e.to_string())
    }
}

impl From<RequestError> for Status {
    fn from(e: RequestError) -> Self {
        Status::new(Code::InvalidArgument, e.to_string())
    }
}

impl From<QueueError> for Status {
    fn from(e: QueueError) -> Self {
        let code = match &e {
            QueueError::Full { .. } | QueueError::NoSpareRoom { .. } => Code::ResourceExhausted,
            QueueError::DeadlineExceeded => Code::DeadlineExceeded,
            QueueError::ShuttingDown => Code::Unavailable,
            QueueError::Model(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}
