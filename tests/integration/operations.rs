//! Operations: metrics move with real calls, request ids are echoed, and SIGTERM under load drains: every call
//! accepted before the signal succeeds and the process exits 0.

use crate::common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::{TestServer, config, fixture, raw, request};
use fmnist_serve::pb::{self, classifier_client::ClassifierClient};

#[tokio::test]
async fn the_request_id_header_is_echoed_back() {
    let mut server = TestServer::start(config()).await;
    let (pixels, _) = fixture()[0];
    let mut req = tonic::Request::new(request(vec![raw(&pixels)]));
    req.metadata_mut().insert("x-request-id", "test-123".parse().unwrap());
    let response = server.client.classify(req).await.unwrap();
    assert_eq!(response.metadata().get("x-request-id").unwrap(), "test-123");
}

#[tokio::test]
async fn sigterm_under_load_finishes_every_accepted_call_and_exits_zero() {
    // The per-call "call finished" line is DEBUG (a line per call at INFO costs throughput): keep it here.
    let mut server = common::spawn_binary_logging(&[], "info,fmnist_serve::transport::layers=debug");
    let addr = server.addr.clone();
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let client = ClassifierClient::new(channel);
    let images: Vec<pb::Image> = fixture().iter().take(64).map(|(p, _)| raw(p)).collect();

    // 12 callers x 64 images keep the queue busy without filling it (1,024 images), so nothing is refused for
    // load: each call is in flight or about to be sent when the signal comes.
    let callers: Vec<_> = (0..12)
        .map(|_| {
            let (mut client, images) = (client.clone(), images.clone());
            tokio::spawn(async move {
                let mut calls = Vec::new();
                loop {
                    let result = client.classify(request(images.clone())).await;
                    let failed = result.is_err();
                    calls.push(result.map(|r| r.into_inner().results.len()));
                    if failed {
                        return calls;
                    }
                }
            })
        })
        .collect();
    // The signal comes once the server itself has served calls from every caller's first round, however
    // slow the machine: the server's own count, not a sleep, says the load is running.
    let started = Instant::now();
    while common::metric(
        &common::metrics_text(server.metrics_addr.parse().unwrap()).await,
        "fmnist_requests_total{rpc=\"Classify\",code=\"Ok\"}",
    ) < 24.0
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no load reached the server"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    let mut served = 0;
    for caller in callers {
        for result in caller.await.unwrap() {
            match result {
                Ok(n) => {
                    assert_eq!(n, 64, "a call was half-served");
                    served += 1;
                }
                // After the signal new calls are refused (connection draining), never half-served.
                Err(s) => assert!(
                    matches!(
                        s.code(),
                        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
                    ),
                    "{s:?}"
                ),
            }
        }
    }
    let (exit, log) = tokio::task::spawn_blocking(move || server.wait()).await.unwrap();
    assert_eq!(exit.code(), Some(0), "exit status; log:\n{log}");
    assert!(log.contains("shutdown requested"), "{log}");
    // The server's side of the story: every call it finished reached its caller, and none it took failed.
    // (Each call logs one line when it ends: "call finished" at DEBUG, or "call failed" with the status.)
    let finished = log
        .lines()
        .filter(|l| l.contains("rpc=Classify") && l.contains("call finished"))
        .count();
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("rpc=Classify") && l.contains("call failed"))
        .collect();
    assert!(failed.is_empty(), "the server failed calls it had accepted: {failed:?}");
    assert_eq!(finished, served, "calls the server finished vs answers the callers got");
    assert!(served >= 24, "the load ran ({served} calls served)");
}

#[tokio::test]
async fn health_is_serving_once_models_are_loaded() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let server = TestServer::start(config()).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "fashion_mnist.v1.Classifier"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, 1, "{service:?} SERVING");
    }
}

/// gRFC A9: at --max-connection-age-s the server sends GOAWAY and lets the call in flight finish, so clients
/// reconnect (and a Service may place them on another replica) without a failed call.
#[tokio::test]
async fn an_aged_connection_gets_goaway_and_its_call_in_flight_still_succeeds() {
    use prost::Message;

    let mut config = config();
    config.max_connection_age_s = 1;
    let server = TestServer::start(config).await;
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(connection);
    let opened = Instant::now();

    // A call whose body is still being sent when the connection reaches its age: it is in flight.
    let call = http::Request::post("/fashion_mnist.v1.Classifier/Classify")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut body) = client.ready().await.unwrap().send_request(call, false).unwrap();
    let message = request(vec![raw(&fixture()[0].0)]).encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let (head, tail) = frame.split_at(10);
    body.send_data(bytes::Bytes::copy_from_slice(head), false).unwrap();
    // Past the age (at most 1.1 s with the jitter): the GOAWAY is out, the call not yet finished.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    body.send_data(bytes::Bytes::copy_from_slice(tail), true).unwrap();

    let mut response = response.await.expect("the call in flight is answered");
    assert_eq!(response.status(), 200);
    let mut answer = Vec::new();
    while let Some(chunk) = response.body_mut().data().await {
        answer.extend_from_slice(&chunk.unwrap());
    }
    let trailers = response.body_mut().trailers().await.unwrap().expect("grpc trailers");
    assert_eq!(trailers["grpc-status"], "0", "{trailers:?}");
    let answer = pb::ClassifyResponse::decode(&answer[5..]).unwrap();
    assert_eq!(answer.results[0].prediction.as_ref().unwrap().class_id, fixture()[0].1);

    // The server closed the connection gracefully (GOAWAY with NO_ERROR, then a clean close): a close without
    // GOAWAY, as with tonic's max_connection_age_grace, ends the h2 driver with an error instead.
    let closed = tokio::time::timeout(Duration::from_secs(5), driver)
        .await
        .expect("the aged connection closes once its call is done")
        .unwrap();
    assert!(closed.is_ok(), "connection ended with {closed:?}");
    assert!(
        opened.elapsed() >= Duration::from_millis(900),
        "closed after {:?}",
        opened.elapsed()
    );
}

#[tokio::test]
async fn a_failed_rest_call_is_logged_with_what_went_wrong() {
    // issue #40: every failed REST call was logged as error="400 Bad Request", whatever the reason.
    let mut server = common::spawn_binary_logging(&[], "info");
    let addr: std::net::SocketAddr = server.addr.parse().unwrap();
    let body = format!(
        r#"{{"inputs": [{{"name": "raw", "datatype": "UINT8", "shape": [1, 28, 28], "data": {:?}}}]}}"#,
        [0u8; 784]
    );
    let (status, _, _) = crate::oip::http(addr, "POST", "/v2/models/shoes/infer", &[], body.as_bytes()).await;
    assert_eq!(status, 400);
    Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    let (_, log) = tokio::task::spawn_blocking(move || server.wait()).await.unwrap();
    let failed: Vec<&str> = log.lines().filter(|l| l.contains("call failed")).collect();
    assert_eq!(failed.len(), 1, "{log}");
    assert!(failed[0].contains("unknown model \\\"shoes\\\""), "{}", failed[0]);
}
