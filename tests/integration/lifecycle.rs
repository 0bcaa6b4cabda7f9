//! Start-up and shutdown as a balancer sees them: while the models load, the server listens but says it is not
//! ready on every protocol; while it drains, health watchers hear NOT_SERVING before the connection goes.
//! Loading is held open on purpose (the model's metadata is a FIFO the test writes when it is done looking), so
//! nothing here depends on how fast a machine loads a model.

use crate::common;

use std::{process::Command, time::Duration};

use common::{TestServer, config, fixture, raw, repo, request};
use fmnist_serve::inference_pb::{ServerReadyRequest, grpc_inference_service_client::GrpcInferenceServiceClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

const SERVICES: [&str; 3] = ["", "fashion_mnist.v1.Classifier", "inference.GRPCInferenceService"];

/// A repository whose cnn/1/model.json is a FIFO: the server's load blocks reading it until the test writes it.
fn gated_models_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "fmnist-gated-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let version = dir.join("cnn/1");
    std::fs::create_dir_all(&version).unwrap();
    std::os::unix::fs::symlink(repo().join("models/cnn/1/model.onnx"), version.join("model.onnx")).unwrap();
    let status = Command::new("mkfifo").arg(version.join("model.json")).status().unwrap();
    assert!(status.success(), "mkfifo");
    dir
}

async fn assert_every_service(health: &mut HealthClient<tonic::transport::Channel>, want: ServingStatus, when: &str) {
    for service in SERVICES {
        let request = HealthCheckRequest {
            service: service.into(),
        };
        let status = health.check(request).await.unwrap().into_inner().status;
        assert_eq!(status, want as i32, "health of {service:?} {when}");
    }
}

async fn http_status(addr: std::net::SocketAddr, path: &str) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    String::from_utf8_lossy(&response[9..12]).parse().unwrap()
}

#[tokio::test]
async fn while_models_load_every_protocol_says_not_ready_then_all_turn_ready() {
    let dir = gated_models_dir();
    let mut config = config();
    config.models_dir = dir.clone();
    config.models = vec!["cnn".into()];
    config.default_model = "cnn".into();
    let mut server = TestServer::start_loading(config).await;
    let channel = server.channel.clone();
    let mut health = HealthClient::new(channel.clone());
    let mut oip = GrpcInferenceServiceClient::new(channel);
    let (pixels, _) = fixture()[0];

    // The server is up (it answers), but loading: not ready anywhere, and calls are UNAVAILABLE.
    assert_every_service(&mut health, ServingStatus::NotServing, "while loading").await;
    assert!(
        !oip.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert_eq!(http_status(server.addr, "/v2/health/ready").await, 503);
    assert_eq!(
        http_status(server.addr, "/v2/health/live").await,
        200,
        "live while loading"
    );
    let refused = server.client.classify(request(vec![raw(&pixels)])).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("loading"), "{}", refused.message());

    // Let the load finish: everything turns ready, and calls are served.
    let meta = std::fs::read(repo().join("models/cnn/1/model.json")).unwrap();
    let fifo = dir.join("cnn/1/model.json");
    tokio::task::spawn_blocking(move || std::fs::write(fifo, meta))
        .await
        .unwrap()
        .unwrap();
    server.wait_serving().await;
    assert_every_service(&mut health, ServingStatus::Serving, "once loaded").await;
    assert!(
        oip.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert_eq!(http_status(server.addr, "/v2/health/ready").await, 200);
    assert!(server.client.classify(request(vec![raw(&pixels)])).await.is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn on_shutdown_health_watchers_hear_not_serving_before_the_connection_closes() {
    let mut config = config();
    config.drain_timeout_s = 5;
    let server = TestServer::start(config).await;
    let mut health = HealthClient::new(server.channel.clone());
    // A client-side balancer watches health on a connection it already has; that is how it learns of a drain
    // (new connections are refused from the first moment).
    let mut watches = Vec::new();
    for service in SERVICES {
        let mut stream = health
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = stream.message().await.unwrap().unwrap().status;
        assert_eq!(first, ServingStatus::Serving as i32, "{service:?} before shutdown");
        watches.push((service, stream));
    }
    let stopped = tokio::spawn(server.stop());
    for (service, mut stream) in watches {
        let next = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .unwrap_or_else(|_| panic!("{service:?}: no status within 5 s of shutdown"));
        let status = next.unwrap().expect("a status before the stream ends").status;
        assert_eq!(status, ServingStatus::NotServing as i32, "{service:?} while draining");
    }
    // The watches were the last streams: with them gone the drain ends well before its timeout.
    let result = tokio::time::timeout(Duration::from_secs(10), stopped)
        .await
        .expect("drained");
    assert!(result.unwrap().is_ok());
}
