//! The tonic service: proto ⇄ domain, request validation, and the accept/reject decision for each image.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::{
    admission::{ConnectionShare, DecodeLanes},
    batching::{BatchConfig, Batcher, ImageOutput, Reservation},
    connections::ConnectionInfo,
    error::{QueueError, RequestError, clip},
    model::{CLASSES, ModelMetadata},
    pb,
    preprocess::{self, DecodeLimits, ImageData, InputCheck, ModelInput, PIXELS, Reason, Rejection},
    telemetry::metric,
};

/// A model ready to serve: its metadata and its queue.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub meta: ModelMetadata,
    pub batcher: Batcher,
}

/// The models, once loaded. Until then Classify answers UNAVAILABLE (and health says NOT_SERVING).
#[derive(Debug)]
pub struct Models {
    pub by_name: BTreeMap<String, LoadedModel>,
    pub default: String,
}

/// Everything a call needs besides its own request; built once from `Config`.
#[derive(Debug)]
pub struct Policy {
    pub limits: DecodeLimits,
    pub check: InputCheck,
    pub min_confidence: f32,
    /// Server-wide OOD threshold; `None` uses each model's calibrated threshold.
    pub max_ood_score: Option<f32>,
    pub max_images_per_request: usize,
    pub batch: BatchConfig,
    /// Calls with encoded images decoded at once, per lane (see [`DecodeLanes`]); with the decode limits it
    /// bounds decoding memory.
    pub max_concurrent_decodes: usize,
    /// A call whose encoded images declare at most this many pixels in all decodes in the small lane.
    pub small_decode_pixels: u64,
}

#[derive(Debug, Clone)]
pub struct ClassifierService {
    models: Arc<OnceLock<Models>>,
    policy: Arc<Policy>,
    lanes: DecodeLanes,
}

impl ClassifierService {
    pub fn new(models: Arc<OnceLock<Models>>, policy: Policy) -> Self {
        ClassifierService {
            models,
            lanes: DecodeLanes::new(policy.max_concurrent_decodes, policy.small_decode_pixels),
            policy: Arc::new(policy),
        }
    }

    fn models(&self) -> Result<&Models, Status> {
        self.models
            .get()
            .ok_or_else(|| Status::unavailable("models are still loading; retry shortly"))
    }

    /// Answers DEADLINE_EXCEEDED when the caller's deadline passes first; dropping the work then releases its
    /// queue room, and the batcher skips its images.
    async fn classify(&self, request: Request<pb::ClassifyRequest>) -> Result<pb::ClassifyResponse, Status> {
        let deadline = grpc_deadline(&request);
        let share = request.extensions().get::<ConnectionInfo>().map(|c| c.share.clone());
        let work = self.classify_until(request.into_inner(), share, deadline);
        match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), work)
                .await
                .unwrap_or_else(|_| Err(QueueError::DeadlineExceeded.into())),
            None => work.await,
        }
    }

    async fn classify_until(
        &self,
        req: pb::ClassifyRequest,
        share: Option<Arc<ConnectionShare>>,
        deadline: Option<Instant>,
    ) -> Result<pb::ClassifyResponse, Status> {
        let models = self.models()?;
        let max = self.policy.max_images_per_request;
        if req.images.is_empty() {
            return Err(RequestError::NoImages { max }.into());
        }
        if req.images.len() > max {
            return Err(RequestError::TooManyImages {
                got: req.images.len(),
                max,
            }
            .into());
        }
        let name = if req.model.is_empty() {
            models.default.as_str()
        } else {
            req.model.as_str()
        };
        let model = models.by_name.get(name).ok_or_else(|| RequestError::UnknownModel {
            name: clip(name),
            loaded: models.by_name.keys().cloned().collect::<Vec<_>>().join(", "),
        })?;
        let min_confidence = match req.min_confidence {
            Some(c) if !(0.0..=1.0).contains(&c) => {
                return Err(RequestError::OutOfRange {
                    field: "min_confidence",
                    got: c,
                    min: 0.0,
                    max: 1.0,
                }
                .into());
            }
            Some(c) => c,
            None => self.policy.min_confidence,
        };
        let max_ood = match req.max_ood_score {
            Some(s) if !s.is_finite() => {
                return Err(RequestError::OutOfRange {
                    field: "max_ood_score",
                    got: s,
                    min: f32::MIN,
                    max: f32::MAX,
                }
                .into());
            }
            Some(s) => Some(s),
            None => self
                .policy
                .max_ood_score
                .or(model.meta.ood.as_ref().map(|o| o.threshold)),
        };
        tracing::Span::current()
            .record("model", name)
            .record("images", req.images.len());

        // Within its connection's share a call may use any free queue room; past it, only the spare room, so
        // a greedy connection always leaves a share's worth of the queue to the others.
        let n = req.images.len();
        let reservation = match share.as_ref().map(|s| s.reserve_images(n)) {
            None => model.batcher.reserve(n)?,
            Some(Some(own)) => {
                let mut reservation = model.batcher.reserve(n)?;
                reservation.also_hold(Some(own));
                reservation
            }
            Some(None) => model.batcher.reserve_spare(n)?,
        };
        let (prepared, reservation) = self.preprocess_all(req.images, share, deadline, reservation).await?;
        // Inputs move to the batcher; each slot keeps its rejection, or the pixels when the caller wants them.
        let mut inputs = Vec::with_capacity(prepared.len());
        let slots: Vec<Result<Option<Box<[u8; PIXELS]>>, Rejection>> = prepared
            .into_iter()
            .map(|p| {
                p.map(|input| {
                    let shown = req.return_model_input.then(|| input.pixels.clone());
                    inputs.push(input);
                    shown
                })
            })
            .collect();
        let outputs = if inputs.is_empty() {
            Vec::new()
        } else {
            model.batcher.infer(reservation, inputs, deadline).await?
        };

        let mut outputs = outputs.into_iter();
        let results = slots
            .into_iter()
            .map(|slot| {
                let (reason, result) = match slot {
                    Err(rejection) => (rejection.reason, rejected(rejection)),
                    Ok(shown) => {
                        let output = outputs.next().expect("the batcher returns one output per input");
                        judge(&model.meta, &output, min_confidence, max_ood, shown)
                    }
                };
                let outcome = if result.accepted { "accepted" } else { "rejected" };
                metrics::counter!(metric::IMAGES, "model" => name.to_string(), "outcome" => outcome, "reason" => reason.label())
                    .increment(1);
                result
            })
            .collect();
        Ok(pb::ClassifyResponse {
            results,
            model: name.to_string(),
            model_version: model.meta.version.clone(),
        })
    }

    /// Raw images are cheap and handled inline; any encoded image moves the whole request to the blocking
    /// pool, so a large JPEG never stalls an async worker (and requests decode in parallel).
    ///
    /// Decoding ends with its caller: the decode slot and the queue reservation live inside the blocking
    /// closure, which stops between images once the caller has gone (deadline, RST_STREAM) or the deadline
    /// has passed. Cancelled calls therefore never decode beyond the bounds, whoever went away.
    async fn preprocess_all(
        &self,
        images: Vec<pb::Image>,
        share: Option<Arc<ConnectionShare>>,
        deadline: Option<Instant>,
        reservation: Reservation,
    ) -> Result<(Vec<Result<ModelInput, Rejection>>, Reservation), Status> {
        let policy = self.policy.clone();
        let encoded = images.iter().filter_map(|i| match &i.data {
            Some(pb::image::Data::Encoded(bytes)) => Some(bytes.as_slice()),
            _ => None,
        });
        let mut declared = Some(0u64);
        let mut any_encoded = false;
        for bytes in encoded {
            any_encoded = true;
            declared = declared
                .zip(preprocess::declared_pixels(bytes, &policy.limits))
                .map(|(sum, p)| sum.saturating_add(p));
        }
        if !any_encoded {
            let prepared = images.iter().map(|image| prepare(image, &policy)).collect();
            return Ok((prepared, reservation));
        }
        let slots = async {
            // The connection's own turn first, so its extra calls wait behind each other, not in the lanes.
            let turn = match &share {
                Some(share) => Some(share.decode_turn().await),
                None => None,
            };
            (turn, self.lanes.acquire(declared).await)
        };
        let held = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), slots)
                .await
                .map_err(|_| QueueError::DeadlineExceeded)?,
            None => slots.await,
        };
        let cancelled = CancelOnDrop::default();
        let stop = cancelled.0.clone();
        let decode = move || {
            let _held = held;
            let mut prepared = Vec::with_capacity(images.len());
            for image in &images {
                if stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d) {
                    metrics::counter!(metric::DECODES_ABANDONED).increment(1);
                    return None;
                }
                prepared.push(prepare(image, &policy));
            }
            Some((prepared, reservation))
        };
        match tokio::task::spawn_blocking(decode).await {
            Ok(Some(done)) => Ok(done),
            // Only the deadline can stop it while this future still runs.
            Ok(None) => Err(QueueError::DeadlineExceeded.into()),
            Err(e) => Err(Status::internal(format!("preprocessing task failed: {e}"))),
        }
    }
}

/// Tells a blocking decode that its caller has gone: set when the handler's future is dropped.
#[derive(Default)]
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn prepare(image: &pb::Image, policy: &Policy) -> Result<ModelInput, Rejection> {
    let data = match &image.data {
        Some(pb::image::Data::Encoded(bytes)) => ImageData::Encoded(bytes),
        Some(pb::image::Data::Raw(bytes)) => ImageData::Raw(bytes),
        None => {
            return Err(Rejection {
                reason: Reason::Undecodable,
                detail: "image has no data: set `encoded` (an image file) or `raw` (784 bytes)".into(),
                pixels: None,
            });
        }
    };
    preprocess::preprocess(data, &policy.limits, &policy.check)
}

/// Energy-based out-of-distribution score: −logsumexp(logits). In-distribution images have large logits, so a
/// higher score means less like the training data.
pub fn ood_score(logits: &[f32; CLASSES]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    -(max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln())
}

fn judge(
    meta: &ModelMetadata,
    output: &ImageOutput,
    min_confidence: f32,
    max_ood: Option<f32>,
    shown: Option<Box<[u8; PIXELS]>>,
) -> (Reason, pb::Classification) {
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
    let score = ood_score(&output.logits);
    let class_name = meta.classes[class_id].name.clone();
    let (reason, detail) = match max_ood {
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
    let classification = pb::Classification {
        prediction: Some(pb::Prediction {
            class_id: class_id as u32,
            class_name,
            probability,
            probabilities: output.probabilities.to_vec(),
            ood_score: score,
        }),
        accepted: reason == Reason::Accepted,
        reason: to_proto(reason) as i32,
        detail,
        model_input: shown.map(|p| p.to_vec()).unwrap_or_default(),
    };
    (reason, classification)
}

fn rejected(rejection: Rejection) -> pb::Classification {
    pb::Classification {
        prediction: None,
        accepted: false,
        reason: to_proto(rejection.reason) as i32,
        detail: rejection.detail,
        model_input: rejection.pixels.map(|p| p.to_vec()).unwrap_or_default(),
    }
}

fn to_proto(reason: Reason) -> pb::Reason {
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
    }
}

/// The caller's deadline from the `grpc-timeout` header (e.g. "250m" = 250 ms), if any.
fn grpc_deadline<T>(request: &Request<T>) -> Option<Instant> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    };
    // A millisecond early: tonic's own timer for the same header would otherwise answer first, with CANCELLED.
    Instant::now().checked_add(timeout.saturating_sub(Duration::from_millis(1)))
}

/// The caller's `x-request-id` when it is a plain token (letters, digits and `-._:`, at most 128), or a fresh
/// one: an id is written into every log line of the call, so it must not be able to forge fields or lines.
fn request_id<T>(request: &Request<T>) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    if let Some(id) = request.metadata().get("x-request-id").and_then(|v| v.to_str().ok())
        && is_safe_request_id(id)
    {
        return id.to_string();
    }
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{started:x}-{:x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn is_safe_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'))
}

/// Runs one RPC inside its span, records its duration and status code, and echoes the request id.
async fn instrumented<T, R, F>(
    rpc: &'static str,
    request: Request<T>,
    handler: impl FnOnce(Request<T>) -> F,
) -> Result<Response<R>, Status>
where
    F: Future<Output = Result<R, Status>>,
{
    let id = request_id(&request);
    let span = tracing::info_span!("rpc", rpc, request_id = %id, model = tracing::field::Empty, images = tracing::field::Empty);
    let started = Instant::now();
    let result = handler(request).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    };
    let code_label = format!("{code:?}");
    metrics::counter!(metric::REQUESTS, "rpc" => rpc, "code" => code_label.clone()).increment(1);
    metrics::histogram!(metric::REQUEST_DURATION, "rpc" => rpc, "code" => code_label).record(elapsed.as_secs_f64());
    span.in_scope(|| match &result {
        Ok(_) => tracing::info!(outcome = "ok", duration_ms = elapsed.as_secs_f64() * 1e3, "call finished"),
        Err(status) => tracing::warn!(outcome = ?code, duration_ms = elapsed.as_secs_f64() * 1e3, error = status.message(), "call failed"),
    });
    let mut response = Response::new(result?);
    if let Ok(value) = id.parse() {
        response.metadata_mut().insert("x-request-id", value);
    }
    Ok(response)
}

#[tonic::async_trait]
impl pb::classifier_server::Classifier for ClassifierService {
    async fn classify(&self, request: Request<pb::ClassifyRequest>) -> Result<Response<pb::ClassifyResponse>, Status> {
        instrumented("Classify", request, |r| ClassifierService::classify(self, r)).await
    }

    async fn get_model_info(
        &self,
        request: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::GetModelInfoResponse>, Status> {
        instrumented("GetModelInfo", request, |_| async { self.model_info() }).await
    }
}

impl ClassifierService {
    fn model_info(&self) -> Result<pb::GetModelInfoResponse, Status> {
        let models = self.models()?;
        let p = &self.policy;
        let info = models
            .by_name
            .values()
            .map(|m| {
                let meta = &m.meta;
                pb::ModelInfo {
                    name: meta.name.clone(),
                    version: meta.version.clone(),
                    sha256: meta.sha256.clone(),
                    is_default: meta.name == models.default,
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
                            format!(
                                "{}: -logsumexp(logits), threshold calibrated on the validation split",
                                o.method
                            )
                        },
                    ),
                    ood_threshold: p
                        .max_ood_score
                        .or(meta.ood.as_ref().map(|o| o.threshold))
                        .unwrap_or(f32::INFINITY),
                }
            })
            .collect();
        Ok(pb::GetModelInfoResponse {
            models: info,
            thresholds: Some(pb::Thresholds {
                min_confidence: p.min_confidence,
                dark_pixel_level: p.check.dark_level.into(),
                bright_pixel_level: p.check.bright_level.into(),
                max_dark_fraction: p.check.max_dark_fraction,
                max_bright_fraction: p.check.max_bright_fraction,
                min_contrast: p.check.min_contrast,
            }),
            limits: Some(pb::Limits {
                max_images_per_request: p.max_images_per_request as u32,
                max_batch_size: p.batch.max_batch_size as u32,
                max_batch_delay_micros: p.batch.max_batch_delay.as_micros() as u32,
                max_queued_images: p.batch.max_queued_images as u32,
                max_decode_dimension: p.limits.max_dimension,
                max_decode_bytes: p.limits.max_alloc_bytes,
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
