//! Batching correctness: however calls are merged into ONNX Runtime batches, and however a call that did not
//! fit is carried into the next batch, every image gets its own answer back: the one it gets alone.
//! It reads the process-wide carried-calls counter, which is why tests run one at a time (see main.rs).

use crate::common;

use std::collections::HashMap;

use common::{TestServer, config, fixture, metric, raw, request};
use fmnist_serve::pb::{self, classifier_client::ClassifierClient};
use tonic::transport::Channel;

/// Every model the server loads when nothing is configured.
const DEFAULT_MODELS: [&str; 3] = ["cnn", "cnn-int8", "dense"];
/// Call sizes: with batches of 64, two calls of 33 never share a batch, so the second one is carried over.
const CALL_SIZES: [usize; 4] = [1, 7, 33, 64];
const CALLERS: usize = 128;
const CALLS_PER_CALLER: usize = 3;

/// A small deterministic generator: the shuffles are the same on every run, so a failure reproduces.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// (class id, probabilities) of one image.
type Answer = (u32, Vec<f32>);

fn answer(result: &pb::Classification) -> Answer {
    let p = result.prediction.as_ref().expect("every fixture image is classified");
    (p.class_id, p.probabilities.clone())
}

/// Each image's answer when it is the only image of its call and of its batch.
async fn lone_answers(client: &mut ClassifierClient<Channel>, model: &str, count: usize) -> Vec<Answer> {
    let mut answers = Vec::with_capacity(count);
    for (pixels, _) in fixture().iter().take(count) {
        let mut req = request(vec![raw(pixels)]);
        req.model = model.into();
        let response = client.classify(req).await.expect("lone call").into_inner();
        answers.push(answer(&response.results[0]));
    }
    answers
}

/// With the defaults, a lone caller's calls run on the thread that read them (`--inline-max-images`), and
/// under load they are batched on the inference thread: the answers are the same either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_image_gets_its_own_answer_however_calls_are_batched_and_carried_over() {
    every_image_gets_its_own_answer(1, 0, 16).await;
}

/// The same with two instances of each model taking batches from one queue side by side (`--instances 2`),
/// and every call queued, a lone one too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_instances_every_image_still_gets_its_own_answer() {
    every_image_gets_its_own_answer(2, 0, 0).await;
}

/// The same with a solo session beside the two instances (`--solo-threads 2`): a lone caller's every batch
/// runs on the solo session, queued, and its answers are the ones the instances give under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_solo_session_lone_calls_run_on_it_and_every_image_still_gets_its_own_answer() {
    every_image_gets_its_own_answer(2, 2, 0).await;
}

async fn every_image_gets_its_own_answer(instances: usize, solo_threads: usize, inline_max_images: usize) {
    let mut config = config();
    config.instances = instances;
    config.solo_threads = solo_threads;
    config.inline_max_images = inline_max_images;
    assert_eq!(
        config.models, DEFAULT_MODELS,
        "the test covers every model loaded by default"
    );
    // Room for every caller at once, on one connection: what is tested is the split, not the refusals.
    config.max_queued_images = CALLERS * 64;
    config.max_queued_images_per_connection = CALLERS * 64;
    config.max_calls_per_connection = CALLERS;
    config.max_concurrent_streams = CALLERS as u32;
    assert_eq!(config.max_batch_size, 64);
    let mut server = TestServer::start(config).await;
    let images = fixture();
    let count = 256; // distinct images per model: enough that a misrouted answer is a different image

    // A counter of `model`'s served version, in the scrape `m`.
    let served = |m: &str, counter: &str, model: &str| metric(m, &common::served_series(counter, model));
    let mut lone: HashMap<&str, Vec<Answer>> = HashMap::new();
    for model in DEFAULT_MODELS {
        let before = server.metrics().await;
        lone.insert(model, lone_answers(&mut server.client, model, count).await);
        let after = server.metrics().await;
        let ran = |counter| served(&after, counter, model) - served(&before, counter, model);
        // One call at a time: every batch finds the other instance idle and nothing queued behind it.
        let expected = if solo_threads > 0 { count as f64 } else { 0.0 };
        assert_eq!(
            ran("fmnist_solo_batches_total"),
            expected,
            "{model}: lone calls run on the solo session exactly when there is one"
        );
        let expected = if inline_max_images > 0 { count as f64 } else { 0.0 };
        assert_eq!(
            ran("fmnist_inline_batches_total"),
            expected,
            "{model}: lone calls run on their own thread exactly when --inline-max-images lets them"
        );
    }
    let carried_before: Vec<f64> = {
        let m = server.metrics().await;
        DEFAULT_MODELS
            .iter()
            .map(|model| served(&m, "fmnist_batch_carried_calls_total", model))
            .collect()
    };

    let callers: Vec<_> = (0..CALLERS)
        .map(|caller| {
            let mut client = server.client.clone();
            let images = images.clone();
            tokio::spawn(async move {
                let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ (caller as u64 + 1));
                let model = DEFAULT_MODELS[caller % DEFAULT_MODELS.len()];
                let mut answered = Vec::new();
                for call in 0..CALLS_PER_CALLER {
                    let size = CALL_SIZES[(caller + call) % CALL_SIZES.len()];
                    let picked: Vec<usize> = (0..size).map(|_| rng.pick(count)).collect();
                    let mut req = request(picked.iter().map(|&i| raw(&images[i].0)).collect());
                    req.model = model.into();
                    let response = client.classify(req).await.expect("served").into_inner();
                    assert_eq!(response.model, model);
                    assert_eq!(response.results.len(), size);
                    for (i, result) in picked.iter().zip(&response.results) {
                        answered.push((model, *i, answer(result)));
                    }
                }
                answered
            })
        })
        .collect();

    let mut checked = 0;
    for caller in callers {
        for (model, image, (class_id, probabilities)) in caller.await.unwrap() {
            let (lone_class, lone_probabilities) = &lone[model][image];
            assert_eq!(
                class_id, *lone_class,
                "{model}: image {image} got another image's class"
            );
            for (k, (p, q)) in probabilities.iter().zip(lone_probabilities).enumerate() {
                assert!(
                    (p - q).abs() <= 1e-5,
                    "{model}: image {image}, class {k}: {p} in a batch, {q} alone"
                );
            }
            checked += 1;
        }
    }
    let expected: usize = (0..CALLERS)
        .map(|c| {
            (0..CALLS_PER_CALLER)
                .map(|k| CALL_SIZES[(c + k) % CALL_SIZES.len()])
                .sum::<usize>()
        })
        .sum();
    assert_eq!(checked, expected);

    let m = server.metrics().await;
    for (model, before) in DEFAULT_MODELS.iter().zip(carried_before) {
        let carried = served(&m, "fmnist_batch_carried_calls_total", model) - before;
        assert!(carried >= 1.0, "{model}: no call was carried over to the next batch");
    }
}
