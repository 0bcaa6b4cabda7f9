//! Deadlines: a call whose deadline passes while queued gets DEADLINE_EXCEEDED and its images never run.
//! The dropped-work and queue-depth metrics are process-wide, and no other test's load may race the timing:
//! tests run one at a time (see main.rs).

use crate::common;

use std::time::{Duration, Instant};

use common::{TestServer, config, fixture, metric, raw, request};
use fmnist_serve::{pb, server};
use tonic::Code;

#[tokio::test]
async fn a_call_whose_deadline_passes_in_the_queue_gets_deadline_exceeded_and_its_images_never_run() {
    let mut config = config();
    config.max_batch_size = 1; // a long queue: one image per ONNX Runtime run
    config.max_queued_images = 4096;
    config.max_queued_images_per_connection = 4096; // the backlog comes over one connection
    let server = TestServer::start(config.clone()).await;
    let images: Vec<pb::Image> = fixture().iter().take(64).map(|(p, _)| raw(p)).collect();
    let dropped = |m: &str| {
        m.lines()
            .filter(|l| l.starts_with("fmnist_dropped_images_total{model=\"cnn\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let before = dropped(&server.metrics().await);
    // Queue 32 x 64 images ahead (about a second of single-image runs) on their own connection, and wait until the server holds them, so the late call
    // is neither stuck behind them in the client's connection nor served at once.
    let backlog_channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let backlog: Vec<_> = (0..32)
        .map(|_| {
            let mut c = pb::classifier_client::ClassifierClient::new(backlog_channel.clone());
            let imgs = images.clone();
            tokio::spawn(async move { c.classify(request(imgs)).await })
        })
        .collect();
    let waiting = Instant::now();
    let depth = common::served_series("fmnist_queue_depth_images", "cnn");
    while metric(&server.metrics().await, &depth) < 1024.0 {
        assert!(waiting.elapsed() < Duration::from_secs(10), "the backlog never queued");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut late = tonic::Request::new(request(images[..4].to_vec()));
    late.set_timeout(Duration::from_millis(30));
    let status = server
        .client
        .clone()
        .classify(late)
        .await
        .expect_err("deadline passes in the queue");
    // tonic clients enforce the deadline themselves too and report it as CANCELLED "Timeout expired".
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    for call in backlog {
        assert!(call.await.unwrap().is_ok());
    }
    // The inference thread reaches the late job right after the backlog's last batch: give it that moment.
    let mut after = dropped(&server.metrics().await);
    let waiting = Instant::now();
    while after - before < 4.0 && waiting.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(5)).await;
        after = dropped(&server.metrics().await);
    }
    assert!(
        after - before >= 4.0,
        "the late call's 4 images were dropped before inference ({before} -> {after})"
    );

    // What the server itself answers, without a client-side timer: the core called directly.
    use fmnist_serve::classify::{ClassifyRequest, ImageInput, Pipeline};
    let core = Pipeline::new(server::load_models(&config).unwrap(), config.policy(), None);
    let call = |n: usize| ClassifyRequest {
        images: images[..n]
            .iter()
            .map(|i| match &i.data {
                Some(pb::image::Data::Raw(bytes)) => ImageInput::Raw(bytes.clone()),
                _ => unreachable!("the fixture images are raw"),
            })
            .collect(),
        ..Default::default()
    };
    let backlog: Vec<_> = (0..8)
        .map(|_| {
            let (core, req) = (core.clone(), call(64));
            tokio::spawn(async move { core.classify(req, None, None).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let deadline = Instant::now() + Duration::from_millis(30);
    let error = core
        .classify(call(4), None, Some(deadline))
        .await
        .expect_err("deadline passes in the queue");
    let status = tonic::Status::from(error);
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    for call in backlog {
        assert!(call.await.unwrap().is_ok());
    }
}
