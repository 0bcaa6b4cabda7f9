//! The classification pipeline, with no protocol in it: validate → resolve the model version → reserve queue
//! room → preprocess → batch → verdict. Adapters (`grpc::fashion_mnist`, and the Open Inference Protocol's
//! `oip` over gRPC and REST) turn their wire types into a [`ClassifyRequest`] and a [`ClassifyResponse`] back,
//! and map a [`ServiceError`]'s kind to their codes.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use tracing::Instrument;

use crate::{
    core::admission::{self, ConnectionShare, DecodeLanes},
    core::batching::{BatchConfig, Reservation},
    core::capture::Capture,
    core::drift,
    core::model::ModelMetadata,
    core::preprocess::{self, ImageData, ModelInput, PreprocessSettings, Rejection},
    core::registry::{LoadedModel, Registry, Snapshot},
    core::statistics::Recorder,
    core::verdict::{self, Reason, Thresholds, Verdict},
    error::{QueueError, RequestError, ServiceError},
    telemetry::metric,
    traces,
};

/// Everything a call needs besides its own request; built once from `Config`.
#[derive(Debug)]
pub struct Policy {
    pub preprocess: PreprocessSettings,
    /// Server-wide minimum confidence; `None` uses each model's accept rule.
    pub min_confidence: Option<f32>,
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

impl Policy {
    /// The thresholds a call to `meta`'s model gets when it sets none.
    pub fn thresholds(&self, meta: &ModelMetadata) -> Thresholds {
        Thresholds::defaults(self.min_confidence, self.max_ood_score, meta)
    }
}

/// One image as the caller sent it.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageInput {
    /// An encoded file (PNG, JPEG, ...).
    Encoded(Vec<u8>),
    /// 28x28 8-bit grayscale, row-major, 0 = background.
    Raw(Vec<u8>),
    /// 28x28 model-ready values (`pixel / 255`), row-major, 0 = background.
    Scaled(Vec<f32>),
    /// The caller sent an image with no data.
    Missing,
}

/// A call: images for one model, with optional thresholds of its own.
#[derive(Debug, Clone, Default)]
pub struct ClassifyRequest {
    pub images: Vec<ImageInput>,
    /// Empty: the default model.
    pub model: String,
    /// Empty: the model's newest ready version; else a version number or a label.
    pub version: String,
    pub min_confidence: Option<f32>,
    pub max_ood_score: Option<f32>,
    /// Return the 28x28 pixels each image became.
    pub return_model_input: bool,
}

/// One verdict per image, in order, and the model that gave them.
#[derive(Debug, Clone)]
pub struct ClassifyResponse {
    pub verdicts: Vec<Verdict>,
    pub model: String,
    pub model_version: String,
}

/// The pipeline; cheap to clone, shared by every adapter.
#[derive(Debug, Clone)]
pub struct Pipeline {
    registry: Arc<Registry>,
    policy: Arc<Policy>,
    lanes: DecodeLanes,
    draining: Arc<AtomicBool>,
    /// Where the model's rejections are kept, when `--capture-dir` is set.
    capture: Option<Capture>,
}

impl Pipeline {
    pub fn new(registry: Arc<Registry>, policy: Policy, capture: Option<Capture>) -> Self {
        Pipeline {
            registry,
            lanes: DecodeLanes::new(policy.max_concurrent_decodes, policy.small_decode_pixels),
            policy: Arc::new(policy),
            draining: Arc::default(),
            capture,
        }
    }

    /// The capture, when `--capture-dir` is set.
    pub fn capture(&self) -> Option<&Capture> {
        self.capture.as_ref()
    }

    /// Ready for new work, as health and readiness report it: the server is not draining, and the default model
    /// has a version loaded and warmed up (without one, every call that names no model fails).
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.registry.snapshot().is_some_and(|s| s.default_ready())
    }

    /// Shutting down: new work should go elsewhere.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The server is shutting down: readiness turns false so balancers stop sending work; calls still run.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// The models as they are now, or `Unavailable` while they are still loading.
    pub fn models(&self) -> Result<Arc<Snapshot>, ServiceError> {
        self.registry.snapshot().ok_or_else(ServiceError::loading)
    }

    /// The registry, for the adapters that load and unload models on request.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Classifies a call's images. `share` is the caller's connection's share of the server (adapters find it
    /// in the request); past `deadline` the call fails with `Deadline`, and its queued images and any
    /// decoding still to do are dropped.
    pub async fn classify(
        &self,
        req: ClassifyRequest,
        share: Option<Arc<ConnectionShare>>,
        deadline: Option<Instant>,
    ) -> Result<ClassifyResponse, ServiceError> {
        let work = self.classify_until(req, share, deadline);
        match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), work)
                .await
                .unwrap_or_else(|_| Err(QueueError::DeadlineExceeded.into())),
            None => work.await,
        }
    }

    async fn classify_until(
        &self,
        req: ClassifyRequest,
        share: Option<Arc<ConnectionShare>>,
        deadline: Option<Instant>,
    ) -> Result<ClassifyResponse, ServiceError> {
        let snapshot = self.models()?;
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
        // The call keeps its version (and that version's queue) until it is answered, whatever swaps meanwhile.
        let model = snapshot.find(&req.model, &req.version)?.clone();
        drop(snapshot);
        let name = model.name.as_str();
        let version = model.version_label();
        let thresholds = self
            .policy
            .thresholds(&model.meta)
            .overridden_by(req.min_confidence, req.max_ood_score)?;
        tracing::Span::current()
            .record("model", name)
            .record("version", &version)
            .record("images", req.images.len() as i64);

        let mut counted = Counted {
            statistics: model.batcher.statistics(),
            admitted: Instant::now(),
            ok: false,
        };
        let answered = self
            .classify_on(&model, version, req, share, deadline, thresholds)
            .await;
        counted.ok = answered.is_ok();
        answered
    }

    /// The part of a call that runs on the version it found: what the version's statistics count.
    async fn classify_on(
        &self,
        model: &LoadedModel,
        version: String,
        req: ClassifyRequest,
        share: Option<Arc<ConnectionShare>>,
        deadline: Option<Instant>,
        thresholds: Thresholds,
    ) -> Result<ClassifyResponse, ServiceError> {
        let name = model.name.as_str();
        let n = req.images.len();
        let reservation = admission::queue_room(&model.batcher, share.as_deref(), n).await?;
        let preprocessing = if traces::enabled() {
            tracing::info_span!("preprocess", images = n as i64)
        } else {
            tracing::Span::none()
        };
        let (prepared, reservation) = self
            .preprocess_all(req.images, share, deadline, reservation)
            .instrument(preprocessing)
            .await?;
        // Inputs move to the batcher; each slot keeps its rejection, or the input's statistics and, when the caller
        // wants them or the capture may keep them, a copy of its pixels.
        let show = req.return_model_input;
        let mut inputs = Vec::with_capacity(prepared.len());
        let slots: Vec<Result<Prepared, Rejection>> = prepared
            .into_iter()
            .map(|p| {
                p.map(|input| {
                    let prepared = Prepared {
                        pixels: (show || self.capture.is_some()).then(|| input.pixels.clone()),
                        statistics: drift::input_statistics(&input.pixels),
                    };
                    inputs.push(input);
                    prepared
                })
            })
            .collect();
        let outputs = if inputs.is_empty() {
            Vec::new()
        } else {
            model.batcher.infer(reservation, inputs, deadline).await?
        };

        let mut outputs = outputs.into_iter();
        let verdicts = slots
            .into_iter()
            .map(|slot| {
                let (verdict, statistics) = match slot {
                    Err(rejection) => {
                        let statistics = rejection.pixels.as_deref().map(drift::input_statistics);
                        (Verdict::rejected(rejection), statistics)
                    }
                    Ok(Prepared { pixels, statistics }) => {
                        let output = outputs.next().expect("the batcher returns one output per input");
                        let (shown, kept) = if show { (pixels, None) } else { (None, pixels) };
                        let verdict = verdict::judge(&model.meta, &output, thresholds, shown);
                        if let Some(capture) = &self.capture
                            && let Some(pixels) = verdict.model_input.as_deref().or(kept.as_deref())
                        {
                            capture.offer(name, &version, &verdict, pixels);
                        }
                        (verdict, Some(statistics))
                    }
                };
                model.images.count(verdict.reason);
                model.drift.observe(&verdict, statistics);
                verdict
            })
            .collect::<Vec<Verdict>>();
        if traces::enabled() {
            record_reasons(&verdicts);
        }
        Ok(ClassifyResponse {
            verdicts,
            model: name.to_string(),
            model_version: version,
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
        images: Vec<ImageInput>,
        share: Option<Arc<ConnectionShare>>,
        deadline: Option<Instant>,
        reservation: Reservation,
    ) -> Result<(Vec<Result<ModelInput, Rejection>>, Reservation), ServiceError> {
        let policy = self.policy.clone();
        let encoded = images.iter().filter_map(|i| match i {
            ImageInput::Encoded(bytes) => Some(bytes.as_slice()),
            _ => None,
        });
        let mut declared = Some(0u64);
        let mut any_encoded = false;
        for bytes in encoded {
            any_encoded = true;
            declared = declared
                .zip(preprocess::declared_pixels(bytes, &policy.preprocess.limits))
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
            Err(e) => Err(ServiceError::internal(format!("preprocessing task failed: {e}"))),
        }
    }
}

/// What a call keeps of an image it hands to the batcher.
struct Prepared {
    /// The pixels, when the caller asked to see them or the capture may keep them.
    pixels: Option<Box<[u8; preprocess::PIXELS]>>,
    statistics: drift::InputStatistics,
}

/// The call's span gets `images.<reason>` = how many of its images got that reason.
fn record_reasons(verdicts: &[Verdict]) {
    let mut counts: Vec<(&'static str, i64)> = Vec::new();
    for verdict in verdicts {
        let label = verdict.reason.label();
        match counts.iter_mut().find(|(l, _)| *l == label) {
            Some((_, count)) => *count += 1,
            None => counts.push((label, 1)),
        }
    }
    let span = tracing::Span::current();
    for (label, count) in counts {
        traces::attribute(&span, format!("images.{label}"), count);
    }
}

/// Counts a call in its version's statistics when it ends: answered, failed, or dropped (its deadline passed
/// or its client went away), which counts as failed.
struct Counted<'a> {
    statistics: &'a Recorder,
    admitted: Instant,
    ok: bool,
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.statistics.call(self.ok, self.admitted.elapsed());
    }
}

/// Tells a blocking decode that its caller has gone: set when the call's future is dropped.
#[derive(Default)]
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn prepare(image: &ImageInput, policy: &Policy) -> Result<ModelInput, Rejection> {
    let data = match image {
        ImageInput::Encoded(bytes) => ImageData::Encoded(bytes),
        ImageInput::Raw(bytes) => ImageData::Raw(bytes),
        ImageInput::Scaled(values) => ImageData::Scaled(values),
        ImageInput::Missing => {
            return Err(Rejection {
                reason: Reason::Undecodable,
                detail: "image has no data: set `encoded` (an image file) or `raw` (784 bytes)".into(),
                pixels: None,
            });
        }
    };
    preprocess::preprocess(data, &policy.preprocess)
}
