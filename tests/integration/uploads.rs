//! Uploads as a shop sends them (issue #39): a garment photographed dark on a light background, with a margin,
//! is converted as Fashion-MNIST itself was made, and answered as the garment itself is.

use crate::common;

use common::{TestServer, config, encoded, fixture, png, raw, request};
use fmnist_serve::{pb, preprocess::PIXELS};

/// A photo of a dataset garment: scaled up `scale` times (nearest neighbour), dark on a `background` level, at
/// (`left`, `top`) of a `side`x`side` frame. A dataset pixel of 255 was the darkest part of the original photo:
/// it takes all the light falling on it.
fn photo(garment: &[u8; PIXELS], scale: usize, background: u8, side: usize, (left, top): (usize, usize)) -> Vec<u8> {
    let pixels: Vec<u8> = (0..side * side)
        .map(|i| {
            let (x, y) = (i % side, i / side);
            let inside = (left..left + 28 * scale).contains(&x) && (top..top + 28 * scale).contains(&y);
            let v = if inside {
                garment[((y - top) / scale) * 28 + (x - left) / scale]
            } else {
                0
            };
            (f32::from(background) * (1.0 - f32::from(v) / 255.0)).round() as u8
        })
        .collect();
    png(&pixels, side as u32, side as u32)
}

/// Accepted share and right-when-accepted share of one Classify per 50 images.
async fn classify(server: &mut TestServer, images: Vec<pb::Image>, labels: &[u32]) -> (f64, f64) {
    let mut results = Vec::new();
    for chunk in images.chunks(50) {
        let response = server
            .client
            .classify(request(chunk.to_vec()))
            .await
            .unwrap()
            .into_inner();
        results.extend(response.results);
    }
    let accepted: Vec<_> = results.iter().zip(labels).filter(|(r, _)| r.accepted).collect();
    let right = accepted
        .iter()
        .filter(|(r, l)| r.prediction.as_ref().map(|p| p.class_id) == Some(**l))
        .count();
    let n = results.len() as f64;
    (accepted.len() as f64 / n, right as f64 / accepted.len().max(1) as f64)
}

#[tokio::test]
async fn garments_photographed_with_a_margin_or_on_off_white_are_accepted_as_often_as_the_garments_themselves() {
    let mut server = TestServer::start(config()).await;
    // 20 garments of each class from the committed test-split fixture.
    let garments: Vec<_> = (0..10)
        .flat_map(|class| fixture().into_iter().filter(move |(_, l)| *l == class).take(20))
        .collect();
    let labels: Vec<u32> = garments.iter().map(|(_, l)| *l).collect();
    let (as_is, _) = classify(&mut server, garments.iter().map(|(p, _)| raw(p)).collect(), &labels).await;
    // (name, scale, background, frame side, garment's top-left corner)
    let conditions = [
        // 112 pixels in a 224-pixel frame: the garment fills half of it, centred.
        ("on white at 50% of the frame", 4, 255, 224, (56, 56)),
        // Off-centre, a third of the frame.
        ("on white at 33% of the frame, off-centre", 3, 255, 252, (20, 150)),
        // Filling the frame, on an off-white background.
        ("filling the frame on background 235", 4, 235, 112, (0, 0)),
    ];
    for (name, scale, background, side, at) in conditions {
        let images = garments
            .iter()
            .map(|(p, _)| encoded(photo(p, scale, background, side, at)))
            .collect();
        let (accepted, right) = classify(&mut server, images, &labels).await;
        // Before the conversion (issue #39): 7% at 50% of the frame, 31% on background 235.
        assert!(
            accepted >= 0.85 * as_is,
            "{name}: {:.1}% accepted, the same garments as 28x28 images {:.1}%",
            100.0 * accepted,
            100.0 * as_is
        );
        assert!(right >= 0.97, "{name}: {:.1}% of accepted answers right", 100.0 * right);
    }
}

#[tokio::test]
async fn a_dot_on_a_white_page_is_a_tiny_object_and_the_reason_says_so() {
    let mut server = TestServer::start(config()).await;
    let page: Vec<u8> = (0..400 * 400)
        .map(|i| {
            if (200..206).contains(&(i % 400)) && (100..106).contains(&(i / 400)) {
                0
            } else {
                250
            }
        })
        .collect();
    let results = server
        .client
        .classify(request(vec![encoded(png(&page, 400, 400))]))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results[0].reason, pb::Reason::TinyObject as i32, "{:?}", results[0]);
    assert!(
        results[0].detail.contains("6x6 pixels of the 400x400 image"),
        "{}",
        results[0].detail
    );
}
