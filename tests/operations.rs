//! Operations: metrics move with real calls, request ids are echoed, and SIGTERM under load drains: every call
//! accepted before the signal succeeds and the process exits 0.

mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::{TestServer, config, fixture, metric, raw, request};
use fmnist_serve::pb::{self, classifier_client::ClassifierClient};

#[tokio::test]
async fn metrics_count_calls_images_reasons_and_batches() {
    let mut server = TestServer::start(config()).await;
    let before = server.metrics().await;
    let (pixels, _) = fixture()[0];
    let images = vec![raw(&pixels), raw(&pixels), raw(&[0u8; 784])];
    server.client.classify(request(images)).await.unwrap();
    let status = server.client.classify(request(vec![])).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let after = server.metrics().await;

    let delta = |prefix: &str| metric(&after, prefix) - metric(&before, prefix);
    assert!(delta("fmnist_requests_total{rpc=\"Classify\",code=\"Ok\"}") >= 1.0);
    assert!(delta("fmnist_requests_total{rpc=\"Classify\",code=\"InvalidArgument\"}") >= 1.0);
    assert!(delta("fmnist_images_total{model=\"cnn\",outcome=\"rejected\",reason=\"low_contrast\"}") >= 1.0);
    let accepted = delta("fmnist_images_total{model=\"cnn\",outcome=\"accepted\",reason=\"accepted\"}")
        + delta("fmnist_images_total{model=\"cnn\",outcome=\"rejected\",reason=\"low_confidence\"}")
        + delta("fmnist_images_total{model=\"cnn\",outcome=\"rejected\",reason=\"out_of_distribution\"}");
    assert!(accepted >= 2.0, "two images reached the model");
    assert!(delta("fmnist_batch_size_images_sum{model=\"cnn\"}") >= 2.0);
    assert!(delta("fmnist_inference_duration_seconds_count{model=\"cnn\"}") >= 1.0);
    assert!(delta("fmnist_queue_wait_seconds_count{model=\"cnn\"}") >= 1.0);
    assert!(delta("fmnist_request_duration_seconds_count{rpc=\"Classify\",code=\"Ok\"}") >= 1.0);
    assert!(
        after.contains("fmnist_model_info{model=\"cnn\",version=\""),
        "model info gauge"
    );
    assert!(
        after.contains("fmnist_queue_depth_images{model=\"cnn\"}"),
        "queue depth gauge"
    );
    assert!(
        after.contains("fmnist_request_duration_seconds_bucket{rpc=\"Classify\",code=\"Ok\",le=\"0.0001\"}"),
        "sub-ms buckets"
    );
}

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
                    let started = Instant::now();
                    let result = client.classify(request(images.clone())).await;
                    let failed = result.is_err();
                    calls.push((started, result.map(|r| r.into_inner().results.len())));
                    if failed {
                        return calls;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let signalled = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    let mut before_signal = 0;
    for caller in callers {
        for (started, result) in caller.await.unwrap() {
            // Sent well before the signal: accepted, so it must succeed in full.
            if started + Duration::from_millis(5) < signalled {
                assert_eq!(
                    result.as_ref().ok(),
                    Some(&64),
                    "a call sent before SIGTERM failed: {result:?}"
                );
                before_signal += 1;
            } else if let Err(s) = result {
                // After the signal new calls are refused (connection draining), never half-served.
                assert!(
                    matches!(
                        s.code(),
                        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
                    ),
                    "{s:?}"
                );
            }
        }
    }
    let (exit, log) = tokio::task::spawn_blocking(move || server.wait()).await.unwrap();
    assert!(
        before_signal > 12,
        "the load ran ({before_signal} calls before the signal)"
    );
    assert_eq!(exit.code(), Some(0), "exit status; log:\n{log}");
    assert!(log.contains("shutdown requested"), "{log}");
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
