//! `fmnist`: the Fashion-MNIST classification server (default) and its command-line client. Wiring only.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fmnist_serve::{client, config::Config, server, telemetry, traces};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "fmnist",
    version,
    about = "Fashion-MNIST classification over gRPC (ONNX Runtime, dynamic batching)"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default when no command is given).
    Serve(Box<Config>),
    /// Classify image files with a running server.
    Classify(client::ClassifyArgs),
}

// mimalloc hands memory back to the OS after a burst; glibc's per-thread arenas kept an attack's peak
// (~500 MB) resident long after it ended.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

unsafe extern "C" {
    /// glibc: returns the free memory of every malloc arena to the operating system.
    fn malloc_trim(pad: usize) -> i32;
    /// glibc: sets a malloc parameter.
    fn mallopt(param: i32, value: i32) -> i32;
}

/// glibc's `M_ARENA_MAX`.
const M_ARENA_MAX: i32 = -8;

/// ONNX Runtime allocates through the C allocator, not mimalloc: a retired model version's session is freed
/// into glibc's arenas, which keep it resident. Trimming once a version has drained gives it back.
fn release_c_heap() {
    // SAFETY: malloc_trim takes no pointers and is safe to call from any thread at any time (glibc locks each
    // arena while it trims it).
    unsafe {
        malloc_trim(0);
    }
}

fn main() -> ExitCode {
    // SAFETY: called first thing, before any other thread exists; mallopt takes no pointers.
    unsafe {
        mallopt(M_ARENA_MAX, 2);
    }
    fmnist_serve::registry::set_memory_release(release_c_heap);
    let cli = Cli::parse();
    let config = match cli.command {
        Some(Command::Classify(args)) => {
            return runtime(None, 8).block_on(async {
                match client::classify(args).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(message) => {
                        eprintln!("error: {message}");
                        ExitCode::FAILURE
                    }
                }
            });
        }
        Some(Command::Serve(config)) => *config,
        None => Config::from_env(),
    };
    // The blocking pool runs the decodes (two lanes of decode slots) and model loading: nothing else, so a
    // cap just above that makes a runaway number of blocking threads impossible, not merely unlikely.
    runtime(Some(config.io_threads()), 2 * config.decode_slots() + 4).block_on(serve(config))
}

/// `workers`: the runtime's worker threads, or tokio's default (one per core) when `None`.
fn runtime(workers: Option<usize>, max_blocking_threads: usize) -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    builder
        .enable_all()
        .max_blocking_threads(max_blocking_threads)
        .build()
        .expect("the tokio runtime starts")
}

async fn serve(config: Config) -> ExitCode {
    let (provider, traces) = match &config.otlp_endpoint {
        None => (None, None),
        Some(endpoint) => match traces::exporter(endpoint, &config.otlp_service_name) {
            Ok((provider, layer)) => (Some(provider), Some(layer)),
            Err(message) => {
                eprintln!("error: {message}");
                return ExitCode::FAILURE;
            }
        },
    };
    telemetry::init_tracing(config.log_format, traces);
    let code = serve_logged(config).await;
    if let Some(provider) = provider {
        // Sends the spans still buffered (the last calls before a drain). Blocking: off the runtime's workers.
        let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
    }
    code
}

async fn serve_logged(config: Config) -> ExitCode {
    let bind = |addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))
    };
    let listeners = async { Ok::<_, String>((bind(config.listen).await?, bind(config.metrics_listen).await?)) }.await;
    let (grpc, metrics) = match listeners {
        Ok(l) => l,
        Err(message) => {
            tracing::error!("{message}");
            return ExitCode::FAILURE;
        }
    };
    match server::serve(config, grpc, metrics, shutdown_signal()).await {
        Ok(()) => {
            tracing::info!("stopped cleanly");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
