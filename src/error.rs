//! Error types of each layer, and the protocol-neutral [`ErrorKind`] each one has. Adapters map a kind to their
//! own codes in one place (`transport::status`); nothing here knows a protocol.
//!
//! A problem with a single image is not here: it is data in that image's verdict (see `verdict::Verdict`).

use std::path::PathBuf;

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
    /// A load that failed earlier, remembered as its message (the files have not changed since).
    #[error("{0}")]
    Remembered(String),
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
    #[error(
        "model {model} has no version {version:?} ready: it serves {served} (or leave the version empty for the newest)"
    )]
    UnknownVersion {
        model: String,
        version: String,
        served: String,
    },
    #[error("{field} must be between {min} and {max}, got {got}")]
    OutOfRange {
        field: &'static str,
        got: f32,
        min: f32,
        max: f32,
    },
    /// A model the server is configured to serve, with no version ready: unloaded on request, or still loading.
    /// The server's fault, not the caller's; `default`: the call named no model.
    #[error("{}", not_ready_message(.model, *.default))]
    NotReady { model: String, default: bool },
}

fn not_ready_message(model: &str, default: bool) -> String {
    if default {
        format!(
            "the default model {model} has no ready version (unloaded, or no version could be loaded): name \
             another model, or retry once an operator has loaded it"
        )
    } else {
        format!("model {model} has no ready version (unloaded, or no version could be loaded): retry later")
    }
}

impl RequestError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            RequestError::NotReady { .. } => ErrorKind::Unavailable,
            _ => ErrorKind::Invalid,
        }
    }
}

/// Why queued work did not run.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(
        "server busy: {queued} images queued for model {model} (limit {limit}), no room within {waited_ms} ms; \
         retry with backoff"
    )]
    Full {
        model: String,
        queued: usize,
        limit: usize,
        waited_ms: u64,
    },
    #[error(
        "this connection has more than its share of images queued for model {model}, and the spare room is \
         taken; no room within {waited_ms} ms: wait for its calls to finish, or spread calls over more connections"
    )]
    NoSpareRoom { model: String, waited_ms: u64 },
    #[error("deadline exceeded before inference; the images were not run")]
    DeadlineExceeded,
    #[error("server is shutting down; retry on another replica")]
    ShuttingDown,
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl QueueError {
    /// The same refusal, after the call waited `waited` for room.
    pub fn after_waiting(self, waited: std::time::Duration) -> Self {
        let ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX);
        match self {
            QueueError::Full {
                model, queued, limit, ..
            } => QueueError::Full {
                model,
                queued,
                limit,
                waited_ms: ms,
            },
            QueueError::NoSpareRoom { model, .. } => QueueError::NoSpareRoom { model, waited_ms: ms },
            other => other,
        }
    }
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
    #[error("server busy: too many answers wait for their clients to read them; read your answers, retry with backoff")]
    AnswerBytes,
    #[error(
        "the request body arrived slower than {bytes_per_s} bytes/s (after the first {grace_s} s); the connection is closed"
    )]
    BodyTooSlow { bytes_per_s: u64, grace_s: u64 },
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

/// A JSON parser's error as it may be echoed: what is wrong and where, with any value it quotes clipped to
/// [`MAX_ECHOED_CHARS`]. serde quotes an unexpected string whole (`invalid type: string "…", expected …`): a
/// 16 MiB `shape` string came back as a 58.7 MB answer.
pub fn json_error(e: &serde_json::Error) -> String {
    let message = e.to_string();
    // serde_json ends the message with " at line L column C"; the description before it may quote the value.
    let description = message.rsplit_once(" at line ").map_or(message.as_str(), |(d, _)| d);
    let description = match (description.find('"'), description.rfind('"')) {
        (Some(open), Some(close)) if close > open => format!(
            "{}\"{}\"{}",
            &description[..open],
            clip(&description[open + 1..close]),
            &description[close + 1..]
        ),
        _ => clip(description),
    };
    if e.line() == 0 {
        return description;
    }
    format!("{description} at line {} column {}", e.line(), e.column())
}

/// What kind of failure a call ended in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request cannot be served as sent; the message says what to fix.
    Invalid,
    /// A bound of the server or of the caller's connection is reached: retry later, with backoff.
    Overloaded,
    /// The caller's deadline passed before the work was done.
    Deadline,
    /// Not serving yet (models loading) or any more (shutting down): retry, perhaps on another replica.
    Unavailable,
    /// The server failed.
    Internal,
    /// The call needs a credential it did not present, or presented a wrong one.
    Unauthenticated,
    /// The call is not allowed on this server, whoever makes it (e.g. model control while it is off).
    PermissionDenied,
    /// The call is valid, but the server's state refuses it as sent (the message says how to insist).
    FailedPrecondition,
    /// The call names a route or method this server does not have.
    NotFound,
    /// The request is larger than the server takes at all: send less per call (retrying it as is cannot help).
    TooLarge,
}

/// Why a call failed, for any adapter: a kind and a message for the caller.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ServiceError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ServiceError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ServiceError {
            kind,
            message: message.into(),
        }
    }

    /// Calls before the models are loaded and warmed up.
    pub fn loading() -> Self {
        Self::new(ErrorKind::Unavailable, "models are still loading; retry shortly")
    }

    /// A request the protocol adapter cannot read; the message says what to fix.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}

impl From<RequestError> for ServiceError {
    fn from(e: RequestError) -> Self {
        Self::new(e.kind(), e.to_string())
    }
}

impl From<AdmissionError> for ServiceError {
    fn from(e: AdmissionError) -> Self {
        Self::new(ErrorKind::Overloaded, e.to_string())
    }
}

impl From<QueueError> for ServiceError {
    fn from(e: QueueError) -> Self {
        let kind = match &e {
            QueueError::Full { .. } | QueueError::NoSpareRoom { .. } => ErrorKind::Overloaded,
            QueueError::DeadlineExceeded => ErrorKind::Deadline,
            QueueError::ShuttingDown => ErrorKind::Unavailable,
            QueueError::Model(_) => ErrorKind::Internal,
        };
        Self::new(kind, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_error_keeps_what_and_where_and_clips_the_value_it_quotes() {
        let long = format!(r#"{{"shape": "{}"}}"#, "x".repeat(10_000));
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Shape {
            shape: Vec<i64>,
        }
        let e = serde_json::from_str::<Shape>(&long).unwrap_err();
        let message = json_error(&e);
        assert!(message.starts_with("invalid type: string \"xxxx"), "{message}");
        assert!(
            message.contains("…(10000 bytes)\", expected a sequence at line 1 column"),
            "{message}"
        );
        assert!(message.len() < 200, "{message}");
        let e = serde_json::from_str::<Shape>("{not json").unwrap_err();
        assert_eq!(json_error(&e), "key must be a string at line 1 column 2");
    }
}
