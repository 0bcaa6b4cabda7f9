//! Logs (tracing) and metrics (Prometheus) setup, and the names of every metric the service records.

use std::{io::IsTerminal, sync::OnceLock};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

/// Upper bounds of the top-probability histogram.
const TOP_PROBABILITY_BUCKETS: [f64; 9] = [0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0];
/// Upper bounds of the OOD margin histogram (the score minus the model's threshold: above 0 is rejected).
const OOD_MARGIN_BUCKETS: [f64; 12] = [-8.0, -4.0, -2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0, 4.0];
/// Upper bounds of the brightness and contrast histograms (pixel mean and standard deviation, over 255).
const INPUT_BUCKETS: [f64; 10] = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8];

/// Declares each metric once: its name as a constant, and its help text, which is both the constant's doc and
/// the `# HELP` line `/metrics` writes (`describe`).
macro_rules! metrics {
    ($($(#[doc = $doc:literal])+ $name:ident: $kind:ident = $value:literal;)+) => {
        /// Metric names, in Prometheus conventions: base units, `_total` for counters.
        pub mod metric {
            $($(#[doc = $doc])+ pub const $name: &str = $value;)+
        }

        /// Gives every metric its `# HELP` text in the recorder.
        fn describe() {
            $(metrics!(@describe $kind, $value, concat!($($doc),+));)+
        }
    };
    (@describe counter, $value:literal, $help:expr) => { metrics::describe_counter!($value, $help.trim()) };
    (@describe gauge, $value:literal, $help:expr) => { metrics::describe_gauge!($value, $help.trim()) };
    (@describe histogram, $value:literal, $help:expr) => { metrics::describe_histogram!($value, $help.trim()) };
}

metrics! {
    /// Calls by `rpc` and gRPC `code`.
    REQUESTS: counter = "fmnist_requests_total";
    /// Images by `model`, `version`, `outcome` (accepted/rejected) and `reason`.
    IMAGES: counter = "fmnist_images_total";
    /// Images dropped before inference, by `model`, `version` and `cause` (cancelled/deadline).
    DROPPED_IMAGES: counter = "fmnist_dropped_images_total";
    /// Handling time of a call, from its request's last byte to its response, by `rpc` and gRPC `code` (how
    /// fast refusals are, too).
    REQUEST_DURATION: histogram = "fmnist_request_duration_seconds";
    /// Time a call's images waited in the queue before their batch started, by `model` and `version`.
    QUEUE_WAIT: histogram = "fmnist_queue_wait_seconds";
    /// ONNX Runtime time per batch (including input fill and output split), by `model` and `version`.
    INFERENCE_TIME: histogram = "fmnist_inference_duration_seconds";
    /// Images per ONNX Runtime run, by `model` and `version`.
    BATCH_SIZE: histogram = "fmnist_batch_size_images";
    /// Batches run on the version's solo session (`--solo-threads`: no other instance busy, nothing waiting),
    /// by `model` and `version`; the rest ran on an instance's own session.
    SOLO_BATCHES: counter = "fmnist_solo_batches_total";
    /// Lone calls run on their caller's own thread instead of the inference thread's (`--inline-max-images`), by
    /// `model` and `version`.
    INLINE_BATCHES: counter = "fmnist_inline_batches_total";
    /// Images the model saw, by `model`, `version` and predicted `class` (drift: the class mix).
    PREDICTED_CLASS: counter = "fmnist_predicted_class_total";
    /// Calibrated top probability of each image the model saw, by `model` and `version`.
    TOP_PROBABILITY: histogram = "fmnist_top_probability";
    /// OOD score minus the model's own threshold (above 0: rejected), by `model` and `version`.
    OOD_MARGIN: histogram = "fmnist_ood_margin";
    /// Pixel mean over 255 of each 28x28 input, by `model` and `version`.
    INPUT_BRIGHTNESS: histogram = "fmnist_input_brightness";
    /// Pixel standard deviation over 255 of each 28x28 input, by `model` and `version`.
    INPUT_CONTRAST: histogram = "fmnist_input_contrast";
    /// Share of the validation split per verdict `reason`, by `model` and `version` (the model's drift
    /// reference).
    REFERENCE_REASON_SHARE: gauge = "fmnist_drift_reference_reason_share";
    /// Share of the validation split per predicted `class`, by `model` and `version`.
    REFERENCE_CLASS_SHARE: gauge = "fmnist_drift_reference_class_share";
    /// The validation split's mean of a drift `signal` (top_probability_mean, ood_margin_mean, brightness_mean,
    /// contrast_mean), by `model` and `version`.
    REFERENCE: gauge = "fmnist_drift_reference";
    /// The memory budget's terms, by `term` (baseline, model_sessions, large_decodes, small_decodes,
    /// request_bytes, connections, capture_queue, total): the most the server can hold (docs/reliability.md).
    MEMORY_BUDGET: gauge = "fmnist_memory_budget_bytes";
    /// The memory limit of the process's cgroup hierarchy (the lowest on the way up), when there is one.
    MEMORY_LIMIT: gauge = "fmnist_memory_limit_bytes";
    /// Images offered to the capture (`--capture-dir`), by `outcome`: not_sampled, queued, dropped_queue_full
    /// (the writer is behind: a slow or failing disk), written, write_failed.
    CAPTURE_RECORDS: counter = "fmnist_capture_records_total";
    /// Calls that did not fit in the batch being formed and opened the next one, by `model` and `version`.
    CARRIED_JOBS: counter = "fmnist_batch_carried_calls_total";
    /// Images queued or running, by `model` and `version`.
    QUEUE_DEPTH: gauge = "fmnist_queue_depth_images";
    /// Images of calls waiting for room in a full queue (`--max-queue-wait-ms`), by `model` and `version`.
    WAITING_IMAGES: gauge = "fmnist_queue_waiting_images";
    /// 1 for each version serving, 0 once it has left, labelled with `model` and `version`.
    MODEL_INFO: gauge = "fmnist_model_info";
    /// Version loads and unloads, by `model` and `outcome` (loaded, failed, unloaded).
    MODEL_RELOADS: counter = "fmnist_model_reloads_total";
    /// Model load and unload calls refused, by `reason` (disabled, missing_key, wrong_key).
    CONTROL_REFUSALS: counter = "fmnist_model_control_refusals_total";
    /// Connections open on the gRPC port.
    CONNECTIONS_OPEN: gauge = "fmnist_connections_open";
    /// Connections the server closed, by `cause`: idle_timeout (no bytes), max_idle (no call in flight),
    /// head_timeout, body_too_slow, write_stall, evicted (for a new connection at the cap),
    /// tls_handshake_timeout, tls_handshake_failed.
    CONNECTIONS_CLOSED: counter = "fmnist_connections_closed_total";
    /// Connections the metrics port closed, by `cause` (head_timeout, evicted, write_timeout).
    METRICS_CONNECTIONS_CLOSED: counter = "fmnist_metrics_connections_closed_total";
    /// Failed calls whose WARN line was left out: past a few lines a second per peer, a peer's failures are
    /// counted here and summed in its next line (`failures_not_logged_before`).
    FAILURES_NOT_LOGGED: counter = "fmnist_failures_not_logged_total";
    /// Failed `accept` calls on either port (each is followed by a backoff).
    ACCEPT_ERRORS: counter = "fmnist_accept_errors_total";
    /// Request bytes (bodies, header lists, and what decoding a message adds to its wire bytes) held by calls
    /// in flight (with the answers waiting, bounded by --max-request-bytes-in-flight).
    REQUEST_BYTES_IN_FLIGHT: gauge = "fmnist_request_bytes_in_flight";
    /// Answer bytes ready and not yet taken by their connection, which waits for its client to read
    /// (charged to the same account as the request bytes).
    ANSWER_BYTES_WAITING: gauge = "fmnist_answer_bytes_waiting";
    /// Blocking decodes stopped between images because their caller had gone or its deadline had passed.
    DECODES_ABANDONED: counter = "fmnist_decodes_abandoned_total";
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable text.
    Text,
    /// JSON lines, for log pipelines.
    Json,
}

/// The span exporter's layer (`crate::traces`), when --otlp-endpoint is set.
pub type TraceLayer =
    tracing_opentelemetry::OpenTelemetryLayer<tracing_subscriber::Registry, opentelemetry_sdk::trace::Tracer>;

/// Text logs for people, JSON lines for log pipelines; level from RUST_LOG (default info). With `traces`,
/// spans are exported too.
pub fn init_tracing(format: LogFormat, traces: Option<TraceLayer>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(traces).with(filter);
    // A second init (tests start several servers per process) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_target(false)
                    .with_ansi(std::io::stdout().is_terminal()),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
    };
}

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Latency buckets from 100 µs (a single raw image on a fast core) to 10 s (a full queue of PNGs).
            let seconds = [
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            let batch = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(metric::BATCH_SIZE.into()), &batch))
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(metric::TOP_PROBABILITY.into()), &TOP_PROBABILITY_BUCKETS)
                })
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(metric::OOD_MARGIN.into()), &OOD_MARGIN_BUCKETS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(metric::INPUT_BRIGHTNESS.into()), &INPUT_BUCKETS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(metric::INPUT_CONTRAST.into()), &INPUT_BUCKETS))
                .expect("bucket lists are non-empty")
                .install_recorder()
                .expect("the Prometheus recorder is installed once per process");
            describe();
            handle
        })
        .clone()
}
