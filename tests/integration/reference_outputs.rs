//! The service reproduces, image by image, what the model file alone gives: reference probabilities computed
//! by the export step with Python onnxruntime (training/reference.py), one image per run, for the 1,000
//! committed fixture images and every shipped model, calibrated by the temperature in the model's metadata (the
//! only thing here taken from it). So a preprocessing or batching change that shifts answers fails even when
//! accuracy stays the same.

use crate::common;

use common::{TestServer, classify_all, config, fixture, repo};
use sha2::{Digest, Sha256};

/// Batch size changes ONNX Runtime's summation order; anything beyond float noise is a real difference.
const TOLERANCE: f32 = 1e-5;

fn reference(model: &str) -> Vec<[f32; 10]> {
    let dir = repo().join("tests/fixtures/reference");
    let header: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{model}.json"))).unwrap()).unwrap();
    let meta = common::shipped_metadata(model);
    let onnx = std::fs::read(
        repo()
            .join(format!("models/{model}/1"))
            .join(meta["file"].as_str().unwrap()),
    )
    .unwrap();
    assert_eq!(
        header["onnx_sha256"].as_str().unwrap(),
        format!("{:x}", Sha256::digest(&onnx)),
        "{model}: the references are for another ONNX file; rerun training/reference.py"
    );
    std::fs::read(dir.join(format!("{model}.probabilities.f32")))
        .unwrap()
        .chunks_exact(40)
        .map(|row| std::array::from_fn(|i| f32::from_le_bytes(row[4 * i..4 * i + 4].try_into().unwrap())))
        .map(|p| common::calibrated(model, p))
        .collect()
}

#[tokio::test]
async fn every_shipped_model_reproduces_its_reference_probabilities_per_image() {
    let images = fixture();
    let mut server = TestServer::start(config()).await;
    for model in ["cnn", "cnn-int8", "dense"] {
        let want = reference(model);
        assert_eq!(want.len(), images.len());
        let results = classify_all(&mut server.client, &images, model).await;
        let mut worst = 0f32;
        for (i, (r, want)) in results.iter().zip(&want).enumerate() {
            let got = &r
                .prediction
                .as_ref()
                .expect("every fixture image is classified")
                .probabilities;
            for (g, w) in got.iter().zip(want) {
                worst = worst.max((g - w).abs());
            }
            assert!(
                worst <= TOLERANCE,
                "{model}: image {i}: served {got:?}, reference {want:?} (largest difference so far {worst:e})"
            );
        }
        eprintln!("{model}: 1,000 images within {worst:e} of the reference");
    }
}
