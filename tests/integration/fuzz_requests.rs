//! Request validation, fuzz-style, against a real server: arbitrary requests (any number of images, arbitrary
//! bytes as raw or encoded images, images without data, any model name, any thresholds including NaN and
//! infinities) get exactly the answer the README's rules give them, worked out here independently of the
//! server: INVALID_ARGUMENT for a bad request, else one result per image with the reason its data calls for.
//! The server keeps serving. 300 requests in `make test`; PROPTEST_CASES sets the size of a long campaign.

use crate::common;

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

/// Any threshold a client could send. proptest's `any::<f32>()` never yields NaN or an infinity, so they are
/// named here, with the valid range, so that a request whose only fault is its threshold comes up often.
fn threshold() -> impl Strategy<Value = f32> {
    prop_oneof![
        any::<f32>(),
        0.0f32..=1.0,
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(f32::NEG_INFINITY),
    ]
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
        option::of(threshold()),
        option::of(threshold()),
        any::<bool>(),
        // The shipped models serve their newest version (cnn and cnn-int8: 2, dense: 1) and have no labels.
        prop_oneof![
            Just(String::new()),
            Just("1".to_string()),
            Just("2".to_string()),
            ".{0,4}"
        ],
    )
        .prop_map(
            |(images, model, min_confidence, max_ood_score, return_model_input, version)| pb::ClassifyRequest {
                images,
                model,
                min_confidence,
                max_ood_score,
                return_model_input,
                version,
            },
        )
}

/// What the README's rules say a request gets, without asking the server.
fn request_is_valid(req: &pb::ClassifyRequest) -> bool {
    let known_model = ["", "cnn", "cnn-int8", "dense"].contains(&req.model.as_str());
    let served = match req.model.as_str() {
        "" => common::served_version("cnn"), // the tests' default model
        model if known_model => common::served_version(model),
        _ => String::new(),
    };
    let known_version = req.version.is_empty() || req.version == served;
    let confidence_ok = req.min_confidence.is_none_or(|c| (0.0..=1.0).contains(&c));
    let ood_ok = req.max_ood_score.is_none_or(f32::is_finite);
    (1..=64).contains(&req.images.len()) && known_model && known_version && confidence_ok && ood_ok
}

/// The reason an image's data alone decides, if it does: no data or no bytes cannot be decoded, raw data of
/// the wrong length is the wrong size. `None`: it depends on the pixels or the model.
fn decided_reason(image: &pb::Image) -> Option<pb::Reason> {
    match &image.data {
        None => Some(pb::Reason::Undecodable),
        Some(Data::Encoded(bytes)) if bytes.is_empty() => Some(pb::Reason::Undecodable),
        Some(Data::Raw(bytes)) if bytes.len() != 784 => Some(pb::Reason::WrongSize),
        _ => None,
    }
}

#[test]
fn arbitrary_requests_get_exactly_the_answer_the_rules_give_and_the_server_keeps_serving() {
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
            let valid = request_is_valid(&req);
            let decided: Vec<_> = req.images.iter().map(decided_reason).collect();
            let raw_784: Vec<_> = req
                .images
                .iter()
                .map(|i| matches!(&i.data, Some(Data::Raw(b)) if b.len() == 784))
                .collect();
            match runtime.block_on(client.classify(req)) {
                Ok(response) => {
                    prop_assert!(valid, "an invalid request was served");
                    let results = response.into_inner().results;
                    prop_assert_eq!(results.len(), decided.len());
                    for ((r, decided), raw_784) in results.into_iter().zip(decided).zip(raw_784) {
                        prop_assert!(r.reason != pb::Reason::Unspecified as i32, "{r:?}");
                        if let Some(reason) = decided {
                            prop_assert_eq!(r.reason, reason as i32, "{:?}", r);
                        }
                        if raw_784 {
                            // 784 raw bytes always reach the input check: never a decoding reason.
                            prop_assert!(
                                ![pb::Reason::Undecodable, pb::Reason::WrongSize, pb::Reason::TooLarge]
                                    .map(|x| x as i32)
                                    .contains(&r.reason),
                                "{:?}",
                                r
                            );
                        }
                        prop_assert_eq!(r.accepted, r.reason == pb::Reason::Accepted as i32);
                        if let Some(p) = r.prediction {
                            prop_assert!(p.class_id < 10 && (0.0..=1.0).contains(&p.probability), "{p:?}");
                            prop_assert!(p.ood_score.is_finite(), "{p:?}");
                        }
                    }
                }
                Err(status) => {
                    prop_assert!(!valid, "a valid request was refused: {:?}", status);
                    prop_assert_eq!(status.code(), Code::InvalidArgument, "{:?}", status);
                }
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
