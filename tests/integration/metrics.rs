//! The metrics a real server exports after known calls, exactly. The recorder is process-wide, so no
//! other test's calls may land between the two scrapes: tests run one at a time (see main.rs).

use crate::common;

use common::{TestServer, config, fixture, metric, raw, request};

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

    // Every metric says what it counts (issue #40: `# TYPE` lines came without `# HELP`).
    for line in after.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split(' ').nth(2).unwrap();
        assert!(
            after.lines().any(|l| l.starts_with(&format!("# HELP {name} "))),
            "{name} has no # HELP line"
        );
    }

    let delta = |prefix: &str| metric(&after, prefix) - metric(&before, prefix);
    // The labels of the version served: the newest one shipped.
    let cnn = common::served_labels("cnn");
    assert_eq!(delta("fmnist_requests_total{rpc=\"Classify\",code=\"Ok\"}"), 1.0);
    assert_eq!(
        delta("fmnist_requests_total{rpc=\"Classify\",code=\"InvalidArgument\"}"),
        1.0
    );
    assert_eq!(
        delta(&format!(
            "fmnist_images_total{{{cnn},outcome=\"rejected\",reason=\"low_contrast\"}}"
        )),
        1.0
    );
    let accepted = delta(&format!(
        "fmnist_images_total{{{cnn},outcome=\"accepted\",reason=\"accepted\"}}"
    )) + delta(&format!(
        "fmnist_images_total{{{cnn},outcome=\"rejected\",reason=\"low_confidence\"}}"
    )) + delta(&format!(
        "fmnist_images_total{{{cnn},outcome=\"rejected\",reason=\"out_of_distribution\"}}"
    ));
    assert_eq!(accepted, 2.0, "two images reached the model");
    // One call of two images that reach the model: one job, one ONNX Runtime run of 2.
    assert_eq!(delta(&format!("fmnist_batch_size_images_sum{{{cnn}}}")), 2.0);
    assert_eq!(delta(&format!("fmnist_batch_size_images_count{{{cnn}}}")), 1.0);
    assert_eq!(delta(&format!("fmnist_inference_duration_seconds_count{{{cnn}}}")), 1.0);
    assert_eq!(delta(&format!("fmnist_queue_wait_seconds_count{{{cnn}}}")), 1.0);
    assert_eq!(
        delta("fmnist_request_duration_seconds_count{rpc=\"Classify\",code=\"Ok\"}"),
        1.0
    );
    assert!(
        after.contains("fmnist_model_info{model=\"cnn\",version=\""),
        "model info gauge"
    );
    assert!(
        after.contains(&format!("fmnist_queue_depth_images{{{cnn}}}")),
        "queue depth gauge"
    );
    assert!(
        after.contains("fmnist_request_duration_seconds_bucket{rpc=\"Classify\",code=\"Ok\",le=\"0.0001\"}"),
        "sub-ms buckets"
    );

    // Drift signals (docs/drift.md): the two images the model saw add a predicted class and a top
    // probability each; all three 28x28 inputs (the blank one the input check judged too) a brightness.
    let predicted = |text: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(&format!("fmnist_predicted_class_total{{{cnn},")))
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
            .sum()
    };
    let classes = predicted(&after) - predicted(&before);
    assert_eq!(classes, 2.0, "one predicted class per image the model saw");
    assert_eq!(delta(&format!("fmnist_top_probability_count{{{cnn}}}")), 2.0);
    assert_eq!(delta(&format!("fmnist_ood_margin_count{{{cnn}}}")), 2.0);
    assert_eq!(delta(&format!("fmnist_input_brightness_count{{{cnn}}}")), 3.0);
    // The version's reference, from its model.json.
    assert!(
        metric(
            &after,
            &format!("fmnist_drift_reference{{{cnn},signal=\"brightness_mean\"}}")
        ) > 0.2
    );

    // The memory budget, term by term, as the start-up log states it.
    let budget = fmnist_serve::app::budget::MemoryBudget::of(&config());
    for (term, bytes) in budget.terms() {
        assert_eq!(
            metric(&after, &format!("fmnist_memory_budget_bytes{{term=\"{term}\"}}")),
            bytes as f64,
            "{term}"
        );
    }
}
