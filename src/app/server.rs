//! Wires the pieces into a running server: the model registry and what reloads it (polling, SIGHUP), the gRPC
//! services (classifier, Open Inference Protocol, health, reflection, gRPC-Web), the REST routes and the page,
//! the metrics endpoint, and graceful shutdown.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic_health::server::HealthReporter;

use crate::{
    api::oip::rest,
    api::{fashion_mnist::FashionMnistService, oip::grpc::InferenceService},
    app::budget::{self, MemoryBudget},
    app::config::Config,
    app::web,
    core::batching::ActiveCalls,
    core::capture::Capture,
    core::classify::Pipeline,
    core::control::ModelControl,
    core::registry::DefaultModel,
    core::registry::Registry,
    error::ModelError,
    inference_pb::grpc_inference_service_server::GrpcInferenceServiceServer,
    pb::{self, classifier_server::ClassifierServer},
    telemetry,
    transport::connections,
    transport::layers::{CallLimitsLayer, RpcLayer},
};

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("default model {default:?} is not among the loaded models {loaded:?}: set --default-model or --models")]
    DefaultModel { default: String, loaded: Vec<String> },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("TLS file {path}: {reason}")]
    Tls { path: std::path::PathBuf, reason: String },
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("invalid settings: {0}")]
    Config(String),
}

/// The default model `--default-model` resolves to, which must be one of `--models`.
fn default_model(config: &Config) -> Result<DefaultModel, ServeError> {
    let default = config.default_model_choice();
    if !config.models.contains(&default.name) {
        return Err(ServeError::DefaultModel {
            default: default.name,
            loaded: config.models.clone(),
        });
    }
    Ok(default)
}

/// Loads and warms up every configured model's versions and starts their inference threads: the registry
/// the server serves from. Blocking: call it off the async runtime.
pub fn load_models(config: &Config) -> Result<Arc<Registry>, ServeError> {
    default_model(config)?;
    let registry = Registry::new(config.registry_settings(ActiveCalls::default()));
    registry.load_at_start()?;
    Ok(registry)
}

/// Reloads at every poll interval, and at once on SIGHUP.
async fn watch_repository(registry: Arc<Registry>, poll: Option<Duration>) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reloads come from polling and the API only");
            None
        }
    };
    let mut ticks = poll.map(|p| {
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + p, p);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    });
    loop {
        let hup = async {
            match hangup.as_mut() {
                Some(signal) => signal.recv().await,
                None => std::future::pending().await,
            }
        };
        let tick = async {
            match ticks.as_mut() {
                Some(interval) => interval.tick().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = hup => tracing::info!("SIGHUP: reloading the model repository"),
            _ = tick => {}
        }
        registry.reload(None).await;
    }
}

/// TLS (and mutual TLS when a client CA is given) from the configured PEM files; `None` for plaintext.
fn tls_acceptor(config: &Config) -> Result<Option<tokio_rustls::TlsAcceptor>, ServeError> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let read = |path: &std::path::PathBuf| {
        std::fs::read(path).map_err(|e| ServeError::Tls {
            path: path.clone(),
            reason: e.to_string(),
        })
    };
    let client_ca = config.tls_client_ca.as_ref().map(read).transpose()?;
    connections::tls_acceptor(&read(cert)?, &read(key)?, client_ca.as_deref())
        .map(Some)
        .map_err(|reason| ServeError::Tls {
            path: cert.clone(),
            reason,
        })
}

fn serving_status(serving: bool) -> tonic_health::ServingStatus {
    if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    }
}

/// The server as a whole (`""` and each service's name): SERVING only while the default model has a ready
/// version and the server is not draining.
async fn set_health(reporter: &HealthReporter, serving: bool) {
    let status = serving_status(serving);
    reporter.set_service_status("", status).await;
    reporter
        .set_service_status(<ClassifierServer<FashionMnistService> as NamedService>::NAME, status)
        .await;
    reporter
        .set_service_status(
            <GrpcInferenceServiceServer<InferenceService> as NamedService>::NAME,
            status,
        )
        .await;
}

/// Keeps health equal to what the registry serves: the server's names follow [`Pipeline::is_ready`], and each
/// configured model's name is SERVING while it has a ready version. Runs until the server stops; `drained`
/// wakes it when the drain begins.
async fn follow_health(
    reporter: HealthReporter,
    core: Pipeline,
    registry: Arc<Registry>,
    mut drained: tokio::sync::watch::Receiver<bool>,
) {
    let mut published = registry.subscribe();
    loop {
        set_health(&reporter, core.is_ready()).await;
        let snapshot = registry.snapshot().unwrap_or_default();
        for name in registry.configured() {
            let ready = !core.is_draining() && snapshot.model_ready(name);
            reporter.set_service_status(name, serving_status(ready)).await;
        }
        tokio::select! {
            changed = published.changed() => if changed.is_err() { return },
            changed = drained.changed() => if changed.is_err() { return },
        }
    }
}

/// A number in [-1, 1] that differs between processes: the connection-age jitter.
fn process_jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS per process: enough randomness for spreading timers, no extra crate.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    (hasher.finish() as f64 / u64::MAX as f64) * 2.0 - 1.0
}

/// Serves gRPC on `listener` and metrics on `metrics_listener` until `shutdown` resolves, then drains: health
/// turns NOT_SERVING, new connections are refused, and calls already accepted finish (bounded by the drain
/// timeout). Health is NOT_SERVING until every model is loaded and warmed up.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    metrics_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    config.validate().map_err(ServeError::Config)?;
    let budget = MemoryBudget::of(&config);
    budget::check_memory_limit(&budget, config.ignore_memory_limit).map_err(ServeError::Config)?;
    let (reporter, health) = tonic_health::server::health_reporter();
    set_health(&reporter, false).await;

    // grpcurl 1.8 speaks reflection v1alpha only, newer tools v1: serve both, with every descriptor they need.
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let default = default_model(&config)?;
    crate::transport::codec::allow_images_per_call(config.max_images_per_request);
    let control = ModelControl::new(config.control_settings().map_err(ServeError::Config)?);
    // Empty until the first load: calls are UNAVAILABLE and health NOT_SERVING meanwhile. Its batchers and the
    // call layer share one count of the calls in progress.
    let calls = ActiveCalls::default();
    let registry = Registry::new(config.registry_settings(calls.clone()));
    let policy = config.policy();
    // The recorder first: a metric handle taken before it exists records nowhere (the capture's are taken
    // at its start).
    let metrics = telemetry::metrics_handle();
    budget.publish();
    let capture = match config.capture_settings() {
        Some(settings) => {
            let dir = settings.dir.clone();
            let capture = Capture::start(settings)
                .map_err(|e| ServeError::Config(format!("--capture-dir {}: {e}", dir.display())))?;
            tracing::info!(dir = %dir.display(), sample = config.capture_sample, max_mb = config.capture_max_mb, "capturing a sample of the images the model rejects");
            Some(capture)
        }
        None => None,
    };
    let core = Pipeline::new(registry.clone(), policy, capture);
    let classifier = ClassifierServer::new(FashionMnistService::new(core.clone(), config.max_message_bytes))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let inference = GrpcInferenceServiceServer::new(InferenceService::new(core.clone(), control.clone()))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let rest = rest::router(core.clone(), control.clone(), config.rest_settings());

    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown_reporter = reporter.clone();
    let draining = core.clone();
    let (drained_tx, drained_rx) = tokio::sync::watch::channel(false);
    let stop = async move {
        shutdown.await;
        tracing::info!("shutdown requested: health NOT_SERVING, draining calls in flight");
        // Draining first: from then on the health follower, woken below, can only report NOT_SERVING.
        draining.begin_drain();
        drained_tx.send_replace(true);
        set_health(&shutdown_reporter, false).await;
        let _ = drain_tx.send(());
    };
    let addr = listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string());
    let metrics_addr = metrics_listener
        .local_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string());
    let grpc = tonic::service::Routes::new(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(classifier)
        .add_service(inference);
    let incoming = connections::incoming(
        listener,
        config.connection_limits(),
        config.share_policy(),
        tls_acceptor(&config)?,
    );
    let keepalive = Duration::from_secs(config.http2_keepalive_s);
    let connection_age = config.max_connection_age(process_jitter());
    // No max_connection_age_grace: in tonic 0.14.9 a grace replaces the GOAWAY with a plain close at age +
    // grace (the graceful branch is never taken), failing the calls in flight. Without it, the GOAWAY goes out
    // at the age and the calls in flight finish, each bounded by --request-timeout-s.
    let mut builder = tonic::transport::Server::builder();
    if let Some(age) = connection_age {
        builder = builder.max_connection_age(age);
    }
    let server = builder
        .accept_http1(true)
        .max_concurrent_streams(config.max_concurrent_streams)
        .http2_max_header_list_size(config.max_header_list_bytes)
        .http2_keepalive_interval(Some(keepalive))
        .http2_keepalive_timeout(Some(keepalive))
        .http2_max_pending_accept_reset_streams(Some(config.http2_max_pending_resets))
        .timeout(Duration::from_secs(config.request_timeout_s))
        .layer(RpcLayer)
        .layer(CallLimitsLayer::new(
            config.max_request_bytes_in_flight,
            config.min_body_rate(),
            calls,
        ))
        .add_routes(web::with_grpc_web_and_page(grpc, rest))
        .serve_with_incoming_shutdown(incoming, stop);
    let mut server = tokio::spawn(server);
    let metrics_task = tokio::spawn(crate::app::metrics::serve_metrics(metrics_listener, metrics));
    tracing::info!(
        grpc = %addr,
        metrics = %metrics_addr,
        memory_budget = %budget,
        max_connection_age_s = connection_age.map(|a| a.as_secs_f64()),
        tls = match (&config.tls_cert, &config.tls_client_ca) {
            (None, _) => "off",
            (Some(_), None) => "on",
            (Some(_), Some(_)) => "mutual (client certificates required)",
        },
        "listening; loading models"
    );
    tracing::info!(model = %default.name, why = %default.why, "default model");

    let loading = registry.clone();
    let loaded = tokio::task::spawn_blocking(move || loading.load_at_start())
        .await
        .expect("model loading does not panic");
    if let Err(e) = loaded {
        server.abort();
        metrics_task.abort();
        return Err(e.into());
    }
    let health_task = tokio::spawn(follow_health(reporter, core, registry.clone(), drained_rx));
    tracing::info!(
        poll_s = config.model_poll_s,
        model_control = ?config.model_control,
        "serving"
    );
    let watcher = tokio::spawn(watch_repository(registry.clone(), config.model_poll()));

    let drain_timeout = config.drain_timeout();
    let result = tokio::select! {
        result = &mut server => result,
        () = async {
            let _ = drain_rx.await;
            tokio::time::sleep(drain_timeout).await;
        } => {
            tracing::warn!(timeout_s = drain_timeout.as_secs(), "drain timeout reached; exiting with calls still open");
            server.abort();
            Ok(Ok(()))
        }
    };
    metrics_task.abort();
    watcher.abort();
    health_task.abort();
    match result {
        Ok(r) => r.map_err(ServeError::from),
        Err(join) if join.is_cancelled() => Ok(()),
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
}
