//! Out-of-distribution rejection against a real server: a photo of an animal is rejected with its own reason,
//! test-set garments are not, and the threshold can be overridden per request.

mod common;

use common::{TestServer, classify_all, config, encoded, fixture, repo, request};
use fmnist_serve::pb;

fn reason(r: &pb::Classification) -> pb::Reason {
    pb::Reason::try_from(r.reason).unwrap()
}

#[tokio::test]
async fn a_photo_of_an_animal_is_rejected_as_out_of_distribution() {
    let mut server = TestServer::start(config()).await;
    for name in ["horse-crop1.png", "cat-crop7.png"] {
        let bytes = std::fs::read(repo().join("tests/fixtures/ood").join(name)).unwrap();
        let r = &server
            .client
            .classify(request(vec![encoded(bytes)]))
            .await
            .unwrap()
            .into_inner()
            .results[0];
        assert_eq!(reason(r), pb::Reason::OutOfDistribution, "{name}: {r:?}");
        assert!(!r.accepted);
        assert!(
            r.detail.contains("out-of-distribution score") && r.detail.contains("threshold"),
            "{}",
            r.detail
        );
        assert!(r.prediction.is_some(), "the prediction is still reported");
    }
}

#[tokio::test]
async fn test_set_garments_are_rarely_out_of_distribution() {
    let mut server = TestServer::start(config()).await;
    let images = fixture();
    let results = classify_all(&mut server.client, &images, "cnn").await;
    let ood = results
        .iter()
        .filter(|r| reason(r) == pb::Reason::OutOfDistribution)
        .count();
    // Calibrated to reject 1% of the validation split; allow sampling noise on 1,000 images.
    assert!(ood <= 25, "{ood} of 1,000 test images rejected as out-of-distribution");
}

#[tokio::test]
async fn the_ood_threshold_can_be_overridden_per_request() {
    let mut server = TestServer::start(config()).await;
    let bytes = std::fs::read(repo().join("tests/fixtures/ood/horse-crop1.png")).unwrap();
    let mut req = request(vec![encoded(bytes)]);
    req.max_ood_score = Some(1e6);
    let r = &server.client.classify(req).await.unwrap().into_inner().results[0];
    assert_ne!(reason(r), pb::Reason::OutOfDistribution, "{r:?}");

    let (pixels, _) = fixture()[0];
    let mut req = request(vec![common::raw(&pixels)]);
    req.max_ood_score = Some(-1e6);
    let r = &server.client.classify(req).await.unwrap().into_inner().results[0];
    assert_eq!(
        reason(r),
        pb::Reason::OutOfDistribution,
        "every image is out of distribution below any score"
    );

    let cnn = server.model_info("cnn").await;
    assert!(
        cnn.ood_method.starts_with("energy") && cnn.ood_threshold.is_finite(),
        "{cnn:?}"
    );
}
