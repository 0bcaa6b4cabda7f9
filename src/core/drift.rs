//! Drift signals: what the model sees and returns, image by image, kept as metrics per model version beside
//! reference values measured on the validation split when the model was exported (`drift_reference` in its
//! model.json, written by training/drift_reference.py), so alert rules can compare the live window with the
//! reference (docs/drift.md).
//!
//! Each image that reached the model adds its predicted class, its calibrated top probability and its OOD
//! score as the margin to the model's own threshold (so one set of buckets fits every detector); each image
//! that became a 28x28 input adds that input's brightness and contrast. The verdict reasons are counted in
//! `fmnist_images_total`.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::{
    core::model::{CLASSES, DriftReference, ModelMetadata},
    core::preprocess::PIXELS,
    core::verdict::Verdict,
    telemetry::metric,
};

/// Pixel mean and standard deviation of a 28x28 input, each over 255.
pub fn input_statistics(pixels: &[u8; PIXELS]) -> InputStatistics {
    let (mut sum, mut squares) = (0u64, 0u64);
    for &p in pixels.iter() {
        sum += u64::from(p);
        squares += u64::from(p) * u64::from(p);
    }
    let n = PIXELS as f64;
    let mean = sum as f64 / n;
    let variance = (squares as f64 / n - mean * mean).max(0.0);
    InputStatistics {
        brightness: mean / 255.0,
        contrast: variance.sqrt() / 255.0,
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputStatistics {
    pub brightness: f64,
    pub contrast: f64,
}

/// One model version's drift metrics, labelled once.
#[derive(Debug)]
pub struct DriftSignals {
    classes: [metrics::Counter; CLASSES],
    /// The same counts, readable here: the browser page compares them with the reference.
    class_counts: [AtomicU64; CLASSES],
    /// The model's own OOD threshold: margins are measured from it, whatever a call overrides.
    ood_threshold: Option<f32>,
    top_probability: metrics::Histogram,
    ood_margin: metrics::Histogram,
    brightness: metrics::Histogram,
    contrast: metrics::Histogram,
}

impl DriftSignals {
    /// The live metrics of `name` version `version`; its reference values become gauges when its metadata
    /// has them.
    pub fn new(name: &str, version: u64, meta: &ModelMetadata) -> Self {
        let (m, v) = (|| name.to_string(), || version.to_string());
        let classes = std::array::from_fn(
            |i| metrics::counter!(metric::PREDICTED_CLASS, "model" => m(), "version" => v(), "class" => meta.classes[i].name.clone()),
        );
        if let Some(reference) = &meta.drift_reference {
            publish(reference, name, version, meta);
        }
        DriftSignals {
            classes,
            class_counts: Default::default(),
            ood_threshold: meta.ood.as_ref().map(|o| o.threshold),
            top_probability: metrics::histogram!(metric::TOP_PROBABILITY, "model" => m(), "version" => v()),
            ood_margin: metrics::histogram!(metric::OOD_MARGIN, "model" => m(), "version" => v()),
            brightness: metrics::histogram!(metric::INPUT_BRIGHTNESS, "model" => m(), "version" => v()),
            contrast: metrics::histogram!(metric::INPUT_CONTRAST, "model" => m(), "version" => v()),
        }
    }

    /// Adds one image: its verdict, and the statistics of the input it became (`None` when it never became
    /// one: undecodable, too large).
    pub fn observe(&self, verdict: &Verdict, input: Option<InputStatistics>) {
        if let Some(p) = &verdict.prediction {
            self.classes[p.class_id as usize].increment(1);
            self.class_counts[p.class_id as usize].fetch_add(1, Ordering::Relaxed);
            self.top_probability.record(f64::from(p.probability));
            if let Some(threshold) = self.ood_threshold {
                self.ood_margin.record(f64::from(p.ood_score - threshold));
            }
        }
        if let Some(input) = input {
            self.brightness.record(input.brightness);
            self.contrast.record(input.contrast);
        }
    }

    /// Images the model saw per predicted class since the version was loaded, by class id.
    pub fn class_counts(&self) -> [u64; CLASSES] {
        std::array::from_fn(|i| self.class_counts[i].load(Ordering::Relaxed))
    }
}

/// Sets the reference gauges of `name` version `version`.
fn publish(reference: &DriftReference, name: &str, version: u64, meta: &ModelMetadata) {
    let (m, v) = (|| name.to_string(), || version.to_string());
    for (reason, share) in &reference.reasons {
        metrics::gauge!(metric::REFERENCE_REASON_SHARE, "model" => m(), "version" => v(), "reason" => reason.clone())
            .set(*share);
    }
    for (class, share) in meta.classes.iter().zip(&reference.classes) {
        metrics::gauge!(metric::REFERENCE_CLASS_SHARE, "model" => m(), "version" => v(), "class" => class.name.clone())
            .set(*share);
    }
    let signals = [
        ("top_probability_mean", Some(reference.top_probability_mean)),
        ("ood_margin_mean", reference.ood_margin_mean),
        ("brightness_mean", Some(reference.brightness_mean)),
        ("contrast_mean", Some(reference.contrast_mean)),
    ];
    for (signal, value) in signals {
        if let Some(value) = value {
            metrics::gauge!(metric::REFERENCE, "model" => m(), "version" => v(), "signal" => signal).set(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_statistics_are_the_pixel_mean_and_standard_deviation_over_255() {
        assert_eq!(
            input_statistics(&[0; PIXELS]),
            InputStatistics {
                brightness: 0.0,
                contrast: 0.0
            }
        );
        let mut half = [0u8; PIXELS];
        half[..PIXELS / 2].fill(255);
        let s = input_statistics(&half);
        assert!(
            (s.brightness - 0.5).abs() < 1e-9 && (s.contrast - 0.5).abs() < 1e-9,
            "{s:?}"
        );
    }
}
