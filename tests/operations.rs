//! Operations: metrics move with real calls, request ids are echoed, and SIGTERM under load drains: every call
//! accepted before the signal succeeds and the process exits 0.

mod common;

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
    let mut server = common::spawn_binary(&[]);
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
    // (Each call logs one line when it ends: "call finished", or "call failed" with the status.)
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
