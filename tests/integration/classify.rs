//! Classify against a real server: accuracy on real test images, PNG/raw equivalence, every reason, invalid
//! requests, batching and backpressure.

use crate::common;

use common::{
    TestServer, classify_all, config, encoded, fixture, full_test_set, metadata_accuracy, metric, png, png_declaring,
    raw, request,
};
use fmnist_serve::{pb, preprocess::PIXELS};
use tonic::Code;

fn accuracy(results: &[pb::Classification], labels: impl Iterator<Item = u32>) -> f64 {
    let correct = results
        .iter()
        .zip(labels)
        .filter(|(r, l)| r.prediction.as_ref().map(|p| p.class_id) == Some(*l))
        .count();
    correct as f64 / results.len() as f64
}

#[tokio::test]
async fn fixture_accuracy_is_within_one_point_of_the_measured_test_accuracy() {
    let mut server = TestServer::start(config()).await;
    let images = fixture();
    assert_eq!(images.len(), 1000);
    for model in ["cnn", "dense"] {
        let results = classify_all(&mut server.client, &images, model).await;
        assert_eq!(results.len(), images.len());
        let served = accuracy(&results, images.iter().map(|(_, l)| *l));
        let measured = metadata_accuracy(model);
        assert!(
            (served - measured).abs() <= 0.01,
            "{model}: served {served:.4} vs measured {measured:.4}"
        );
    }
}

#[tokio::test]
async fn all_10000_test_images_give_exactly_the_accuracy_in_the_metadata_and_clear_the_floors() {
    // `make test` installs the dataset (scripts/setup-system.sh): its absence is a broken setup, not a skip.
    let images = full_test_set()
        .expect("/usr/share/datasets/fashion-mnist is missing: run scripts/setup-system.sh (apt-get install dataset-fashion-mnist)");
    assert_eq!(images.len(), 10_000);
    let mut server = TestServer::start(config()).await;
    let mut served_accuracy = std::collections::HashMap::new();
    let mut served_rule = std::collections::HashMap::new();
    for model in ["cnn", "dense", "cnn-int8"] {
        let results = classify_all(&mut server.client, &images, model).await;
        let served = accuracy(&results, images.iter().map(|(_, l)| *l));
        served_accuracy.insert(model, served);
        let measured = metadata_accuracy(model);
        // Same preprocessing, same graph: the only allowed difference is float summation order between batch
        // sizes flipping a near-tie, which we bound at one image in 10,000.
        assert!(
            (served - measured).abs() <= 1e-4 + 1e-9,
            "{model}: served {served:.4} vs metadata {measured:.4}"
        );
        let accepted = results
            .iter()
            .filter(|r| {
                r.reason != pb::Reason::Undecodable as i32
                    && r.reason != pb::Reason::MostlyDark as i32
                    && r.reason != pb::Reason::MostlyBright as i32
                    && r.reason != pb::Reason::LowContrast as i32
            })
            .count();
        assert!(
            accepted as f64 >= 0.995 * 10_000.0,
            "{model}: input check passes {accepted} of 10,000 test images"
        );
        // The default accept rule as served: the test accuracy and coverage its metadata (and GetModelInfo)
        // report. Python measured them from the graph's logits in f64 without the input check, so allow a
        // few images either way at the threshold, and the few the input check turns away.
        let rule = &common::shipped_metadata(model)["accept"];
        let kept: Vec<_> = results.iter().zip(&images).filter(|(r, _)| r.accepted).collect();
        let right = kept
            .iter()
            .filter(|(r, (_, l))| r.prediction.as_ref().unwrap().class_id == *l)
            .count();
        let (rule_accuracy, coverage) = (right as f64 / kept.len() as f64, kept.len() as f64 / 10_000.0);
        let (want_accuracy, want_coverage) = (
            rule["test_accuracy"].as_f64().unwrap(),
            rule["test_coverage"].as_f64().unwrap(),
        );
        assert!(
            (rule_accuracy - want_accuracy).abs() <= 0.0005 && (coverage - want_coverage).abs() <= 0.005,
            "{model}: accepted answers {rule_accuracy:.4} correct at {coverage:.4} coverage; metadata says \
             {want_accuracy:.4} at {want_coverage:.4}"
        );
        served_rule.insert(model, (rule_accuracy, coverage));
        if model != "dense" {
            no_class_pays_for_the_detector(model, &results, &images);
        }
    }
    // Floors that do not move with the metadata: a worse retrain with honest metadata still fails here.
    let (cnn, dense, int8) = (
        served_accuracy["cnn"],
        served_accuracy["dense"],
        served_accuracy["cnn-int8"],
    );
    assert!(cnn >= 0.940, "cnn serves {cnn:.4}, the floor is 0.9400");
    // Issue #16's floor for the default model's accept rule, whatever the metadata says.
    let (rule_accuracy, coverage) = served_rule["cnn"];
    assert!(
        rule_accuracy >= 0.985 && coverage >= 0.80,
        "cnn's default rule accepts {coverage:.4} of test images, {rule_accuracy:.4} of them correct: the floor \
         is 98.5% correct at 80% coverage"
    );
    assert!(dense >= 0.890, "dense serves {dense:.4}, the floor is 0.8900");
    assert!(
        int8 >= cnn - 0.003,
        "cnn-int8 serves {int8:.4}, more than 0.3 points below cnn ({cnn:.4})"
    );
}

#[tokio::test]
async fn a_test_image_sent_as_png_and_sent_raw_gives_identical_probabilities() {
    let mut server = TestServer::start(config()).await;
    for (pixels, _) in fixture().iter().step_by(37) {
        let req = request(vec![raw(pixels), encoded(png(pixels, 28, 28))]);
        let results = server.client.classify(req).await.unwrap().into_inner().results;
        let (a, b) = (
            results[0].prediction.as_ref().unwrap(),
            results[1].prediction.as_ref().unwrap(),
        );
        assert_eq!(a.probabilities, b.probabilities);
        assert_eq!(results[0].reason, results[1].reason);
    }
}

#[tokio::test]
async fn a_garment_photographed_on_white_is_inverted_and_classified_like_the_original() {
    let mut server = TestServer::start(config()).await;
    let (pixels, label) = fixture().into_iter().find(|(_, l)| *l == 9).unwrap(); // an ankle boot
    let inverted: Vec<u8> = pixels.iter().map(|p| 255 - p).collect();
    // Upscaled 4x with nearest neighbour, as a larger photo would be.
    let big: Vec<u8> = (0..112 * 112)
        .map(|i| inverted[(i / 112 / 4) * 28 + (i % 112) / 4])
        .collect();
    let results = server
        .client
        .classify(request(vec![encoded(png(&big, 112, 112))]))
        .await
        .unwrap()
        .into_inner()
        .results;
    let p = results[0].prediction.as_ref().expect("classified");
    assert_eq!(p.class_id, label, "{:?}", results[0]);
}

fn reason(r: &pb::Classification) -> pb::Reason {
    pb::Reason::try_from(r.reason).unwrap()
}

#[tokio::test]
async fn every_input_problem_is_that_images_result_with_its_own_reason() {
    let mut server = TestServer::start(config()).await;
    let (good, label) = fixture()[0];
    let mut almost_black = [0u8; PIXELS];
    almost_black[..20].fill(255); // 97% black, but enough contrast to pass the contrast check
    let mut almost_white = [255u8; PIXELS];
    almost_white[..20].fill(0);
    let bomb = png_declaring(50_000, 50_000);
    let cases: Vec<(pb::Image, pb::Reason)> = vec![
        (raw(&good), pb::Reason::Accepted),
        (raw(&almost_black), pb::Reason::MostlyDark),
        (raw(&almost_white), pb::Reason::MostlyBright),
        (raw(&[128u8; PIXELS]), pb::Reason::LowContrast),
        (encoded(png(&[0u8; PIXELS], 28, 28)), pb::Reason::LowContrast),
        (encoded(b"definitely not an image".to_vec()), pb::Reason::Undecodable),
        (encoded(Vec::new()), pb::Reason::Undecodable),
        (encoded(png(&good, 28, 28)[..60].to_vec()), pb::Reason::Undecodable),
        (pb::Image { data: None }, pb::Reason::Undecodable),
        (raw(&good[..100]), pb::Reason::WrongSize),
        (encoded(bomb), pb::Reason::TooLarge),
    ];
    let (images, expected): (Vec<_>, Vec<_>) = cases.into_iter().unzip();
    let results = server
        .client
        .classify(request(images))
        .await
        .expect("one call, per-image results")
        .into_inner()
        .results;
    assert_eq!(results.len(), expected.len());
    for (i, (r, want)) in results.iter().zip(&expected).enumerate() {
        assert_eq!(reason(r), *want, "image {i}: {r:?}");
        assert_eq!(r.accepted, *want == pb::Reason::Accepted, "image {i}");
        assert!(!r.detail.is_empty(), "image {i} has a detail");
    }
    assert_eq!(results[0].prediction.as_ref().unwrap().class_id, label);
    assert!(
        results[1..].iter().all(|r| r.prediction.is_none()),
        "rejected inputs never reach the model"
    );
}

#[tokio::test]
async fn below_the_confidence_threshold_the_prediction_is_kept_but_rejected() {
    let mut server = TestServer::start(config()).await;
    let images = fixture();
    let results = classify_all(&mut server.client, &images, "cnn").await;
    // The least confident fixture image, and a threshold just above its probability.
    let (i, p) = results
        .iter()
        .enumerate()
        .map(|(i, r)| (i, r.prediction.as_ref().unwrap().probability))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    assert!(p < 0.95);
    let mut req = request(vec![raw(&images[i].0)]);
    req.min_confidence = Some(p + 0.01);
    req.max_ood_score = Some(f32::MAX); // unsure images often look unusual too; isolate the confidence check
    let r = &server.client.classify(req).await.unwrap().into_inner().results[0];
    assert_eq!(reason(r), pb::Reason::LowConfidence);
    assert!(!r.accepted);
    assert_eq!(
        r.prediction.as_ref().unwrap().probability,
        p,
        "class and probability are still reported"
    );
    assert!(r.detail.contains("below the minimum confidence"), "{}", r.detail);

    let mut req = request(vec![raw(&images[i].0)]);
    req.min_confidence = Some(0.0);
    req.max_ood_score = Some(f32::MAX);
    assert!(server.client.classify(req).await.unwrap().into_inner().results[0].accepted || p.is_nan());
}

#[tokio::test]
async fn the_server_wide_confidence_threshold_applies_when_the_request_has_none() {
    let mut config = config();
    config.min_confidence = Some(1.0);
    let mut server = TestServer::start(config).await;
    let (pixels, _) = fixture()[5];
    let r = &server
        .client
        .classify(request(vec![raw(&pixels)]))
        .await
        .unwrap()
        .into_inner()
        .results[0];
    // A float32 softmax reaches exactly 1.0 only for extreme logits; the fixture image is not one.
    assert_eq!(reason(r), pb::Reason::LowConfidence, "{r:?}");
}

#[tokio::test]
async fn malformed_requests_are_invalid_argument_with_a_message_that_says_what_to_fix() {
    let mut server = TestServer::start(config()).await;
    let (good, _) = fixture()[0];
    let cases = vec![
        (request(vec![]), "no images"),
        (request(vec![raw(&good); 65]), "at most 64"),
        (
            pb::ClassifyRequest {
                model: "resnet".into(),
                ..request(vec![raw(&good)])
            },
            "unknown model \"resnet\"",
        ),
        (
            pb::ClassifyRequest {
                min_confidence: Some(1.5),
                ..request(vec![raw(&good)])
            },
            "min_confidence must be between",
        ),
    ];
    for (req, message) in cases {
        let status = server.client.classify(req).await.expect_err("call fails");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains(message),
            "{:?} lacks {message:?}",
            status.message()
        );
    }
}

#[tokio::test]
async fn the_dense_model_is_selected_by_name_and_the_cnn_is_the_default() {
    let mut server = TestServer::start(config()).await;
    let (pixels, _) = fixture()[0];
    let default = server
        .client
        .classify(request(vec![raw(&pixels)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(default.model, "cnn");
    let dense = server
        .client
        .classify(pb::ClassifyRequest {
            model: "dense".into(),
            ..request(vec![raw(&pixels)])
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dense.model, "dense");
    assert_ne!(
        default.results[0].prediction.as_ref().unwrap().probabilities,
        dense.results[0].prediction.as_ref().unwrap().probabilities
    );
}

#[tokio::test]
async fn model_info_lists_models_classes_and_thresholds() {
    let mut server = TestServer::start(config()).await;
    let info = server
        .client
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = info.models.iter().map(|m| m.name.as_str()).collect();
    assert!(names.contains(&"cnn") && names.contains(&"dense"), "{names:?}");
    let cnn = info.models.iter().find(|m| m.name == "cnn").unwrap();
    assert!(cnn.is_default);
    assert_eq!(cnn.classes.len(), 10);
    assert_eq!(cnn.classes[9].name, "Ankle boot");
    assert!(cnn.classes.iter().all(|c| !c.description.is_empty()));
    assert_eq!(cnn.input.as_ref().unwrap().shape, [-1, 1, 28, 28]);
    assert!((f64::from(cnn.test_accuracy) - metadata_accuracy("cnn")).abs() < 1e-6);
    let t = info.thresholds.unwrap();
    assert_eq!(t.min_confidence, cnn.min_confidence, "the default model's accept rule");
    let limits = info.limits.unwrap();
    assert_eq!(limits.max_images_per_request, 64);
    // Issue #40: clients size their calls by the message limit too.
    assert_eq!(limits.max_message_bytes, 16 << 20, "--max-message-bytes");
}

/// `--default-model auto` (the shipped default): cnn-int8 on a CPU with 8-bit dot products, cnn elsewhere, and
/// GetModelInfo says which and why.
#[tokio::test]
async fn the_auto_default_model_follows_the_cpu_and_says_why() {
    let mut config = config();
    config.default_model = "auto".into();
    let mut server = TestServer::start(config).await;
    let info = server
        .client
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let defaults: Vec<_> = info.models.iter().filter(|m| m.is_default).collect();
    assert_eq!(defaults.len(), 1, "{:?}", info.models);
    let isa = fmnist_serve::config::int8_dot_product();
    let want = if isa.is_some() { "cnn-int8" } else { "cnn" };
    assert_eq!(defaults[0].name, want);
    assert!(
        defaults[0].default_reason.starts_with("auto: "),
        "{}",
        defaults[0].default_reason
    );
    if let Some(isa) = isa {
        assert!(
            defaults[0].default_reason.contains(isa),
            "{}",
            defaults[0].default_reason
        );
    }
    assert!(
        info.models
            .iter()
            .filter(|m| !m.is_default)
            .all(|m| m.default_reason.is_empty())
    );
    let answer = server
        .client
        .classify(request(vec![raw(&fixture()[0].0)]))
        .await
        .unwrap();
    assert_eq!(answer.into_inner().model, want);
}

#[tokio::test]
async fn concurrent_calls_are_merged_into_batches_larger_than_one() {
    let server = TestServer::start(config()).await;
    let images = fixture();
    let before = histogram_count_le1(&server.metrics().await);
    let calls = images.iter().take(128).map(|(p, _)| {
        let mut client = server.client.clone();
        let req = request(vec![raw(p)]);
        tokio::spawn(async move { client.classify(req).await.map(|r| r.into_inner()) })
    });
    for call in futures_join(calls).await {
        assert_eq!(call.unwrap().results.len(), 1);
    }
    let after = histogram_count_le1(&server.metrics().await);
    let (batches, single) = (after.1 - before.1, after.0 - before.0);
    assert!(
        batches < 128.0 && single < batches,
        "128 calls ran in {batches} batches, {single} of them of one image"
    );
}

async fn futures_join<T>(handles: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles.collect::<Vec<_>>() {
        out.push(h.await.unwrap());
    }
    out
}

/// (batches of size 1, all batches) for the cnn, from the batch-size histogram.
fn histogram_count_le1(metrics: &str) -> (f64, f64) {
    let version = common::served_version("cnn");
    (
        metric(
            metrics,
            &format!("fmnist_batch_size_images_bucket{{model=\"cnn\",version=\"{version}\",le=\"1\"}}"),
        ),
        metric(metrics, &common::served_series("fmnist_batch_size_images_count", "cnn")),
    )
}

#[tokio::test]
async fn with_no_queue_wait_a_full_queue_fails_fast_with_resource_exhausted_and_accepted_calls_complete() {
    let mut config = config();
    config.max_queued_images = 64; // one full request fills the queue
    config.max_queue_wait_ms = 0; // refused at once; waiting has its own tests (reliability.rs)
    config.max_batch_size = 8;
    let server = TestServer::start(config).await;
    let (pixels, _) = fixture()[0];
    let calls = (0..24).map(|_| {
        let mut client = server.client.clone();
        let req = request(vec![raw(&pixels); 64]);
        tokio::spawn(async move { client.classify(req).await })
    });
    let (mut ok, mut exhausted) = (0, 0);
    for result in futures_join(calls).await {
        match result {
            Ok(r) => {
                assert_eq!(r.into_inner().results.len(), 64);
                ok += 1;
            }
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert!(s.message().contains("retry"), "{}", s.message());
                exhausted += 1;
            }
        }
    }
    assert!(ok >= 1 && exhausted >= 1, "{ok} succeeded, {exhausted} refused");
}

/// Issue #36's floors for the garment head, on the 10,000 test garments as served: at most 1.0% of them
/// rejected as out of distribution, and at most 2% of any one class. Version 3 rejected 3.6% of the bags (cnn):
/// the threshold per predicted class of version 4 (training/ood_head_protocol.md, amendment 10) is what brings
/// Bag under 2%.
fn no_class_pays_for_the_detector(model: &str, results: &[pb::Classification], images: &[([u8; PIXELS], u32)]) {
    let ood = |r: &&pb::Classification| r.reason == pb::Reason::OutOfDistribution as i32;
    let overall = results.iter().filter(ood).count() as f64 / results.len() as f64;
    assert!(
        overall <= 0.010,
        "{model}: {:.2}% of the test garments rejected as out of distribution",
        overall * 100.0
    );
    for class in 0..10 {
        let of_class: Vec<_> = results.iter().zip(images).filter(|(_, (_, l))| *l == class).collect();
        let rejected = of_class.iter().filter(|(r, _)| ood(r)).count();
        let share = rejected as f64 / of_class.len() as f64;
        assert!(
            share <= 0.02,
            "{model}: {rejected} of {} test garments of class {class} rejected as out of distribution ({:.1}%)",
            of_class.len(),
            share * 100.0
        );
    }
}
