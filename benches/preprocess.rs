//! Micro-benchmarks of the per-image and per-call work the server does before and around inference:
//! preprocessing (raw pixels, a 28x28 PNG, a ~1000x1000 product photo as PNG and JPEG) and request validation
//! (calls the service rejects, or whose images never reach the model) and the out-of-distribution score every
//! image gets, through the crate's own functions.
//!
//!     cargo bench --bench preprocess               (make bench runs it with shorter timings)

use std::{hint::black_box, io::Cursor, path::PathBuf};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use fmnist_serve::{
    api::fashion_mnist::FashionMnistService,
    classify::Pipeline,
    config::Config,
    model::calibrated_softmax,
    ood::{Detector, energy},
    pb::{self, classifier_server::Classifier as _},
    preprocess::{ImageData, PIXELS, preprocess},
    server,
};
use image::{GrayImage, ImageFormat, Rgb, RgbImage};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The first image of the committed test-set fixture.
fn dataset_image() -> [u8; PIXELS] {
    let bytes = std::fs::read(repo().join("tests/fixtures/test-images.u8")).expect("tests/fixtures/test-images.u8");
    bytes[..PIXELS].try_into().expect("the fixture holds whole images")
}

fn encode(image: impl Into<image::DynamicImage>, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image
        .into()
        .write_to(&mut out, format)
        .expect("in-memory encoding succeeds");
    out.into_inner()
}

/// A synthetic 1000x960 product photo: a dark, textured garment on an off-white, slightly noisy background,
/// so the codecs see something like a real photo (not a flat image that compresses to nothing).
fn product_photo() -> RgbImage {
    let (w, h) = (1000u32, 960u32);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 17) as i32 - 8
    };
    RgbImage::from_fn(w, h, |x, y| {
        let (cx, cy) = (x as i32 - 500, y as i32 - 480);
        let body = cx.abs() < 260 && cy.abs() < 380;
        let sleeves = cy > -380 && cy < -120 && cx.abs() < 440;
        let base: i32 = if body || sleeves {
            60 + ((x / 7 + y / 5) % 9) as i32 * 4
        } else {
            238
        };
        let v = (base + noise()).clamp(0, 255) as u8;
        Rgb([v, v.saturating_sub(6), v.saturating_add(4)])
    })
}

fn preprocessing(c: &mut Criterion) {
    let config = Config::defaults();
    let settings = config.preprocess_settings();
    let raw = dataset_image();
    let png_28 = encode(
        GrayImage::from_raw(28, 28, raw.to_vec()).expect("784 pixels"),
        ImageFormat::Png,
    );
    let photo = product_photo();
    let png_photo = encode(photo.clone(), ImageFormat::Png);
    let jpeg_photo = encode(photo, ImageFormat::Jpeg);

    let mut group = c.benchmark_group("preprocess");
    group.bench_function("raw_28x28", |b| {
        b.iter(|| preprocess(ImageData::Raw(black_box(&raw)), &settings))
    });
    group.bench_function("png_28x28", |b| {
        b.iter(|| preprocess(ImageData::Encoded(black_box(&png_28)), &settings))
    });
    group.bench_function(format!("png_1000x960_photo_{}kB", png_photo.len() / 1000), |b| {
        b.iter(|| preprocess(ImageData::Encoded(black_box(&png_photo)), &settings))
    });
    group.bench_function(format!("jpeg_1000x960_photo_{}kB", jpeg_photo.len() / 1000), |b| {
        b.iter(|| preprocess(ImageData::Encoded(black_box(&jpeg_photo)), &settings))
    });
    group.finish();
}

/// The OOD score and the calibrated softmax computed for every image from the outputs the model already
/// returned (no second model call): their whole cost per image, to set against the service's time per image at
/// the benchmark's load. Each shipped model's own detector (models/<name>/1/ood.json; the graph's part of it is
/// in the ONNX Runtime run, measured by training/ood_protocol.py's timing note in README.md).
fn ood(c: &mut Criterion) {
    let logits = [7.9f32, -1.2, 0.4, 2.2, -3.0, 0.1, 4.5, -2.2, 1.0, -0.7];
    c.bench_function("ood_score_energy", |b| b.iter(|| energy(black_box(&logits))));
    for model in ["cnn", "dense"] {
        let text = std::fs::read_to_string(repo().join(format!("models/{model}/1/ood.json"))).unwrap();
        let detector = Detector::from_json(&text).unwrap();
        // dense's feature-space components come computed from the graph; what is left here is the fusion.
        let components = vec![0.5f32; detector.graph_output().map_or(0, |(_, n)| n)];
        c.bench_function(&format!("ood_score_{model}_{}", detector.method()), |b| {
            b.iter(|| detector.score(black_box(&logits), black_box(&components)))
        });
    }
    let mut probabilities = [0.0f32; 10];
    c.bench_function("calibrated_softmax", |b| {
        b.iter(|| calibrated_softmax(black_box(&logits), black_box(1.17), &mut probabilities))
    });
}

/// Request validation through the real tonic service adapter (no network): calls refused as a whole, and a call whose
/// images are all rejected by the input check (so it is answered without inference). Needs the models and ONNX
/// Runtime (`make ort`), since the service only answers once its models are loaded.
fn validation(c: &mut Criterion) {
    let mut config = Config::defaults();
    config.models_dir = repo().join("models");
    config.models = vec!["cnn".into()];
    if !config.ort_dylib.is_absolute() {
        config.ort_dylib = repo().join(&config.ort_dylib);
    }
    let models = match server::load_models(&config) {
        Ok(models) => models,
        Err(e) => {
            eprintln!("skipping the validation benchmarks: {e}");
            return;
        }
    };
    let service = FashionMnistService::new(Pipeline::new(models, config.policy(), None), config.max_message_bytes);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");

    let raw = |pixels: Vec<u8>| pb::Image {
        data: Some(pb::image::Data::Raw(pixels)),
    };
    let image = dataset_image().to_vec();
    let too_many = pb::ClassifyRequest {
        images: vec![raw(image.clone()); config.max_images_per_request + 1],
        ..Default::default()
    };
    let unknown_model = pb::ClassifyRequest {
        images: vec![raw(image.clone())],
        model: "no-such-model".into(),
        ..Default::default()
    };
    let bad_threshold = pb::ClassifyRequest {
        images: vec![raw(image)],
        min_confidence: Some(1.5),
        ..Default::default()
    };
    // 16 images the input check rejects: wrong size, all black, all white, uniform grey.
    let rejected_16 = pb::ClassifyRequest {
        images: (0..16)
            .map(|i| match i % 4 {
                0 => raw(vec![0; 100]),
                1 => raw(vec![0; PIXELS]),
                2 => raw(vec![255; PIXELS]),
                _ => raw(vec![128; PIXELS]),
            })
            .collect(),
        ..Default::default()
    };

    let mut group = c.benchmark_group("validate");
    for (name, request, ok) in [
        ("too_many_images", too_many, false),
        ("unknown_model", unknown_model, false),
        ("min_confidence_out_of_range", bad_threshold, false),
        ("16_images_rejected_by_input_check", rejected_16, true),
    ] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || tonic::Request::new(request.clone()),
                |r| {
                    let result = runtime.block_on(service.classify(r));
                    assert_eq!(result.is_ok(), ok, "{name}: {result:?}");
                    result
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, preprocessing, ood, validation);
criterion_main!(benches);
