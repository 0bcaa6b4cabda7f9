//! The `fashion_mnist.v1.Classifier` adapter: proto in, [`ClassifyRequest`] to the core, [`Verdict`]s back
//! out as proto. No classification logic lives here.

use tonic::{Request, Response, Status};

use crate::{
    core::classify::{ClassifyRequest, ClassifyResponse, ImageInput, Pipeline},
    core::preprocess::PIXELS,
    core::verdict::{self, Reason, Verdict},
    pb,
    transport::connections::ConnectionInfo,
    transport::layers::Deadline,
};

#[derive(Debug, Clone)]
pub struct FashionMnistService {
    core: Pipeline,
    /// The largest gRPC message the server takes (`--max-message-bytes`), which `GetModelInfo` reports so
    /// clients can size their calls.
    max_message_bytes: usize,
}

impl FashionMnistService {
    pub fn new(core: Pipeline, max_message_bytes: usize) -> Self {
        FashionMnistService {
            core,
            max_message_bytes,
        }
    }
}

#[tonic::async_trait]
impl pb::classifier_server::Classifier for FashionMnistService {
    async fn classify(&self, request: Request<pb::ClassifyRequest>) -> Result<Response<pb::ClassifyResponse>, Status> {
        let deadline = request.extensions().get::<Deadline>().map(|d| d.0);
        let share = request.extensions().get::<ConnectionInfo>().map(|c| c.share.clone());
        let response = self
            .core
            .classify(from_proto(request.into_inner()), share, deadline)
            .await?;
        Ok(Response::new(to_proto(response)))
    }

    async fn get_model_info(
        &self,
        _request: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::GetModelInfoResponse>, Status> {
        Ok(Response::new(self.model_info()?))
    }
}

fn from_proto(req: pb::ClassifyRequest) -> ClassifyRequest {
    ClassifyRequest {
        images: req
            .images
            .into_iter()
            .map(|image| match image.data {
                Some(pb::image::Data::Encoded(bytes)) => ImageInput::Encoded(bytes),
                Some(pb::image::Data::Raw(bytes)) => ImageInput::Raw(bytes),
                None => ImageInput::Missing,
            })
            .collect(),
        model: req.model,
        version: req.version,
        min_confidence: req.min_confidence,
        max_ood_score: req.max_ood_score,
        return_model_input: req.return_model_input,
    }
}

fn to_proto(response: ClassifyResponse) -> pb::ClassifyResponse {
    pb::ClassifyResponse {
        results: response.verdicts.into_iter().map(classification).collect(),
        model: response.model,
        model_version: response.model_version,
    }
}

fn classification(verdict: Verdict) -> pb::Classification {
    pb::Classification {
        accepted: verdict.accepted(),
        reason: reason(verdict.reason) as i32,
        prediction: verdict.prediction.map(|p| pb::Prediction {
            class_id: p.class_id,
            class_name: p.class_name,
            probability: p.probability,
            probabilities: p.probabilities.to_vec(),
            ood_score: p.ood_score,
        }),
        detail: verdict.detail,
        model_input: verdict.model_input.map(|p| p.to_vec()).unwrap_or_default(),
    }
}

fn reason(reason: Reason) -> pb::Reason {
    match reason {
        Reason::Accepted => pb::Reason::Accepted,
        Reason::LowConfidence => pb::Reason::LowConfidence,
        Reason::MostlyDark => pb::Reason::MostlyDark,
        Reason::MostlyBright => pb::Reason::MostlyBright,
        Reason::LowContrast => pb::Reason::LowContrast,
        Reason::Undecodable => pb::Reason::Undecodable,
        Reason::WrongSize => pb::Reason::WrongSize,
        Reason::TooLarge => pb::Reason::TooLarge,
        Reason::OutOfDistribution => pb::Reason::OutOfDistribution,
        Reason::TinyObject => pb::Reason::TinyObject,
    }
}

impl FashionMnistService {
    fn model_info(&self) -> Result<pb::GetModelInfoResponse, Status> {
        let models = self.core.models()?;
        let p = self.core.policy();
        let info = models
            .models
            .iter()
            .filter_map(|(name, served)| Some((name, served, served.default_version()?)))
            .map(|(name, served, m)| {
                let meta = &m.meta;
                pb::ModelInfo {
                    name: name.clone(),
                    version: m.version_label(),
                    build: meta.version.clone(),
                    versions: served
                        .states
                        .iter()
                        .map(|(v, s)| pb::VersionStatus {
                            version: v.to_string(),
                            state: s.state.name().into(),
                            reason: s.reason.clone(),
                        })
                        .collect(),
                    labels: served.labels.iter().map(|(l, v)| (l.clone(), v.to_string())).collect(),
                    sha256: meta.sha256.clone(),
                    is_default: *name == models.default,
                    default_reason: if *name == models.default {
                        self.core.registry().default_model().why.clone()
                    } else {
                        String::new()
                    },
                    input: Some(pb::InputSpec {
                        name: meta.input.name.clone(),
                        shape: vec![-1, 1, 28, 28],
                        dtype: meta.input.dtype.clone(),
                        min_value: meta.input.range[0],
                        max_value: meta.input.range[1],
                        polarity: meta.input.polarity.clone(),
                    }),
                    classes: meta
                        .classes
                        .iter()
                        .map(|c| pb::ClassInfo {
                            id: c.id,
                            name: c.name.clone(),
                            description: c.description.clone(),
                        })
                        .collect(),
                    test_accuracy: meta.metrics.test_accuracy,
                    test_loss: meta.metrics.test_loss,
                    parameters: meta.parameters,
                    macs_per_image: meta.macs_per_image,
                    ood_method: meta.ood.as_ref().map_or_else(
                        || "energy: -logsumexp(logits); no threshold calibrated".into(),
                        |o| {
                            // The model's own ood.json says what its method is; older files do not, and were
                            // all written by training/ood_protocol.py.
                            let how = match (o.description.as_deref(), o.method.as_str()) {
                                (Some(description), _) => description,
                                (None, "energy") => "-logsumexp(logits)",
                                (None, "msp") => "-max softmax(logits)",
                                (None, _) => {
                                    "a weighted sum of standardised scores: energy on the logits, Mahalanobis and \
                                     kNN on the penultimate features (the graph's ood_components output)"
                                }
                            };
                            let protocol = o.protocol.as_deref().unwrap_or("training/ood_protocol.py");
                            format!(
                                "{}: {how}; threshold fixed on the validation split before any out-of-distribution \
                                 measurement (leave-one-group-out protocol, {protocol})",
                                o.method
                            )
                        },
                    ),
                    ood_threshold: p.thresholds(meta).max_ood_score.unwrap_or(f32::INFINITY),
                    min_confidence: p.thresholds(meta).min_confidence,
                    accept_target_accuracy: meta.accept.as_ref().map_or(0.0, |a| a.target_val_accuracy),
                    accept_test_accuracy: meta.accept.as_ref().map_or(0.0, |a| a.test_accuracy),
                    accept_test_coverage: meta.accept.as_ref().map_or(0.0, |a| a.test_coverage),
                    temperature: meta.temperature(),
                }
            })
            .collect::<Vec<_>>();
        let default_min_confidence = info
            .iter()
            .find(|m| m.is_default)
            .map_or(p.min_confidence.unwrap_or(verdict::UNCALIBRATED_MIN_CONFIDENCE), |m| {
                m.min_confidence
            });
        Ok(pb::GetModelInfoResponse {
            models: info,
            thresholds: Some(pb::Thresholds {
                min_confidence: default_min_confidence,
                dark_pixel_level: p.preprocess.check.dark_level.into(),
                bright_pixel_level: p.preprocess.check.bright_level.into(),
                max_dark_fraction: p.preprocess.check.max_dark_fraction,
                max_bright_fraction: p.preprocess.check.max_bright_fraction,
                min_contrast: p.preprocess.check.min_contrast,
                background_tolerance: p.preprocess.conversion.background_tolerance.into(),
            }),
            limits: Some(pb::Limits {
                max_images_per_request: p.max_images_per_request as u32,
                max_batch_size: p.batch.max_batch_size as u32,
                max_batch_delay_micros: p.batch.max_batch_delay.as_micros() as u32,
                max_queued_images: p.batch.max_queued_images as u32,
                max_decode_dimension: p.preprocess.limits.max_dimension,
                max_decode_bytes: p.preprocess.limits.max_alloc_bytes,
                max_message_bytes: self.max_message_bytes as u64,
            }),
        })
    }
}

/// Raw pixels of a 28x28 image as the proto wants them (helper for clients and tests).
pub fn raw_image(pixels: &[u8; PIXELS]) -> pb::Image {
    pb::Image {
        data: Some(pb::image::Data::Raw(pixels.to_vec())),
    }
}
