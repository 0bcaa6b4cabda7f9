//! The verdict on one image: accepted, or rejected with a reason and a sentence for a human. The reasons, the
//! thresholds in effect and the accept/reject decision live here and nowhere else (the out-of-distribution
//! score they judge is `ood`'s); every protocol adapter only translates a [`Verdict`].

pub use crate::core::reason::Reason;
use crate::{
    core::model::{CLASSES, ImageOutput, ModelMetadata},
    core::preprocess::{PIXELS, Rejection},
    error::RequestError,
};

/// What the model said about one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub class_id: u32,
    pub class_name: String,
    pub probability: f32,
    pub probabilities: [f32; CLASSES],
    pub ood_score: f32,
}

/// The answer for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub reason: Reason,
    pub detail: String,
    /// `None` when the image never reached the model (it could not be decoded, or failed the input check).
    pub prediction: Option<Prediction>,
    /// The 28x28 pixels the model saw, when the caller asked for them; for an image the input check rejected,
    /// always.
    pub model_input: Option<Box<[u8; PIXELS]>>,
}

impl Verdict {
    pub fn accepted(&self) -> bool {
        self.reason == Reason::Accepted
    }

    /// An image stopped before the model, with its pixels when it got that far (they show the caller what
    /// the input check judged).
    pub fn rejected(rejection: Rejection) -> Verdict {
        Verdict {
            reason: rejection.reason,
            detail: rejection.detail,
            prediction: None,
            model_input: rejection.pixels,
        }
    }
}

/// The minimum confidence of a model exported without an accept rule: the seed's, which promises nothing.
pub const UNCALIBRATED_MIN_CONFIDENCE: f32 = 0.60;

/// The thresholds one call is judged by: the server's, the model's own (its calibrated OOD threshold and the
/// accept rule derived from its target), or the call's own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub min_confidence: f32,
    /// `None`: no OOD threshold (the model has no calibrated one and none was set).
    pub max_ood_score: Option<f32>,
}

impl Thresholds {
    /// The thresholds a call to `meta`'s model gets when it sets none: the server-wide minimum confidence or
    /// else the model's accept rule (else [`UNCALIBRATED_MIN_CONFIDENCE`]), and the server-wide OOD threshold
    /// or else the one calibrated for the model.
    pub fn defaults(
        server_min_confidence: Option<f32>,
        server_max_ood: Option<f32>,
        meta: &ModelMetadata,
    ) -> Thresholds {
        Thresholds {
            min_confidence: server_min_confidence
                .or(meta.accept.as_ref().map(|a| a.min_confidence))
                .unwrap_or(UNCALIBRATED_MIN_CONFIDENCE),
            max_ood_score: server_max_ood.or(meta.ood.as_ref().map(|o| o.threshold)),
        }
    }

    /// These thresholds with the call's own, each checked: a confidence in [0, 1], a finite OOD score.
    pub fn overridden_by(
        self,
        min_confidence: Option<f32>,
        max_ood_score: Option<f32>,
    ) -> Result<Thresholds, RequestError> {
        let min_confidence = match min_confidence {
            Some(c) if !(0.0..=1.0).contains(&c) => {
                return Err(RequestError::OutOfRange {
                    field: "min_confidence",
                    got: c,
                    min: 0.0,
                    max: 1.0,
                });
            }
            Some(c) => c,
            None => self.min_confidence,
        };
        let max_ood_score = match max_ood_score {
            Some(s) if !s.is_finite() => {
                return Err(RequestError::OutOfRange {
                    field: "max_ood_score",
                    got: s,
                    min: f32::MIN,
                    max: f32::MAX,
                });
            }
            Some(s) => Some(s),
            None => self.max_ood_score,
        };
        Ok(Thresholds {
            min_confidence,
            max_ood_score,
        })
    }
}

/// Accepts the model's answer for one image, or rejects it as out of distribution or not confident enough.
pub fn judge(
    meta: &ModelMetadata,
    output: &ImageOutput,
    thresholds: Thresholds,
    model_input: Option<Box<[u8; PIXELS]>>,
) -> Verdict {
    let (class_id, probability) =
        output
            .probabilities
            .iter()
            .copied()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |best, (i, p)| if p > best.1 { (i, p) } else { best },
            );
    let score = output.ood_score;
    let class_name = meta.classes[class_id].name.clone();
    let min_confidence = thresholds.min_confidence;
    let (reason, detail) = match thresholds.max_ood_score {
        Some(threshold) if score > threshold => (
            Reason::OutOfDistribution,
            format!(
                "out-of-distribution score {score:.2} is above the threshold {threshold:.2}: this does not look like a Fashion-MNIST garment"
            ),
        ),
        _ if probability < min_confidence => (
            Reason::LowConfidence,
            format!(
                "top probability {probability:.2} ({class_name}) is below the minimum confidence {min_confidence:.2}"
            ),
        ),
        _ => (
            Reason::Accepted,
            format!("{class_name} with probability {probability:.2}"),
        ),
    };
    Verdict {
        reason,
        detail,
        prediction: Some(Prediction {
            class_id: class_id as u32,
            class_name,
            probability,
            probabilities: output.probabilities,
            ood_score: score,
        }),
        model_input,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_all_is_indexed_by_the_discriminant() {
        for (i, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i, "{reason:?}");
        }
    }
}
