//! The floor under the serving work: a bare tonic server with nothing but `grpc.health.v1.Health` (tonic-health,
//! the crate the service itself uses), on the same tokio runtime shape as `fmnist serve` (one worker per core) and
//! with TCP_NODELAY, as the service sets it. Whatever one unary `Check` costs this process in CPU is what tonic,
//! hyper, h2, the kernel's TCP and tokio cost a call before any of the service's own work.
//!
//!     cargo run --release --example grpc_floor -- --listen 127.0.0.1:50571
//!
//! `bench/floor.sh` drives it and the service with the same h2load load and compares CPU per call.

use std::net::SocketAddr;

use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:50571")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    eprintln!("grpc_floor: serving grpc.health.v1.Health on {}", args.listen);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(health)
        .serve(args.listen)
        .await?;
    Ok(())
}
