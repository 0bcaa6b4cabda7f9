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

use crate::{error::ModelError, preprocess::PIXELS};

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
}

/// What a batch run gives back, image after image. Reused from run to run by the inference thread
/// ([`Model::run_into`]), so its buffers are allocated once.
#[derive(Debug, Clone, Default)]
pub struct BatchOutput {
    /// `n * CLASSES` softmax probabilities.
    pub probabilities: Vec<f32>,
    /// `n * CLASSES` logits.
    pub logits: Vec<f32>,
}

/// ONNX Runtime settings shared by every session (built from the config by `Config::runtime_options`).
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    pub dylib: PathBuf,
    /// Intra-op threads per session; 0 = one per available core.
    pub intra_threads: usize,
    /// Whether idle intra-op threads spin before sleeping (ONNX Runtime's default). Spinning shortens the hand-off
    /// between batches but burns a core the async runtime could use (see bench/README.md).
    pub intra_spinning: bool,
    /// Graph optimization level applied when the session is built.
    pub optimization: GraphOptimizationLevel,
}

/// A loaded model: metadata plus a session. Owned by exactly one inference thread (see `batching`).
pub struct Model {
    pub meta: ModelMetadata,
    session: Session,
    /// Fetches only the two outputs the server reads (not `features`), so no copy of them is made.
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
        let meta_path = dir.join(crate::repository::METADATA_FILE);
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
        if let Some(ood) = &meta.ood
            && ood.method != "energy"
        {
            return Err(ModelError::Metadata {
                path: meta_path,
                reason: format!("OOD method {:?} is not one this server computes (energy)", ood.method),
            });
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

        let env = environment(options)?;
        let threads = if options.intra_threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            options.intra_threads
        };
        let file_err = |e: ort::Error<ort::session::builder::SessionBuilder>| ModelError::File {
            path: onnx_path.clone(),
            reason: e.to_string(),
        };
        let session = Session::builder(&env)
            .map_err(|e| ModelError::Environment(e.to_string()))?
            .with_optimization_level(options.optimization)
            .map_err(file_err)?
            .with_intra_threads(threads)
            .map_err(file_err)?
            .with_intra_op_spinning(options.intra_spinning)
            .map_err(file_err)?
            // One session per inference thread: the inter-op pool would only add idle threads.
            .with_inter_threads(1)
            .map_err(file_err)?
            .commit_from_memory(&bytes)
            .map_err(|e| ModelError::File {
                path: onnx_path.clone(),
                reason: format!("not a loadable ONNX model: {e}"),
            })?;
        check_signature(&session, &meta, &onnx_path)?;

        let run_options = RunOptions::new()
            .map_err(|e| ModelError::Environment(e.to_string()))?
            .with_outputs(OutputSelector::no_default().with("probabilities").with("logits"));
        let mut model = Model {
            meta,
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
    pub fn run_into(&mut self, input: &[f32], n: usize, out: &mut BatchOutput) -> Result<(), ModelError> {
        debug_assert_eq!(input.len(), n * PIXELS, "input holds n images");
        let tensor =
            TensorRef::from_array_view(([n, 1, 28, 28], input)).map_err(|e| ModelError::Inference(e.to_string()))?;
        let outputs = self
            .session
            .run_with_options(ort::inputs![self.meta.input.name.as_str() => tensor], &self.run_options)
            .map_err(|e| ModelError::Inference(e.to_string()))?;
        let extract = |name: &str, into: &mut Vec<f32>| -> Result<(), ModelError> {
            let value = outputs
                .get(name)
                .ok_or_else(|| ModelError::Inference(format!("output {name:?} missing")))?;
            let (_, data) = value
                .try_extract_tensor::<f32>()
                .map_err(|e| ModelError::Inference(e.to_string()))?;
            if data.len() != n * CLASSES {
                return Err(ModelError::Inference(format!(
                    "output {name:?} has {} values for {n} images",
                    data.len()
                )));
            }
            into.clear();
            into.extend_from_slice(data);
            Ok(())
        };
        extract("probabilities", &mut out.probabilities)?;
        extract("logits", &mut out.logits)
    }
}

/// The server feeds `[batch, 1, 28, 28]` float32 and reads `probabilities` and `logits` `[batch, 10]`; a model
/// exported differently must fail at start-up, not on the first request.
fn check_signature(session: &Session, meta: &ModelMetadata, path: &Path) -> Result<(), ModelError> {
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
    for name in ["probabilities", "logits"] {
        let output = session
            .outputs()
            .iter()
            .find(|o| o.name() == name)
            .ok_or_else(|| err(format!("no output named {name:?}")))?;
        if let ValueType::Tensor { shape, .. } = output.dtype() {
            let dims: Vec<i64> = shape.iter().copied().collect();
            if dims.len() != 2 || dims[1] != CLASSES as i64 {
                return Err(err(format!(
                    "output {name:?} has shape {dims:?}; expected [batch, {CLASSES}]"
                )));
            }
        }
    }
    Ok(())
}
