//! OpenTelemetry traces: export over OTLP/gRPC (`--otlp-endpoint`) and W3C trace context from callers.
//!
//! A call's spans: `rpc` (its `rpc` attribute names the method; a child of the caller's span when the request
//! carries a `traceparent`) → `preprocess` → `queue_wait` → `inference`, the call's share of the batch run. The batch run
//! itself is one `inference_batch` span, linked to the `rpc` span of every call it served: one batch, many
//! parents. With no endpoint configured none of these extra spans is created and the hot path only reads one
//! flag.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::{
    propagation::{Extractor, TextMapPropagator},
    trace::{SpanContext, TraceContextExt, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported: the per-call spans beyond `rpc` exist only then.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The span exporter and its tracing layer. Call from inside the tokio runtime (the exporter's tonic channel
/// runs on it); keep the provider and shut it down at exit so the last spans are sent.
pub fn exporter<S>(
    endpoint: &str,
    service_name: &str,
) -> Result<
    (
        SdkTracerProvider,
        tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>,
    ),
    String,
>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| format!("OTLP exporter for {endpoint}: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(service_name.to_string())
                .with_attribute(opentelemetry::KeyValue::new(
                    "service.version",
                    env!("CARGO_PKG_VERSION"),
                ))
                .build(),
        )
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("fmnist-serve"));
    ENABLED.store(true, Ordering::Relaxed);
    Ok((provider, layer))
}

/// Makes `span` a child of the caller's span named by the request's W3C `traceparent` (and `tracestate`)
/// headers; without them, or with malformed ones, the span starts a new trace.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// The exported identity of `span`, for links.
pub fn span_context(span: &tracing::Span) -> SpanContext {
    span.context().span().span_context().clone()
}

/// Adds a link from `span` to `to`.
pub fn link(span: &tracing::Span, to: SpanContext) {
    if to.is_valid() {
        span.add_link(to);
    }
}

/// Sets an attribute on `span`'s exported span.
pub fn attribute(span: &tracing::Span, key: String, value: i64) {
    span.set_attribute(key, value);
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}
