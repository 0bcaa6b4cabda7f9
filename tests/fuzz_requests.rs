//! Request validation, fuzz-style, against a real server: arbitrary requests (any number of images, arbitrary
//! bytes as raw or encoded images, images without data, any model name, any thresholds including NaN and
//! infinities) get one result per image or INVALID_ARGUMENT, never another status, and the server keeps serving.
//! 300 requests in `make test`; PROPTEST_CASES sets the size of a long campaign.

mod common;

use common::{TestServer, config, fixture, raw, request};
use fmnist_serve::pb::{self, image::Data};
use proptest::{
    collection::vec,
    option,
    prelude::*,
    test_runner::{Config as RunnerConfig, TestRunner},
};
use tonic::Code;

fn image() -> impl Strategy<Value = pb::Image> {
    let data = prop_oneof![
        vec(any::<u8>(), 0..1200).prop_map(Data::Raw),
        vec(any::<u8>(), 784..=784).prop_map(Data::Raw),
        vec(any::<u8>(), 0..1200).prop_map(Data::Encoded),
    ];
    option::weighted(0.95, data).prop_map(|data| pb::Image { data })
}

fn arbitrary_request() -> impl Strategy<Value = pb::ClassifyRequest> {
    (
        vec(image(), 0..70),
        prop_oneof![
            Just(String::new()),
            Just("cnn".to_string()),
            Just("dense".to_string()),
            ".{0,12}"
        ],
        option::of(any::<f32>()),
        option::of(any::<f32>()),
        any::<bool>(),
    )
        .prop_map(
            |(images, model, min_confidence, max_ood_score, return_model_input)| pb::ClassifyRequest {
                images,
                model,
                min_confidence,
                max_ood_score,
                return_model_input,
            },
        )
}

#[test]
fn arbitrary_requests_get_a_result_per_image_or_invalid_argument_and_the_server_keeps_serving() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(TestServer::start(config()));
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut runner = TestRunner::new(RunnerConfig {
        cases,
        ..RunnerConfig::default()
    });
    runner
        .run(&arbitrary_request(), |req| {
            let mut client = server.client.clone();
            let sent = req.images.len();
            match runtime.block_on(client.classify(req)) {
                Ok(response) => {
                    let results = response.into_inner().results;
                    prop_assert_eq!(results.len(), sent);
                    for r in results {
                        prop_assert!(r.reason != pb::Reason::Unspecified as i32, "{r:?}");
                        prop_assert_eq!(r.accepted, r.reason == pb::Reason::Accepted as i32);
                        if let Some(p) = r.prediction {
                            prop_assert!(p.class_id < 10 && (0.0..=1.0).contains(&p.probability), "{p:?}");
                            prop_assert!(p.ood_score.is_finite(), "{p:?}");
                        }
                    }
                }
                Err(status) => prop_assert_eq!(status.code(), Code::InvalidArgument, "{:?}", status),
            }
            Ok(())
        })
        .unwrap();

    let (pixels, label) = fixture()[0];
    let mut client = server.client.clone();
    let after = runtime
        .block_on(client.classify(request(vec![raw(&pixels)])))
        .expect("still serving")
        .into_inner();
    assert_eq!(after.results[0].prediction.as_ref().unwrap().class_id, label);
}
