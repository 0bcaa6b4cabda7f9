//! Fashion-MNIST classification service: gRPC in, ONNX Runtime with dynamic batching inside.
//!
//! Layers, each importing only those below it:
//! - foundation (`error`, `traces`, `telemetry`): error kinds, tracing, metric names; nothing of ours.
//! - `core`: the pipeline with no protocol in it: validate, resolve the model version (`registry`), reserve
//!   room (`admission`), `preprocess` (bytes → 28x28), `batching` (queue → inference thread owning a `model`
//!   session, which also computes the `ood` score), `verdict` (accept/reject); the `registry` keeps the
//!   versions the `repository` on disk asks for and swaps them while serving; `control` gates who may.
//! - `transport`: accepting `connections`, the tower `layers` every call goes through, the gRPC `codec`,
//!   and `status`, the one map from an error kind to a gRPC code and an HTTP status.
//! - `api`: one thin adapter per protocol: `fashion_mnist`, and `oip` (the Open Inference Protocol) with its
//!   `grpc` and `rest` transports.
//! - `app`: `config` (the command line, and every settings type built from it), `server` (the wiring), the
//!   metrics port, the page, the CLI's client. Only `main`, the tests and the benches import it.
#![forbid(unsafe_code)]

pub mod api;
pub mod app;
pub mod core;
pub mod error;
pub mod telemetry;
pub mod traces;
pub mod transport;

// The paths the tests, benches and examples use.
pub use app::{client, config, server};
pub use core::{admission, batching, classify, control, model, ood, preprocess, registry, repository, verdict};

/// Code generated from proto/fashion_mnist/v1/classifier.proto.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("fashion_mnist.v1");
    /// Encoded descriptors of both protos, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("descriptor");
}

/// Code generated from proto/inference/grpc_predict_v2.proto: the Open Inference Protocol (KServe v2).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod inference_pb {
    tonic::include_proto!("inference");
}
