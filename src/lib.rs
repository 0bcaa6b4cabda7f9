//! Fashion-MNIST classification service: gRPC in, ONNX Runtime with dynamic batching inside.
//!
//! One request flows one way: a protocol adapter (`grpc::fashion_mnist`; the Open Inference Protocol's
//! `oip` tensors over `grpc::inference` or `rest`) → `classify`, the core with no
//! protocol in it: validate, resolve the model version (`registry`), reserve room (`admission`), `preprocess`
//! (bytes → 28x28), `batching` (queue → inference thread owning a `model` session, which also computes the
//! `ood` score), `verdict` (accept/reject)
//! → back through the adapter. The `registry` keeps the versions the `repository` on disk asks for, and swaps
//! them while serving.
#![forbid(unsafe_code)]

pub mod admission;
pub mod batching;
pub mod classify;
pub mod client;
pub mod codec;
pub mod config;
pub mod connections;
pub mod control;
pub mod error;
pub mod grpc;
pub mod model;
pub mod oip;
pub mod ood;
pub mod preprocess;
pub mod registry;
pub mod repository;
pub mod rest;
pub mod rest_json;
pub mod server;
pub mod telemetry;
pub mod traces;
pub mod verdict;
pub mod web;

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
