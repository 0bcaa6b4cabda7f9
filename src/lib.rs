//! Fashion-MNIST classification service: gRPC in, ONNX Runtime with dynamic batching inside.
//!
//! One request flows one way: a protocol adapter (`grpc::fashion_mnist`) → `classify`, the core with no
//! protocol in it: validate, reserve room (`admission`), `preprocess` (bytes → 28x28), `batching` (queue →
//! inference thread owning a `model` session), `verdict` (accept/reject) → back through the adapter.
#![forbid(unsafe_code)]

pub mod admission;
pub mod batching;
pub mod classify;
pub mod client;
pub mod config;
pub mod connections;
pub mod error;
pub mod grpc;
pub mod model;
pub mod preprocess;
pub mod server;
pub mod telemetry;
pub mod verdict;
pub mod web;

/// Code generated from proto/fashion_mnist/v1/classifier.proto.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("fashion_mnist.v1");
    /// Encoded descriptors of the proto, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("fashion_mnist_descriptor");
}
