//! The integration tests: real servers on ephemeral ports, the repository's models, real ONNX Runtime and
//! dataset images.
//!
//! One binary, not one per file: each test binary compiles and links its own copy of the client code it
//! instantiates. Fifteen of them took 30 to 47 CPU-seconds each to build in release (three measured); this
//! one takes about 85.
//!
//! The tests run one at a time (`RUST_TEST_THREADS=1` in `.cargo/config.toml`): the metrics recorder is
//! process-wide, and several tests read exact counts or gauges from it. Run in parallel they took about as
//! long, as most of the time is ONNX Runtime's.

mod common;

mod batching;
mod classify;
mod cli;
mod control;
mod deadlines;
mod docs;
mod fuzz_requests;
mod hardening;
mod lifecycle;
mod metrics;
mod model_lifecycle;
mod oip;
mod ood;
mod operations;
mod reference_outputs;
mod reliability;
mod request_bytes;
mod slots;
mod uploads;
