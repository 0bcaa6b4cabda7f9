//! The ONNX Runtime session of one exported model and the metadata the training pipeline wrote beside it.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
};

use ort::{
    environment::Environment,
    session::{HasSelectedOutputs, OutputSelector, RunOptions, Session, builder::GraphOptimizationLevel},
    value::{TensorRef, ValueType},
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::{error::ModelError, ood::Detector, preprocess::PIXELS};

/// Number of classes every model predicts.
pub const CLASSES: usize = 10;

/// `models/<name>/<version>/model.json`, as written by `training/export.py` (fields the server uses).
#[derive(Debug, Clone, Deserialize)]
pub struct ModelMetadata {
    pub name: String,
    pub version: String,
    pub file: String,
    pub sha256: String,
    pub classes: Vec<ClassMetadata>,
    pub input: InputMetadata,
    pub parameters: u64,
    pub macs_per_image: u64,
    pub metrics: TestMetrics,
    #[serde(default)]
    pub ood: Option<OodMetadata>,
    #[serde(default)]
    pub calibration: Option<CalibrationMetadata>,
    #[serde(default)]
    pub accept: Option<AcceptMetadata>,
    /// The drift signals over the validation split (see [`crate::core::drift`]).
    #[serde(default)]
    pub drift_reference: Option<DriftReference>,
    /// How the graph was quantized, when it was (training/quantize.py). Only its presence is read
    /// ([`Spinning::auto`]), so its contents are skipped.
    #[serde(default)]
    pub quantization: Option<serde::de::IgnoredAny>,
}

/// Reference values of a version's drift signals: the same metrics the server keeps, measured by replaying
/// the validation split through a real server when the model was exported (training/drift_reference.py).
#[derive(Debug, Clone, Deserialize)]
pub struct DriftReference {
    /// Where the reference images came from, and how they were sent.
    pub measured_on: String,
    pub images: u64,
    /// Share of the images per verdict reason (`Reason::label`), over all images.
    pub reasons: std::collections::BTreeMap<String, f64>,
    /// Share of the images the model saw per predicted class, by class id (floored at 0.001, so that the PSI
    /// of a live window against it stays finite).
    pub classes: Vec<f64>,
    /// Means over the images that have the value.
    pub top_probability_mean: f64,
    #[serde(default)]
    pub ood_margin_mean: Option<f64>,
    pub brightness_mean: f64,
    pub contrast_mean: f64,
}

impl ModelMetadata {
    /// The temperature the logits are divided by before the softmax; 1 (the raw softmax) for a model exported
    /// without calibration.
    pub fn temperature(&self) -> f32 {
        self.calibration.as_ref().map_or(1.0, |c| c.temperature)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ClassMetadata {
    pub id: u32,
    pub name: String,
    pub description: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InputMetadata {
    pub name: String,
    pub dtype: String,
    pub range: [f32; 2],
    pub polarity: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TestMetrics {
    pub test_accuracy: f32,
    pub test_loss: f32,
    pub test_images: u32,
}

/// Out-of-distribution scoring fitted by the training pipeline (training/ood.py).
#[derive(Debug, Clone, Deserialize)]
pub struct OodMetadata {
    pub method: String,
    pub threshold: f32,
    /// The detector's parameters (`ood.json` beside model.json) and their sha256; absent for energy, which
    /// needs none.
    #[serde(default)]
    pub file: Option<String>,
    #[serde(default)]
    pub sha256: Option<String>,
    /// What the method is and the protocol that fixed it, as the model's `ood.json` says (filled in when the
    /// model loads; model.json does not carry them).
    #[serde(skip)]
    pub description: Option<String>,
    #[serde(skip)]
    pub protocol: Option<String>,
}

/// Temperature scaling (Guo et al. 2017) fitted by training/ood_protocol.py on the validation split: the
/// served probabilities are `softmax(logits / temperature)`, so a top probability of 0.9 is right about 90% of
/// the time.
#[derive(Debug, Clone, Deserialize)]
pub struct CalibrationMetadata {
    pub temperature: f32,
}

/// The default accept rule training/ood_protocol.py derived from a stated target, and what it measured.
#[derive(Debug, Clone, Deserialize)]
pub struct AcceptMetadata {
    /// The target: accepted validation answers at least this often correct.
    pub target_val_accuracy: f32,
    /// The lowest calibrated top probability at which the target holds on validation (OOD rule applied).
    pub min_confidence: f32,
    /// Measured once on the test set with that threshold: share of accepted answers that are correct, and share
    /// of test images accepted.
    pub test_accuracy: f32,
    pub test_coverage: f32,
}

/// The model's answer for one image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageOutput {
    pub probabilities: [f32; CLASSES],
    pub logits: [f32; CLASSES],
    pub ood_score: f32,
}

/// What a batch run gives back, image after image. Reused from run to run by the inference thread
/// ([`Model::run_into`]), so its buffers are allocated once.
#[derive(Debug, Clone, Default)]
pub struct BatchOutput {
    /// `n * CLASSES` calibrated probabilities: `softmax(logits / temperature)`.
    pub probabilities: Vec<f32>,
    /// `n * CLASSES` logits.
    pub logits: Vec<f32>,
    /// `n` out-of-distribution scores (see [`crate::core::ood`]).
    pub ood_scores: Vec<f32>,
    /// `n * k` OOD score components from the graph, read only when the detector needs them.
    components: Vec<f32>,
}

/// ONNX Runtime settings shared by every session (built from the config by `Config::runtime_options`).
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    pub dylib: PathBuf,
    /// Intra-op threads per session (`Config::runtime_options` resolves `--ort-threads 0` into a count).
    pub intra_threads: usize,
    /// When idle intra-op threads spin before sleeping; `None`: as each model's graph has it ([`Spinning::auto`]).
    pub intra_spinning: Option<Spinning>,
    /// Graph optimization level applied when the session is built.
    pub optimization: GraphOptimizationLevel,
}

impl RuntimeOptions {
    /// The shape of a model instance's session.
    pub fn session_shape(&self) -> SessionShape {
        SessionShape {
            threads: self.intra_threads,
            spinning: self.intra_spinning,
        }
    }
}

/// How one session runs: its intra-op threads, and when they spin (`None`: [`Spinning::auto`] for its model).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionShape {
    pub threads: usize,
    pub spinning: Option<Spinning>,
}

/// When a session's idle intra-op threads spin-wait for work instead of sleeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spinning {
    /// Never: every parallel section wakes the other threads from sleep.
    Never,
    /// Between the operators of one run, and not after it (ONNX Runtime's `session.force_spinning_stop`): a
    /// run's parallel sections follow one another within microseconds, so its threads wait for the next one
    /// awake, while between runs they sleep and leave the cores to the network.
    WithinRun,
    /// Also after a run (ONNX Runtime's default), taking a core the network could use while nothing runs.
    Always,
}

impl Spinning {
    /// The least work per image of a graph whose threads spin within a run by default.
    pub const AUTO_MIN_MACS_PER_IMAGE: u64 = 10_000_000;

    /// A model's spinning when none is set: within a run for an FP32 graph of at least
    /// [`Self::AUTO_MIN_MACS_PER_IMAGE`], never otherwise. Measured in pairs (bench/README.md, rounds 9 and 11):
    /// cnn (FP32, 22 M multiply-adds per image) serves a lone caller 15-16% more with it and loses nothing
    /// under load, on both CPUs measured; cnn-int8 and dense, whose runs take a fraction of that, gain less and
    /// lose up to 7% of their single images at 64 callers, where their spinning threads take CPU from the network.
    pub fn auto(meta: &ModelMetadata) -> Spinning {
        if meta.quantization.is_none() && meta.macs_per_image >= Self::AUTO_MIN_MACS_PER_IMAGE {
            Spinning::WithinRun
        } else {
            Spinning::Never
        }
    }
}

/// A loaded model: metadata plus a session. Owned by exactly one inference thread (see `batching`).
pub struct Model {
    pub meta: ModelMetadata,
    pub detector: Detector,
    session: Session,
    /// Fetches only the outputs the server reads (`logits`, and the OOD components when the detector has some;
    /// not `probabilities`, which it computes calibrated, nor `features`), so no copy of the others is made.
    run_options: RunOptions<HasSelectedOutputs>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.meta.name)
            .field("version", &self.meta.version)
            .finish()
    }
}

/// ONNX Runtime allows one environment per process; servers started by tests in the same process share it.
fn environment(options: &RuntimeOptions) -> Result<Environment, ModelError> {
    static ENV: Mutex<Option<Environment>> = Mutex::new(None);
    if !options.dylib.exists() {
        return Err(ModelError::RuntimeMissing {
            path: options.dylib.clone(),
        });
    }
    let mut env = ENV.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(env) = env.as_ref() {
        return Ok(env.clone());
    }
    let built = ort::init_from(&options.dylib)
        .map_err(|source| ModelError::RuntimeLoad {
            path: options.dylib.clone(),
            source,
        })?
        .with_name("fmnist")
        .build()
        .map_err(|e| ModelError::Environment(e.to_string()))?;
    *env = Some(built.clone());
    Ok(built)
}

impl Model {
    /// Loads a version directory: its `model.json` and the ONNX file it names. Checks the file's sha256 and
    /// the graph's signature, and warms the session up at batch sizes 1 and `warmup_batch`.
    pub fn load(dir: &Path, options: &RuntimeOptions, warmup_batch: usize) -> Result<Model, ModelError> {
        let mut models = Self::load_sessions(dir, options, warmup_batch, &[options.session_shape()])?;
        Ok(models.pop().expect("one session"))
    }

    /// One warmed-up session of the version in `dir` per entry of `shapes`, each with its intra-op threads and
    /// spinning. The files are read once, so every session serves the same bytes even if the directory
    /// changes while they load (and a model.json read from a pipe, as tests do, is read once).
    pub fn load_sessions(
        dir: &Path,
        options: &RuntimeOptions,
        warmup_batch: usize,
        shapes: &[SessionShape],
    ) -> Result<Vec<Model>, ModelError> {
        let meta_path = dir.join(crate::core::repository::METADATA_FILE);
        let meta_text = std::fs::read_to_string(&meta_path).map_err(|e| ModelError::Metadata {
            path: meta_path.clone(),
            reason: format!(
                "{e} (a version is <models-dir>/<name>/<version>/model.json + model.onnx, as `make train` writes \
                 them; the repository ships models/cnn/1, models/cnn-int8/1 and models/dense/1)"
            ),
        })?;
        let meta: ModelMetadata = serde_json::from_str(&meta_text).map_err(|e| ModelError::Metadata {
            path: meta_path.clone(),
            reason: e.to_string(),
        })?;
        if meta.classes.len() != CLASSES {
            return Err(ModelError::Metadata {
                path: meta_path,
                reason: format!("lists {} classes, expected {CLASSES}", meta.classes.len()),
            });
        }
        if let Err(reason) = check_scoring(&meta) {
            return Err(ModelError::Metadata {
                path: meta_path,
                reason,
            });
        }
        let detector = load_detector(dir, &meta).map_err(|reason| ModelError::Metadata {
            path: meta_path.clone(),
            reason,
        })?;
        let mut meta = meta;
        if let Some(ood) = meta.ood.as_mut() {
            ood.description = detector.description().map(str::to_owned);
            ood.protocol = detector.protocol().map(str::to_owned);
        }
        let onnx_path = dir.join(&meta.file);
        let bytes = std::fs::read(&onnx_path).map_err(|e| ModelError::File {
            path: onnx_path.clone(),
            reason: e.to_string(),
        })?;
        let digest = format!("{:x}", Sha256::digest(&bytes));
        if digest != meta.sha256 {
            return Err(ModelError::File {
                path: onnx_path,
                reason: format!(
                    "sha256 is {digest} but {} says {}: corrupt or replaced file",
                    meta_path.display(),
                    meta.sha256
                ),
            });
        }

        shapes
            .iter()
            .map(|&shape| Self::session(&meta, &detector, &bytes, &onnx_path, options, shape, warmup_batch))
            .collect()
    }

    /// One warmed-up session of `shape`, of a version whose files [`Model::load_sessions`] has read and checked.
    fn session(
        meta: &ModelMetadata,
        detector: &Detector,
        bytes: &[u8],
        onnx_path: &Path,
        options: &RuntimeOptions,
        shape: SessionShape,
        warmup_batch: usize,
    ) -> Result<Model, ModelError> {
        let env = environment(options)?;
        let threads = shape.threads.max(1);
        let spinning = shape.spinning.unwrap_or_else(|| Spinning::auto(meta));
        let file_err = |e: ort::Error<ort::session::builder::SessionBuilder>| ModelError::File {
            path: onnx_path.to_path_buf(),
            reason: e.to_string(),
        };
        let session = Session::builder(&env)
            .map_err(|e| ModelError::Environment(e.to_string()))?
            .with_optimization_level(options.optimization)
            .map_err(file_err)?
            .with_intra_threads(threads)
            .map_err(file_err)?
            .with_intra_op_spinning(spinning != Spinning::Never)
            .map_err(file_err)?
            .with_config_entry(
                "session.force_spinning_stop",
                if spinning == Spinning::WithinRun { "1" } else { "0" },
            )
            .map_err(file_err)?
            // One session per inference thread: the inter-op pool would only add idle threads.
            .with_inter_threads(1)
            .map_err(file_err)?
            .commit_from_memory(bytes)
            .map_err(|e| ModelError::File {
                path: onnx_path.to_path_buf(),
                reason: format!("not a loadable ONNX model: {e}"),
            })?;
        check_signature(&session, meta, detector.graph_output(), onnx_path)?;

        let outputs = OutputSelector::no_default().with("logits");
        let outputs = match detector.graph_output() {
            Some((name, _)) => outputs.with(name),
            None => outputs,
        };
        let run_options = RunOptions::new()
            .map_err(|e| ModelError::Environment(e.to_string()))?
            .with_outputs(outputs);
        let mut model = Model {
            meta: meta.clone(),
            detector: detector.clone(),
            session,
            run_options,
        };
        for n in [1, warmup_batch.max(1)] {
            model.run(&vec![0.0; n * PIXELS], n)?;
        }
        Ok(model)
    }

    /// Runs `n` images (`n * 784` values already scaled, see `preprocess::ModelInput::write_scaled`).
    pub fn run(&mut self, input: &[f32], n: usize) -> Result<BatchOutput, ModelError> {
        let mut out = BatchOutput::default();
        self.run_into(input, n, &mut out)?;
        Ok(out)
    }

    /// Like [`Model::run`], writing into `out`'s buffers (resized to `n * CLASSES`, allocated only when they grow).
    /// The probabilities are computed here from the logits, with the model's temperature.
    pub fn run_into(&mut self, input: &[f32], n: usize, out: &mut BatchOutput) -> Result<(), ModelError> {
        debug_assert_eq!(input.len(), n * PIXELS, "input holds n images");
        let tensor =
            TensorRef::from_array_view(([n, 1, 28, 28], input)).map_err(|e| ModelError::Inference(e.to_string()))?;
        let outputs = self
            .session
            .run_with_options(ort::inputs![self.meta.input.name.as_str() => tensor], &self.run_options)
            .map_err(|e| ModelError::Inference(e.to_string()))?;
        let value = outputs
            .get("logits")
            .ok_or_else(|| ModelError::Inference("output \"logits\" missing".into()))?;
        let (_, data) = value
            .try_extract_tensor::<f32>()
            .map_err(|e| ModelError::Inference(e.to_string()))?;
        if data.len() != n * CLASSES {
            return Err(ModelError::Inference(format!(
                "output \"logits\" has {} values for {n} images",
                data.len()
            )));
        }
        out.logits.clear();
        out.logits.extend_from_slice(data);
        out.components.clear();
        let width = match self.detector.graph_output() {
            Some((name, width)) => {
                let value = outputs
                    .get(name)
                    .ok_or_else(|| ModelError::Inference(format!("output {name:?} missing")))?;
                let (_, data) = value
                    .try_extract_tensor::<f32>()
                    .map_err(|e| ModelError::Inference(e.to_string()))?;
                if data.len() != n * width {
                    return Err(ModelError::Inference(format!(
                        "output {name:?} has {} values for {n} images of {width}",
                        data.len()
                    )));
                }
                out.components.extend_from_slice(data);
                width
            }
            None => 0,
        };
        out.ood_scores.clear();
        for i in 0..n {
            let score = self.detector.score(
                &out.logits[i * CLASSES..(i + 1) * CLASSES],
                &out.components[i * width..(i + 1) * width],
            );
            out.ood_scores.push(score);
        }
        out.probabilities.resize(n * CLASSES, 0.0);
        let temperature = self.meta.temperature();
        for (logits, probabilities) in out
            .logits
            .chunks_exact(CLASSES)
            .zip(out.probabilities.chunks_exact_mut(CLASSES))
        {
            calibrated_softmax(logits, temperature, probabilities);
        }
        Ok(())
    }
}

/// `softmax(logits / temperature)` into `out`, computed in f32 as the graph's own softmax is (with
/// `temperature` 1 it matches the model's `probabilities` output to float rounding).
pub fn calibrated_softmax(logits: &[f32], temperature: f32, out: &mut [f32]) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for (o, &l) in out.iter_mut().zip(logits) {
        *o = ((l - max) / temperature).exp();
        sum += *o;
    }
    for o in out.iter_mut() {
        *o /= sum;
    }
}

/// The OOD method, temperature and accept rule in the metadata are ones this server can apply: checked once at
/// load, so a bad export fails at start-up, not on a request.
fn check_scoring(meta: &ModelMetadata) -> Result<(), String> {
    if let Some(ood) = &meta.ood
        && !ood.threshold.is_finite()
    {
        return Err(format!("OOD threshold {} is not a finite number", ood.threshold));
    }
    if let Some(c) = &meta.calibration
        && !(c.temperature.is_finite() && c.temperature > 0.0)
    {
        return Err(format!("temperature {} is not a positive number", c.temperature));
    }
    if let Some(a) = &meta.accept {
        for (field, v) in [
            ("min_confidence", a.min_confidence),
            ("target_val_accuracy", a.target_val_accuracy),
            ("test_accuracy", a.test_accuracy),
            ("test_coverage", a.test_coverage),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("accept.{field} is {v}, not between 0 and 1"));
            }
        }
    }
    Ok(())
}

/// The detector named by the metadata, its file's sha256 checked: energy when the model has none.
fn load_detector(dir: &Path, meta: &ModelMetadata) -> Result<Detector, String> {
    let Some(ood) = &meta.ood else {
        return Ok(Detector::default());
    };
    if matches!(ood.method.as_str(), "energy" | "msp") {
        // Scores of the logits alone have no parameters: a version folder then needs no ood.json.
        return Detector::from_json(&serde_json::json!({ "method": ood.method }).to_string());
    }
    let Some(file) = &ood.file else {
        return Err(format!(
            "OOD method {:?} needs its parameters file (ood.file)",
            ood.method
        ));
    };
    let path = dir.join(file);
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let digest = format!("{:x}", Sha256::digest(&bytes));
    if ood.sha256.as_ref().is_some_and(|want| *want != digest) {
        return Err(format!(
            "{} has sha256 {digest}, not the one model.json names",
            path.display()
        ));
    }
    let text = String::from_utf8(bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let detector = Detector::from_json(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if detector.method() != ood.method {
        return Err(format!(
            "{} is for OOD method {:?}, model.json names {:?}",
            path.display(),
            detector.method(),
            ood.method
        ));
    }
    Ok(detector)
}

/// The server feeds `[batch, 1, 28, 28]` float32 and reads `logits` `[batch, 10]` (and the OOD components
/// `[batch, k]` when the detector has some); a model exported differently must fail at start-up, not on the
/// first request.
fn check_signature(
    session: &Session,
    meta: &ModelMetadata,
    graph_output: Option<(&str, usize)>,
    path: &Path,
) -> Result<(), ModelError> {
    let err = |reason: String| ModelError::Signature {
        path: path.to_path_buf(),
        reason,
    };
    let input = session
        .inputs()
        .iter()
        .find(|i| i.name() == meta.input.name)
        .ok_or_else(|| err(format!("no input named {:?}", meta.input.name)))?;
    match input.dtype() {
        ValueType::Tensor { ty, shape, .. } => {
            let dims: Vec<i64> = shape.iter().copied().collect();
            if *ty != ort::value::TensorElementType::Float32 || dims.len() != 4 || dims[1..] != [1, 28, 28] {
                return Err(err(format!(
                    "input {:?} is {ty:?} {dims:?}; expected float32 [batch, 1, 28, 28]",
                    meta.input.name
                )));
            }
        }
        other => return Err(err(format!("input {:?} is {other:?}, not a tensor", meta.input.name))),
    }
    let output = session
        .outputs()
        .iter()
        .find(|o| o.name() == "logits")
        .ok_or_else(|| err("no output named \"logits\"".into()))?;
    if let ValueType::Tensor { shape, .. } = output.dtype() {
        let dims: Vec<i64> = shape.iter().copied().collect();
        if dims.len() != 2 || dims[1] != CLASSES as i64 {
            return Err(err(format!(
                "output \"logits\" has shape {dims:?}; expected [batch, {CLASSES}]"
            )));
        }
    }
    if let Some((name, width)) = graph_output {
        let output = session
            .outputs()
            .iter()
            .find(|o| o.name() == name)
            .ok_or_else(|| err(format!("no output named {name:?}, which the OOD detector reads")))?;
        if let ValueType::Tensor { shape, .. } = output.dtype() {
            let dims: Vec<i64> = shape.iter().copied().collect();
            if dims.len() != 2 || dims[1] != width as i64 {
                return Err(err(format!(
                    "output {name:?} has shape {dims:?}; the OOD detector expects [batch, {width}]"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped(model: &str, version: u32) -> ModelMetadata {
        let path = format!("{}/models/{model}/{version}/model.json", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(&path).expect("the shipped model.json")).expect("it parses")
    }

    #[test]
    fn by_default_only_the_long_fp32_graph_spins_within_a_run() {
        // cnn's runs are long enough that its threads wait for the next operator awake; cnn-int8 (the same
        // multiply-adds in 8 bits) and dense are not, and their spinning would take CPU from the network.
        for version in [1, 2, 3, 4] {
            assert_eq!(
                Spinning::auto(&shipped("cnn", version)),
                Spinning::WithinRun,
                "cnn {version}"
            );
            assert_eq!(
                Spinning::auto(&shipped("cnn-int8", version)),
                Spinning::Never,
                "cnn-int8 {version}"
            );
        }
        assert_eq!(Spinning::auto(&shipped("dense", 1)), Spinning::Never);
    }

    fn softmax(logits: &[f32; CLASSES], temperature: f32) -> [f32; CLASSES] {
        let mut out = [0.0; CLASSES];
        calibrated_softmax(logits, temperature, &mut out);
        out
    }

    #[test]
    fn temperature_one_is_the_plain_softmax() {
        let logits = [2.0, 1.0, 0.0, -1.0, 3.0, 0.5, -2.0, 0.0, 1.5, -0.5];
        let exp: Vec<f64> = logits.iter().map(|&l| f64::from(l).exp()).collect();
        let sum: f64 = exp.iter().sum();
        for (p, e) in softmax(&logits, 1.0).iter().zip(&exp) {
            assert!((f64::from(*p) - e / sum).abs() < 1e-6);
        }
    }

    #[test]
    fn a_temperature_above_one_lowers_the_top_probability_and_keeps_the_order() {
        let logits = [2.0, 1.0, 0.0, -1.0, 9.0, 0.5, -2.0, 0.0, 1.5, -0.5];
        let (plain, cooled) = (softmax(&logits, 1.0), softmax(&logits, 1.5));
        assert!(cooled[4] < plain[4] && cooled[4] > 0.5, "{cooled:?}");
        assert!((cooled.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let order = |p: &[f32; CLASSES]| {
            let mut i: Vec<usize> = (0..CLASSES).collect();
            i.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
            i
        };
        assert_eq!(order(&plain), order(&cooled));
    }

    #[test]
    fn extreme_logits_give_finite_probabilities() {
        let p = softmax(&[1e4, -1e4, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], 1.17);
        assert!(p.iter().all(|v| v.is_finite()) && p[0] == 1.0, "{p:?}");
    }

    fn metadata(extra: &str) -> ModelMetadata {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/models/cnn/1/model.json")).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let patch: serde_json::Value = serde_json::from_str(extra).unwrap();
        for (k, val) in patch.as_object().unwrap() {
            v[k] = val.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_shipped_cnn_carries_a_temperature_and_an_accept_rule_the_server_can_apply() {
        let meta = metadata("{}");
        check_scoring(&meta).unwrap();
        assert!(meta.temperature() > 1.0, "the CNN is over-confident, so T > 1");
        let accept = meta.accept.unwrap();
        assert_eq!(accept.target_val_accuracy, 0.99);
        assert!(accept.min_confidence > 0.6 && accept.test_coverage >= 0.8 && accept.test_accuracy >= 0.985);
    }

    #[test]
    fn scoring_metadata_the_server_cannot_apply_is_refused_at_load() {
        for (patch, want) in [
            (r#"{"calibration": {"temperature": 0.0}}"#, "temperature"),
            (r#"{"calibration": {"temperature": -1.2}}"#, "temperature"),
            (
                r#"{"accept": {"target_val_accuracy": 0.99, "min_confidence": 1.5, "test_accuracy": 0.99, "test_coverage": 0.8}}"#,
                "accept.min_confidence",
            ),
        ] {
            let err = check_scoring(&metadata(patch)).unwrap_err();
            assert!(err.contains(want), "{patch}: {err}");
        }
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/models/cnn/1"));
        let err = load_detector(dir, &metadata(r#"{"ood": {"method": "knn", "threshold": 0.1}}"#)).unwrap_err();
        assert!(err.contains("needs its parameters file"), "{err}");
        let err = load_detector(
            dir,
            &metadata(r#"{"ood": {"method": "knn", "threshold": 0.1, "file": "ood.json", "sha256": "00"}}"#),
        )
        .unwrap_err();
        assert!(err.contains("sha256"), "{err}");
        let meta = metadata(r#"{"calibration": null, "accept": null}"#);
        check_scoring(&meta).unwrap();
        assert_eq!(meta.temperature(), 1.0, "uncalibrated: the plain softmax");
    }
}
